"""LSQ (learned step size) mode, and 32-bit bias quantization, of the EMA fake-quant pillar."""
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.testing import assert_close

from qat_lightning import EMAFakeQuant, EMAFakeQuantizer, FakeLinearQuantization
from qat_lightning.quantizers.weight import LearnedStepWeight
from qat_lightning.formats.distiller import bias_fake_quantize, weight_fake_quantize
from qat_lightning.formats.lsq import learned_step_quantize, lsq_grad_factor, lsq_range

from .helpers import tiny_loader, tiny_model, tiny_trainer


# ----------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("axis", [None, 1])
def test_learned_step_matches_torch_learnable_kernels(axis: int | None) -> None:
    """Our vectorised CPU op against torch's fused ``_fake_quantize_learnable_*`` (scalar CPU loops)."""
    x = (torch.randn(64, 32) * 2).requires_grad_()
    if axis is None:
        step, zero = torch.tensor(0.05, requires_grad=True), torch.tensor(3.0)
        reference = lambda: torch._fake_quantize_learnable_per_tensor_affine(x, step.reshape(1), zero.reshape(1), 0, 255, 0.1)  # noqa: E731
    else:
        step, zero = (torch.rand(32) * 0.05 + 0.01).requires_grad_(), torch.randint(0, 10, (32,)).float()
        reference = lambda: torch._fake_quantize_learnable_per_channel_affine(x, step, zero, axis, 0, 255, 0.1)  # noqa: E731
    grad = torch.randn(64, 32)
    ours = learned_step_quantize(x, step, zero, 0, 255, 0.1, axis)
    ours_dx, ours_ds = torch.autograd.grad(ours, (x, step), grad)
    theirs = reference()
    theirs_dx, theirs_ds = torch.autograd.grad(theirs, (x, step), grad)
    assert torch.equal(ours, theirs) and torch.equal(ours_dx, theirs_dx)
    assert_close(ours_ds.reshape(-1), theirs_ds.reshape(-1), rtol=1e-4, atol=1e-4 * theirs_ds.abs().max().item())


def test_learned_step_gradient_by_hand() -> None:
    # step 0.5, zero 0, levels [-2, 1]: x / s = [-6, -1.4, 0.6, 0.9, 5]
    x = torch.tensor([-3.0, -0.7, 0.3, 0.45, 2.5], requires_grad=True)
    step = torch.tensor(0.5, requires_grad=True)
    y = learned_step_quantize(x, step, torch.tensor(0.0), -2, 1, grad_factor=1.0)
    assert y.tolist() == [-1.0, -0.5, 0.5, 0.5, 0.5]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # outside: q_min / q_max; inside: round(x/s) - x/s
    expected = -2 + (-1 + 1.4) + (1 - 0.6) + (1 - 0.9) + 1
    assert step.grad.item() == pytest.approx(expected, rel=1e-6)


def test_lsq_ranges_and_grad_factor() -> None:
    assert lsq_range(8, "symmetric") == (-128, 127)
    assert lsq_range(8, "symmetric_restricted") == (-127, 127)
    assert lsq_range(4, "asymmetric_unsigned") == (0, 15)
    assert lsq_range(4, "asymmetric_signed") == (-8, 7)
    assert lsq_grad_factor(100, 127) == pytest.approx(1 / math.sqrt(12700))


# ----------------------------------------------------------------------------- activation quantizer
def test_activation_step_starts_from_the_tracked_range_and_then_learns() -> None:
    fq = FakeLinearQuantization(8, "asymmetric_unsigned", ema_decay=0.9, learned_step=True)
    fq.enabled = False
    fq(torch.rand(100) * 2)  # warm-up: the EMA tracks, nothing quantized yet
    assert fq.step_initialized.item() == 0 and fq.iter_count.item() == 1
    fq.enabled = True
    x = (torch.rand(100) * 3).requires_grad_()
    y = fq(x)  # first quantized training call: EMA update, then step = 1 / scale
    assert fq.iter_count.item() == 2 and fq.step_initialized.item() == 1
    assert fq.step.shape == (1,)  # 1-D: FSDP2 shards parameters, never 0-d ones
    assert_close(fq.step.detach(), (1 / fq.scale).reshape(1), rtol=0, atol=0)
    y.sum().backward()
    assert fq.step.grad is not None and fq.step.grad.abs().item() > 0
    fq(torch.rand(100) * 100)  # from now on the step is learned, the range no longer tracked
    assert fq.iter_count.item() == 2
    with torch.no_grad():
        fq.step.mul_(2)
    fq.eval()
    z = torch.linspace(0, 1, 7)
    expected = learned_step_quantize(z, fq.step, -fq.zero_point, 0, 255, 1.0)
    assert torch.equal(fq(z), expected)


