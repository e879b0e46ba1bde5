import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from qat_lightning import DiffQuantizer
from qat_lightning.quantizers import diffq as diffq_module

from .helpers import noise_source

MB = 8 * 2**20


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


# ----------------------------------------------------------------------------- sizes by hand
def test_size_hand_computed() -> None:
    model = nn.Linear(32, 8)  # weight 256 entries quantized, bias 8 entries kept in fp32
    q = DiffQuantizer(model, min_size=0.0001, group_size=8)
    # 32 groups x 8 weights x 8 bits + 64 (min, max) + 8 + bits_bits * 32, bits_bits = ceil(log2(1 + 8 - 2)) = 3
    expected = (8 * 32 * 8 + 64 + 8 + 3 * 32 + 32 * 8) / MB
    assert q.true_model_size() == pytest.approx(expected, rel=0, abs=0)
    assert_close(q.model_size(), torch.tensor(expected), rtol=1e-6, atol=0)
    assert q.float_model_size() == 32 * (256 + 8) / MB


def test_size_float16_and_group_zero() -> None:
    model = nn.Linear(32, 8)
    q = DiffQuantizer(model, min_size=0.0001, group_size=0, float16=True, init_bits=6)
    # one group of 256 weights at 6 bits, bits_bits = ceil(log2(1 + 6 - 2)) = 3 for one group; bias fp16
    assert q.true_model_size() == (256 * 6 + 64 + 8 + 3 + 16 * 8) / MB


def test_size_is_differentiable_in_bits() -> None:
    q = DiffQuantizer(mlp(), min_size=0, group_size=8)
    q.model_size().backward()
    for logit in q.parameters():
        assert logit.grad is not None and (logit.grad > 0).all()


def test_exact_size_rounds_bits() -> None:
    model = nn.Linear(32, 8, bias=False)
    q = DiffQuantizer(model, min_size=0, group_size=8)
    bits = torch.linspace(2.2, 9.6, 32)  # rounds to 2..10
    t = (bits - 2) / 13
    q.parameters()[0].data.copy_(torch.log(t / (1 - t)))
    rounded = bits.round()
    bits_bits = math.ceil(math.log2(1 + rounded.max().item() - 2))
    assert q.true_model_size() == pytest.approx((8 * rounded.sum().item() + 72 + bits_bits * 32) / MB, rel=1e-7)
    assert q.average_bits(exact=True).item() == pytest.approx(rounded.mean().item(), rel=1e-6)


# ----------------------------------------------------------------------------- bits parametrisations
@pytest.mark.parametrize("param", ["bits", "noise"])
@pytest.mark.parametrize("init_bits", [3, 8, 14.5])
def test_initial_bits(param: str, init_bits: float) -> None:
    q = DiffQuantizer(mlp(), min_size=0, param=param, init_bits=init_bits)
    for logit in q.parameters():
        assert_close(q.get_bits(logit), torch.full_like(logit, init_bits), rtol=0, atol=1e-4)


def test_bits_formulas_by_hand() -> None:
    q = DiffQuantizer(mlp(), min_size=0, min_bits=2, max_bits=10, param="bits")
    assert q.get_bits(torch.tensor(0.0)).item() == pytest.approx(6.0)  # midpoint of 2..10
    qn = DiffQuantizer(mlp(), min_size=0, min_bits=2, max_bits=10, param="noise")
    # logit 0: noise scale is the geometric mean of 1/(2^10 - 1) and 1/(2^2 - 1)
    noise = math.sqrt(1 / 1023 / 3)
    assert qn.get_bits(torch.tensor(0.0)).item() == pytest.approx(math.log2(1 + 1 / noise), rel=1e-6)


# ----------------------------------------------------------------------------- training forward
def test_training_noise_follows_the_bits() -> None:
    layer = nn.Linear(1024, 256, bias=False)
    q = DiffQuantizer(layer, min_size=0, group_size=1024)
    bits = torch.tensor([3.0] * 128 + [6.0] * 128)
    t = (bits - 2) / 13
    q.parameters()[0].data.copy_(torch.log(t / (1 - t)))
    seen = []
    layer.register_forward_pre_hook(lambda m, i: seen.append(m.weight.detach().clone()))
    layer(torch.randn(1, 1024))
    noise = seen[0] - layer.weight.detach()
    span = (layer.weight.max() - layer.weight.min()).item()
    for rows, b in ((slice(0, 128), 3.0), (slice(128, 256), 6.0)):
        expected_std = span / (2**b - 1) / 2  # gaussian: randn / 2 times the quantization step
        assert noise[rows].std().item() == pytest.approx(expected_std, rel=0.02)
    assert layer._parameters["weight"] is layer.weight  # the float parameter is back after forward


def test_uniform_noise_is_bounded_by_half_a_step() -> None:
    layer = nn.Linear(256, 64, bias=False)
    q = DiffQuantizer(layer, min_size=0, noise="uniform", init_bits=4)
    seen = []
    layer.register_forward_pre_hook(lambda m, i: seen.append(m.weight.detach().clone()))
    layer(torch.randn(1, 256))
    step = (layer.weight.max() - layer.weight.min()).item() / (2**4 - 1)
    noise = (seen[0] - layer.weight.detach()).abs()
    assert noise.max().item() <= step / 2 * (1 + 1e-5)
    assert noise.max().item() > step / 2 * 0.95


def test_gradients_reach_weights_and_bits() -> None:
    model = mlp()
    q = DiffQuantizer(model, min_size=0)
    F.cross_entropy(model(torch.randn(8, 40)), torch.randint(0, 8, (8,))).backward()
    for qp in q.quantized_params():
        assert qp.param.grad is not None and qp.param.grad.abs().sum() > 0
        assert qp.logit.grad is not None and qp.logit.grad.abs().sum() > 0


def test_weight_gradient_is_the_float_gradient_of_the_noisy_forward() -> None:
    """d loss / d w equals the gradient of the same loss with the noisy weight as a constant input."""
    layer = nn.Linear(16, 4, bias=False)
    q = DiffQuantizer(layer, min_size=0)
    x = torch.randn(3, 16)
    seen = []
    layer.register_forward_pre_hook(lambda m, i: seen.append(m.weight.detach().clone()))
    layer(x).square().sum().backward()
    noisy = seen[0].requires_grad_()
    F.linear(x, noisy).square().sum().backward()
    assert_close(layer.weight.grad, noisy.grad, rtol=0, atol=0)
    assert q.parameters()[0].grad is not None


def test_accumulating_two_backwards_draws_new_noise() -> None:
    """Two forward/backward pairs before a step: each sees its own noise, and the gradients add up
    to the sum of the two noisy losses' gradients."""
    layer = nn.Linear(16, 4, bias=False)
    DiffQuantizer(layer, min_size=0)
    seen: list[torch.Tensor] = []
    layer.register_forward_pre_hook(lambda m, i: seen.append(m.weight.detach().clone()))
    x = torch.randn(3, 16)
    layer(x).square().sum().backward()
    layer(x).square().sum().backward()  # would fail if the spent noisy graph were reused
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])
    expected = sum(torch.autograd.grad(F.linear(x, w.requires_grad_()).square().sum(), w)[0] for w in seen)
    assert_close(layer.weight.grad, expected, rtol=1e-6, atol=1e-6)