def test_learned_step_state_survives_a_reload() -> None:
    fq = FakeLinearQuantization(4, "symmetric", learned_step=True)
    fq(torch.randn(50))
    other = FakeLinearQuantization(4, "symmetric", learned_step=True)
    other.load_state_dict(fq.state_dict())
    x = torch.randn(20)
    assert torch.equal(other.eval()(x), fq.eval()(x))
    assert other.iter_count.item() == 1  # no EMA update: the loaded step is used directly


def test_learned_step_needs_dequantize() -> None:
    with pytest.raises(ValueError, match="learned_step=True needs dequantize=True"):
        FakeLinearQuantization(learned_step=True, dequantize=False)
    with pytest.raises(ValueError, match="learned_step must be True or False"):
        FakeLinearQuantization(learned_step=1)


# ----------------------------------------------------------------------------- weights
def test_weight_step_starts_from_the_weight_range_per_channel() -> None:
    w = torch.randn(6, 10) * torch.logspace(-2, 0, 6)[:, None]
    lsw = LearnedStepWeight(6, 4, "symmetric", axis=0)
    assert torch.equal(lsw.eval()(w), weight_fake_quantize(w, 4, "symmetric", 0))  # eval before training
    assert lsw.initialized.item() == 0
    lsw.train()(w)
    assert_close(lsw.step.detach(), w.abs().amax(1) / 7.5, rtol=1e-6, atol=0)
    assert torch.equal(lsw.zero, torch.zeros(6))
    with pytest.raises(ValueError, match="channels and axis must both be set"):
        LearnedStepWeight(6, axis=None)


def test_quantizer_lists_step_parameters_and_trains_them() -> None:
    model = tiny_model().net  # Linear, ReLU, Linear
    fq = EMAFakeQuantizer(model, weight_bits=4, activation_bits=4, learned_step=True).prepare()
    steps = fq.parameters()
    assert len(steps) == 2 + 3  # two weights, three activation quantizers
    assert all(any(p is q for q in model.parameters()) for p in steps)
    assert "0.weight_fake_quant.step" in model.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, target = torch.randn(64, 16), torch.randint(0, 8, (64,))
    before = [p.detach().clone() for p in steps]
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, steps))
    fq.remove()
    assert "0.weight_fake_quant.step" not in model.state_dict() and not hasattr(model[0], "weight_fake_quant")
    assert fq.parameters() == []


# ----------------------------------------------------------------------------- bias
def test_bias_is_quantized_to_a_32_bit_grid() -> None:
    b = torch.randn(100) * 0.1
    q = bias_fake_quantize(b)
    scale = (2**31 - 1) / b.abs().max().double()
    assert torch.equal(q, ((b.double() * scale).round() / scale).float())  # the int32 grid, stored as float32
    assert ((q.double() - b.double()).abs() <= 0.5 / scale + b.abs().double() * 2**-24).all()
    assert torch.equal(bias_fake_quantize(torch.zeros(3)), torch.zeros(3))


def test_quantize_bias_swaps_biases_and_counts_them() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    plain = EMAFakeQuantizer(model).prepare()
    size_plain = plain.model_size()
    plain.remove()
    fq = EMAFakeQuantizer(model, quantize_bias=True).prepare()
    seen = []
    model[0].register_forward_pre_hook(lambda m, i: seen.append(m.bias))  # runs after the swap
    x = torch.randn(3, 8, requires_grad=True)
    model(x).sum().backward()
    assert not isinstance(seen[-1], nn.Parameter) and torch.equal(seen[-1], bias_fake_quantize(model[0].bias))
    assert model[0].bias.grad is not None  # identity gradient
    assert fq.model_size() == pytest.approx(size_plain + 32 / (8 * 2**20))  # one fp32 scale more