def test_tied_parameter_one_logit_one_noisy_tensor_counted_once() -> None:
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(128, 32)
            self.out = nn.Linear(32, 128, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(tokens))

    model = TiedLM()
    q = DiffQuantizer(model, min_size=0)
    assert len(q.parameters()) == 1
    assert q.true_model_size() == (128 * 32 * 8 + 72 + 3 * 128 * 32 // 8) / MB
    seen = {}
    model.emb.register_forward_pre_hook(lambda m, i: seen.__setitem__("emb", m.weight))
    model.out.register_forward_pre_hook(lambda m, i: seen.__setitem__("out", m.weight))
    model(torch.randint(0, 128, (4, 5))).sum().backward()
    assert seen["emb"] is seen["out"] and seen["emb"] is not model.emb.weight
    untied = DiffQuantizer(TiedLM(), min_size=0, detect_bound=False)
    assert len(untied.parameters()) == 2


def test_submodule_called_directly_is_quantized() -> None:
    model = mlp()
    q = DiffQuantizer(model, min_size=0, exclude=["*.bias"])
    x = torch.randn(4, 40)
    first = model[0]
    float_out = F.linear(x, first.weight, first.bias)
    assert not torch.equal(first(x), float_out)  # noisy in training
    model.eval()
    expected = F.linear(x, q.quantized_weight(q.quantized_params()[0]), first.bias)
    assert_close(first(x), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- eval and quantize/restore
def test_eval_uses_true_quantized_weights_once() -> None:
    model = mlp()
    q = DiffQuantizer(model, min_size=0)
    model.eval()
    x = torch.randn(4, 40)
    with q.quantized():
        expected = model(x)
    calls = []
    original = q.quantized_weight
    q.quantized_weight = lambda entry: calls.append(entry) or original(entry)  # type: ignore[method-assign]
    assert_close(model(x), expected, rtol=0, atol=0)
    assert_close(model(x), expected, rtol=0, atol=0)
    assert len(calls) == len(q.quantized_params())  # computed once, reused by the second forward


def test_eval_cache_follows_weight_updates() -> None:
    model = mlp()
    q = DiffQuantizer(model, min_size=0)
    model.eval()
    x = torch.randn(4, 40)
    before = model(x)
    with torch.no_grad():
        model[0].weight.mul_(2)  # in-place update bumps the version counter
    after = model(x)
    assert not torch.equal(before, after)
    with q.quantized():
        assert_close(model(x), after, rtol=0, atol=0)


def test_quantize_restore_is_bit_exact_and_state_dict_stays_float() -> None:
    model = mlp()
    q = DiffQuantizer(model, min_size=0)
    floats = {k: v.clone() for k, v in model.state_dict().items()}
    assert q.quantize() and not q.quantize()
    assert q.is_quantized
    qp = q.quantized_params()[0]
    assert not torch.equal(qp.param, floats["0.weight"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, floats[key]), key  # checkpoints written now still hold float weights
    assert q.restore() and not q.restore()
    for key, value in model.state_dict().items():
        assert torch.equal(value, floats[key])
    with q.quantized():
        assert q.is_quantized
    assert not q.is_quantized
    assert torch.equal(model[0].weight, floats["0.weight"])


def test_quantized_levels_use_rounded_bits_and_extra_bits() -> None:
    layer = nn.Linear(64, 8, bias=False)
    q = DiffQuantizer(layer, min_size=0, init_bits=3.4, extra_bits=1.0)  # round(4.4) = 4 bits
    with q.quantized():
        w = layer.weight.detach().clone()
    mn, mx = layer.weight.min(), layer.weight.max()
    levels = (w - mn) / (mx - mn) * 15
    assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert levels.round().unique().numel() <= 16


def test_training_forward_restores_float_weights_after_quantize() -> None:
    model = mlp()
    q = DiffQuantizer(model, min_size=0)
    w = model[0].weight.detach().clone()
    q.quantize()
    model.train()
    model(torch.randn(2, 40))
    assert not q.is_quantized and torch.equal(model[0].weight, w)


@pytest.mark.parametrize("rnn_type", [nn.LSTM, nn.GRU])
def test_recurrent_weights(rnn_type: type[nn.RNNBase]) -> None:
    rnn = rnn_type(16, 32, num_layers=2, batch_first=True)
    q = DiffQuantizer(rnn, min_size=0)
    x = torch.randn(3, 5, 16)
    out, _ = rnn(x)
    out.sum().backward()
    assert all(qp.logit.grad is not None for qp in q.quantized_params())
    rnn.eval()
    reference = rnn_type(16, 32, num_layers=2, batch_first=True)
    with torch.no_grad():
        for qp in q.quantized_params():
            getattr(reference, qp.name).copy_(q.quantized_weight(qp))
        for name, p in reference.named_parameters():
            if name not in {qp.name for qp in q.quantized_params()}:
                p.copy_(getattr(rnn, name))
    assert_close(rnn(x)[0], reference(x)[0], rtol=0, atol=1e-6)  # fused kernels may sum in another order
    assert all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, rnn._flat_weights_names))


def test_min_size_and_exclude() -> None:
    model = mlp()
    q = DiffQuantizer(model, min_size=0, exclude=["*.bias", "4.weight"])
    assert [qp.name for qp in q.quantized_params()] == ["0.weight", "2.weight"]
    with pytest.warns(UserWarning, match="found nothing to quantize"):
        q2 = DiffQuantizer(mlp(), min_size=64 * 64 * 4 / 2**20)  # 2.weight has exactly the limit: kept
    assert [qp.name for qp in q2.quantized_params()] == []
    q3 = DiffQuantizer(mlp(), min_size=64 * 64 * 4 / 2**20 - 1e-6)
    assert [qp.name for qp in q3.quantized_params()] == ["2.weight"]


def test_setup_optimizer_moves_bits_to_their_own_group() -> None:
    model = mlp()
    q = DiffQuantizer(model, min_size=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    group = q.setup_optimizer(optimizer, lr=1e-2)
    bits = {id(p) for p in q.parameters()}
    assert not any(id(p) in bits for p in optimizer.param_groups[0]["params"])
    assert {id(p) for p in group["params"]} == bits and group["weight_decay"] == 0 and group["lr"] == 1e-2


def test_detach_removes_everything() -> None:
    model = mlp()
    q = DiffQuantizer(model, min_size=0)
    q.quantize()
    q.detach()
    assert not any(name.endswith("_diffq") for name, _ in model.named_parameters())
    x = torch.randn(2, 40)
    assert torch.equal(model(x), model(x))  # no noise anymore
    DiffQuantizer(model, min_size=0)  # can be attached again


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_size": -1}, "min_size must be a number >= 0"),
        ({"float16": "yes"}, "float16 must be True or False"),
        ({"group_size": -1}, "group_size must be an integer >= 0"),
        ({"group_size": 1.5}, "group_size must be an integer"),
        ({"min_bits": 0}, "min_bits must be a number > 0"),
        ({"max_bits": 16}, "max_bits must be a number > 2 and <= 15"),
        ({"init_bits": 2}, "init_bits must be a number > 2 and < 15"),
        ({"init_bits": 15}, "init_bits must be a number > 2 and < 15"),
        ({"param": "logit"}, "param must be one of 'bits', 'noise'"),
        ({"noise": "laplace"}, "noise must be one of 'gaussian', 'uniform'"),
        ({"extra_bits": float("nan")}, "extra_bits must be a number"),
        ({"suffix": ""}, "suffix must be '_' followed by letters"),
        ({"exclude": "bias"}, "exclude must be a list of fnmatch patterns"),
        ({"exclude": [1]}, "exclude must contain only strings"),
        ({"detect_bound": 1}, "detect_bound must be True or False"),
    ],
)
def test_constructor_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DiffQuantizer(mlp(), **kwargs)


def test_model_must_be_a_module() -> None:
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        DiffQuantizer([torch.zeros(3)])  # type: ignore[arg-type]


def test_group_size_must_divide() -> None:
    with pytest.raises(ValueError, match=r"group_size=300 does not divide .*'weight' \(shape \(64, 40\), 2560 entries\)"):
        DiffQuantizer(nn.Linear(40, 64), min_size=0, group_size=300)


def test_attaching_twice_is_refused() -> None:
    model = mlp()
    DiffQuantizer(model, min_size=0)
    with pytest.raises(ValueError, match="already has a parameter named '0.weight_diffq'"):
        DiffQuantizer(model, min_size=0)


def test_nothing_to_quantize_warns() -> None:
    with pytest.warns(UserWarning, match="found nothing to quantize"):
        DiffQuantizer(nn.Linear(2, 2))


def test_eval_with_grad_keeps_gradients_of_float_parameters() -> None:
    model = mlp()
    DiffQuantizer(model, min_size=0, exclude=["*.bias"])
    model.eval()
    model(torch.randn(2, 40)).sum().backward()
    assert model[0].bias.grad is not None  # fp32-kept parameters are never swapped


def test_float16_kept_parameters_are_rounded_in_eval_only() -> None:
    layer = torch.nn.Linear(64, 8)
    with torch.no_grad():
        layer.bias.copy_(torch.linspace(0.1, 0.2, 8) + 1e-4 / 3)  # not representable in fp16
    q = DiffQuantizer(layer, min_size=0, exclude=["bias"], float16=True)
    seen = []
    layer.register_forward_pre_hook(lambda m, i: seen.append(m.bias.detach().clone()))
    layer(torch.randn(1, 64))
    layer.eval()
    layer(torch.randn(1, 64))
    assert torch.equal(seen[0], layer.bias.detach())
    assert torch.equal(seen[1], layer.bias.detach().half().float()) and not torch.equal(seen[1], seen[0])
    with q.quantized():
        assert torch.equal(layer.bias.detach(), seen[1])
    assert torch.equal(layer.bias.detach(), seen[0])