# ----------------------------------------------------------------------------- callback
def test_callback_gives_steps_their_own_param_group_and_freezes_them() -> None:
    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self.snapshots.append([p.detach().clone() for p in ema.quantizer.parameters()])

        snapshots: list = []

    ema, probe = EMAFakeQuant(learned_step=True, step_lr=1e-2, freeze_step=3), Probe()
    trainer = tiny_trainer(max_epochs=2, callbacks=[ema, probe])
    trainer.fit(tiny_model(), tiny_loader())
    optimizer = trainer.optimizers[0]
    group = optimizer.param_groups[-1]
    steps = ema.quantizer.parameters()
    assert group["lr"] == 1e-2 and group["weight_decay"] == 0.0 and len(group["params"]) == len(steps)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len({id(p) for p in trainer.lightning_module.parameters()})
    moved = [not torch.equal(a, b) for a, b in zip(probe.snapshots[0], probe.snapshots[2])]
    assert any(moved)
    for later in probe.snapshots[3:]:  # global_step >= 3: frozen
        assert all(torch.equal(a, b) for a, b in zip(probe.snapshots[3], later))


def test_callback_resume_with_learned_steps_is_exact(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    full = EMAFakeQuant(learned_step=True, quantize_bias=True)
    tiny_trainer(tmp_path, max_epochs=2, callbacks=[full]).fit(tiny_model(), tiny_loader())
    expected = {k: v.clone() for k, v in full.quantizer.model.state_dict().items()}

    first = EMAFakeQuant(learned_step=True, quantize_bias=True)
    tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[first, ckpt]).fit(tiny_model(), tiny_loader())
    resumed = EMAFakeQuant(learned_step=True, quantize_bias=True)
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[resumed])
    trainer.fit(tiny_model(), tiny_loader(), ckpt_path=tmp_path / "last.ckpt")
    for key, value in trainer.lightning_module.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learned_step": "yes"}, "learned_step must be True or False"),
        ({"quantize_bias": 1}, "quantize_bias must be True or False"),
        ({"step_lr": 0}, "step_lr must be a number > 0"),
        ({"step_weight_decay": -1}, "step_weight_decay must be a number >= 0"),
    ],
)
def test_callback_lsq_argument_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EMAFakeQuant(**kwargs)


def test_default_step_lr_is_a_tenth_of_the_model_lr() -> None:
    ema = EMAFakeQuant(learned_step=True)
    trainer = tiny_trainer(max_steps=1, callbacks=[ema])
    trainer.fit(tiny_model(lr=1e-3), tiny_loader())
    assert trainer.optimizers[0].param_groups[-1]["lr"] == pytest.approx(1e-4)


def test_collapsed_step_sizes_are_named_after_each_epoch() -> None:
    """A step-size lr as large as the weights' drives steps through zero: the channel dies silently
    unless someone says so."""
    ema = EMAFakeQuant(learned_step=True, step_lr=1.0)
    with pytest.warns(UserWarning, match=r"LSQ step sizes collapsed to their floor \(1e-8\) in \{'net\.\d.*lower step_lr"):
        tiny_trainer(max_epochs=1, callbacks=[ema]).fit(tiny_model(), tiny_loader())
    assert ema.quantizer.collapsed_steps()
    healthy = EMAFakeQuant(learned_step=True)
    tiny_trainer(max_epochs=1, callbacks=[healthy]).fit(tiny_model(), tiny_loader())
    assert healthy.quantizer.collapsed_steps() == {}


def test_a_checkpoint_with_a_zero_dimensional_step_still_loads() -> None:
    """Steps were 0-d before FSDP2 support made them 1-D: older checkpoints load into the new shape."""
    fq = FakeLinearQuantization(8, "asymmetric_unsigned", learned_step=True)
    state = {k: v.clone() for k, v in fq.state_dict().items()}
    state["step"] = torch.tensor(0.25)
    fq.load_state_dict(state)
    assert fq.step.shape == (1,) and fq.step.item() == 0.25
    weight = LearnedStepWeight(None, 4, "symmetric", None)
    state = {k: v.clone() for k, v in weight.state_dict().items()}
    state["step"] = torch.tensor(0.5)
    weight.load_state_dict(state)
    assert weight.step.shape == (1,) and weight.step.item() == 0.5