@pytest.mark.parametrize("param", ["bits", "noise"])
@pytest.mark.parametrize("group_size", [0, 4])
def test_size_gradient_equals_autograd(param: str, group_size: int) -> None:
    q = DiffQuantizer(mlp(), min_size=0, param=param, group_size=group_size, extra_bits=0.5)
    for logit in q.parameters():
        logit.data.normal_(0, 2)
    expected = torch.autograd.grad(q.model_size(), q.parameters())
    for got, want in zip(q.size_gradient(), expected):
        assert_close(got, want, rtol=1e-5, atol=1e-12)


def _one_noisy_backward(dtype: torch.dtype, **options: str) -> tuple:
    """A 64 -> 32 layer with random bits; one forward (noise drawn after seed 7) and a backward of
    a random upstream gradient through the noisy weight. Returns (layer, q, logit, upstream, seen)."""
    layer = nn.Linear(64, 32, bias=False).to(dtype)
    q = DiffQuantizer(layer, min_size=0, group_size=16, **options)
    logit = q.parameters()[0]
    logit.data.normal_(0, 1.5)
    upstream, x = torch.randn(32, 64, dtype=dtype), torch.randn(1, 64, dtype=dtype)
    seen = []
    layer.register_forward_pre_hook(lambda m, i: seen.append(m.weight))
    torch.manual_seed(7)
    layer(x)
    noisy = seen[0].detach().clone()  # the backward reuses the noisy weight's memory
    seen[0].backward(upstream)
    return layer, q, logit, upstream, [noisy]


@pytest.mark.parametrize("param", ["bits", "noise"])
@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
@pytest.mark.parametrize("sampler", ["torch", "table"])
def test_fused_noise_gradients_equal_plain_autograd(param: str, noise: str, sampler: str) -> None:
    """The fused op's closed-form bits gradient equals autograd through the reference formula."""
    layer, q, logit, upstream, seen = _one_noisy_backward(torch.float32, param=param, noise=noise, noise_sampler=sampler)
    # by hand, same random source: noise = (max - min) / (2**bits - 1) * source, source = randn / 2 (torch's sampler)
    torch.manual_seed(7)
    source = noise_source(noise, sampler, (32, 64))
    w = layer.weight.detach().clone().requires_grad_()
    ref_logit = logit.detach().clone().requires_grad_()
    unit = 1 / (2 ** q.get_bits(ref_logit) - 1)
    noisy = w + ((w.max() - w.min()).detach() * unit)[:, None].repeat_interleave(16, 1).view(32, 64) * source
    noisy.backward(upstream)
    assert_close(seen[0].detach(), noisy.detach(), rtol=1e-5, atol=1e-7)
    assert_close(layer.weight.grad, w.grad, rtol=0, atol=0)
    # the backward recovers the noise as (noisy - w): off by the rounding of w + noise, at most half
    # an ulp of each noisy entry, i.e. |d log std / d logit| * sum |upstream * ulp(noisy)| / 2 per group
    log_slope = torch.autograd.grad(-torch.log(2 ** q.get_bits(ref_logit) - 1).sum(), ref_logit)[0]
    rounding = (upstream * torch.finfo(torch.float32).eps * seen[0].detach()).abs().view(32 * 64 // 16, 16).sum(1)
    bound = log_slope.abs() * rounding + 1e-5 * ref_logit.grad.abs() + 1e-12
    assert ((logit.grad - ref_logit.grad).abs() <= bound).all()
    assert ((logit.grad - ref_logit.grad).abs() > 1e-5 * ref_logit.grad.abs()).any()  # the bound is not vacuous


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_noise_gradient_exact_in_float64_and_from_the_saved_noise_in_bfloat16(dtype: torch.dtype) -> None:
    """float64 recovers the noise to 1e-12; half-precision weights keep the drawn noise itself."""
    layer, q, logit, upstream, seen = _one_noisy_backward(dtype)
    torch.manual_seed(7)
    source = noise_source("gaussian", "table", (32, 64), dtype=dtype)  # the CPU default
    w = layer.weight.detach()
    ref_logit = logit.detach().clone().requires_grad_()
    unit = 1 / (2 ** q.get_bits(ref_logit) - 1)
    std = ((w.max() - w.min()).double() * unit)[:, None].repeat_interleave(16, 1).view(32, 64)
    terms = upstream.double() * source.double() * std
    terms.sum().backward()
    if dtype == torch.float64:  # only the float32 bits arithmetic rounds
        assert_close(logit.grad, ref_logit.grad, rtol=2e-5, atol=1e-12)
    else:  # bfloat16 products and sums: within 2**-6 of the sum of the magnitudes of each group's terms
        log_slope = torch.autograd.grad(-torch.log(2 ** q.get_bits(ref_logit) - 1).sum(), ref_logit)[0]
        magnitude = terms.abs().view(-1, 16).sum(1) * log_slope.abs()
        assert ((logit.grad - ref_logit.grad).abs() <= 2**-6 * magnitude + 1e-12).all()


def test_each_pending_graph_keeps_its_own_noise() -> None:
    """Two forwards before one backward: the second draws into a new buffer, not the first's."""
    model = mlp()
    q = DiffQuantizer(model, min_size=0)
    x = torch.randn(8, 40)
    model(x).sum().backward()  # the buffers are now free for reuse
    seen = []
    model[0].register_forward_pre_hook(lambda m, i: seen.append(m.weight.detach().clone()))
    first = model(x)
    second = model(x)
    assert not torch.equal(seen[0], seen[1])
    (first.sum() + second.sum()).backward()  # would raise if the first graph's noise had been overwritten
    assert q.parameters()[0].grad is not None


def test_retained_graph_after_reuse_raises_instead_of_using_new_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diffq_module, "BATCH_NUMEL", 0)  # each weight drawn alone, into its reused buffer
    model = mlp()
    DiffQuantizer(model, min_size=0)
    x = torch.randn(8, 40)
    out = model(x).sum()
    out.backward(retain_graph=True)
    model(x).sum().backward()  # refills the buffers the retained graph saved
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_retained_graph_of_weights_drawn_together_keeps_its_own_noise() -> None:
    """Small weights drawn together get new tensors every step, none modified in place: the
    retained graph's second backward gives its own gradients again."""
    model = mlp()
    q = DiffQuantizer(model, min_size=0)
    assert len(q._small_weights()) == len(q.quantized_params())
    x = torch.randn(8, 40)
    out = model(x).sum()
    out.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).sum().backward()  # new noise
    second = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert not torch.equal(first["0.weight"], second["0.weight"])
    out.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, first[name] + second[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("group_size", [0, 8])
def test_size_penalty_in_backward_equals_autograd_of_the_full_objective(group_size: int) -> None:
    model = mlp()
    q = DiffQuantizer(model, min_size=0, group_size=group_size)
    for logit in q.parameters():
        logit.data.normal_(0, 1)
    x = torch.randn(8, 40)
    rng = torch.get_rng_state()
    q.size_penalty = 2.5
    model(x).square().mean().backward()
    got = [logit.grad.clone() for logit in q.parameters()]
    q.size_penalty = 0.0
    model.zero_grad()
    torch.set_rng_state(rng)
    expected = torch.autograd.grad(model(x).square().mean() + 2.5 * q.model_size(), q.parameters())
    for g, e in zip(got, expected):
        assert_close(g, e, rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="size_penalty must be a number >= 0"):
        q.size_penalty = -1


@pytest.mark.parametrize("fused", [False, True])
def test_noise_follows_bits_updated_by_a_fused_optimizer(fused: bool) -> None:
    """Fused Adam updates in place without bumping version counters: nothing may be cached on them."""
    model = mlp()
    q = DiffQuantizer(model, min_size=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    q.setup_optimizer(optimizer, lr=0.5, fused=fused, foreach=False)
    x = torch.randn(8, 40)
    for _ in range(3):
        optimizer.zero_grad()
        (model(x).sum() + 100 * q.model_size()).backward()
        optimizer.step()
    logit = q.parameters()[0]
    unit, _, _ = q._step_constants()[logit]
    expected = 1 / (torch.exp2(q.get_bits(logit.detach())) - 1)
    assert_close(unit, expected, rtol=1e-6, atol=0)
