import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.testing import assert_close

from qat_lightning import DiffQ, EMAFakeQuant, EMAFakeQuantizer, FakeLinearQuantization
from qat_lightning.formats.distiller import fake_quantize, fused_fake_quantize, linear_quant_params, update_ema, weight_fake_quantize

from .helpers import tiny_loader, tiny_model, tiny_trainer


# ----------------------------------------------------------------------------- formulas by hand
@pytest.mark.parametrize(
    ("mode", "lo", "hi", "scale", "zero_point"),
    [
        ("symmetric", -2.0, 1.0, 127.5 / 2, 0.0),
        ("symmetric_restricted", -2.0, 1.0, 127 / 2, 0.0),
        ("asymmetric_unsigned", -1.0, 3.0, 255 / 4, -64.0),  # round(63.75 * -1) = -64
        ("asymmetric_signed", -1.0, 3.0, 255 / 4, 64.0),  # -64 + 128
        ("asymmetric_unsigned", 0.5, 3.0, 255 / 3, 0.0),  # range widened to include 0
    ],
)
def test_quantization_params_by_hand(mode: str, lo: float, hi: float, scale: float, zero_point: float) -> None:
    s, zp, _, _ = linear_quant_params(8, mode, torch.tensor(lo), torch.tensor(hi))
    assert s.item() == pytest.approx(scale, rel=1e-7) and zp.item() == zero_point


def test_ema_sequence_by_hand() -> None:
    fq = FakeLinearQuantization(ema_decay=0.9)
    expected_biased, values = 0.0, [1.0, 3.0, 2.0]
    for step, v in enumerate(values, start=1):
        fq(torch.tensor([0.0, v]))
        expected_biased = expected_biased * 0.9 + 0.1 * v
        assert fq.tracked_max_biased.item() == pytest.approx(expected_biased, rel=1e-6)
        assert fq.tracked_max.item() == pytest.approx(expected_biased / (1 - 0.9**step), rel=1e-6)
    assert fq.iter_count.item() == 3
    assert update_ema(torch.tensor(0.0), torch.tensor(1.0), 0.9, 1)[1].item() == pytest.approx(1.0)


def test_eval_uses_frozen_range_and_first_batch_passes_through_before_tracking() -> None:
    fq = FakeLinearQuantization(ema_decay=0.5).eval()
    x = torch.linspace(-1, 1, 11)
    assert torch.equal(fq(x), x)  # no range yet: pass-through
    fq.train()(x)
    state = {k: v.clone() for k, v in fq.state_dict().items()}
    fq.eval()(10 * x)
    for key, value in fq.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("mode", ["symmetric_restricted", "asymmetric_unsigned"])
def test_fused_kernel_equals_distiller_math_exactly(mode: str) -> None:
    # ranges chosen so that the scale is 64 exactly: both computations are then exact in float32
    lo, hi = (-127 / 64, 127 / 64) if mode == "symmetric_restricted" else (-1.0, 255 / 64 - 1)
    scale, zp, low, high = linear_quant_params(8, mode, torch.tensor(lo), torch.tensor(hi))
    assert scale.item() == 64.0
    x = torch.randn(10000) * 2
    q = torch.round(scale * torch.clamp(x, low, high) - zp)  # Distiller: linear_quantize
    expected = (q + zp) / scale  # Distiller: linear_dequantize
    assert torch.equal(fake_quantize(x, scale, zp, low, high, 8, mode), expected)  # CPU composite
    assert torch.equal(fused_fake_quantize(x, scale, zp, low, high, 8, mode), expected)  # torch's kernel


@pytest.mark.parametrize("mode", ["symmetric", "symmetric_restricted", "asymmetric_unsigned", "asymmetric_signed"])
def test_composite_and_fused_kernels_agree_per_channel(mode: str) -> None:
    """Per channel, our composite op is Distiller's ``round(scale * x - zp)``; torch's kernel is
    ``round(x * (1 / (1 / scale)) + zp)``. Both equal Distiller's formula computed in float64 but
    where ``scale * x - zp`` lies within float32 rounding of a tie (.5): there one level apart."""
    w = torch.randn(16, 64) * torch.logspace(-2, 0, 16)[:, None]
    mn, mx = torch.aminmax(w, dim=1)
    params = linear_quant_params(4, mode, mn, mx)
    scale, zero_point, low, high = (t[:, None].double() for t in params)
    levels = scale * torch.clamp(w.double(), low, high) - zero_point
    reference = ((levels.round() + zero_point) / scale).float()  # Distiller in float64
    near_tie = (levels - levels.floor() - 0.5).abs() < 1e-5
    expected_levels = levels.round() + zero_point
    for ours in (fake_quantize(w, *params, 4, mode, axis=0), fused_fake_quantize(w, *params, 4, mode, axis=0)):
        ours_levels = (ours.double() * scale).round()
        assert torch.equal(ours_levels[~near_tie], expected_levels[~near_tie])
        assert ((ours_levels - expected_levels).abs()[near_tie] <= 1).all()
        eps = torch.finfo(torch.float32).eps
        assert ((ours - reference).abs()[~near_tie] <= 2 * eps * reference.abs()[~near_tie]).all()  # rounded once


def test_composite_and_fused_kernels_are_bit_identical_on_power_of_two_scales() -> None:
    """With scales that are powers of two every product and inverse is exact: no tie can split them."""
    w = torch.randn(8, 64)
    max_abs = 7.5 / 2.0 ** torch.arange(2, 10, dtype=torch.float32)  # Distiller's 4-bit symmetric n = 7.5
    w = w / w.abs().amax(1, keepdim=True) * max_abs[:, None]
    params = linear_quant_params(4, "symmetric", -max_abs, max_abs)
    assert torch.equal(params[0], 2.0 ** torch.arange(2, 10, dtype=torch.float32))
    assert torch.equal(fake_quantize(w, *params, 4, "symmetric", axis=0), fused_fake_quantize(w, *params, 4, "symmetric", axis=0))


def test_straight_through_gradient_inside_and_zero_outside() -> None:
    fq = FakeLinearQuantization(mode="asymmetric_unsigned", ema_decay=0.0)
    fq(torch.tensor([0.0, 1.0]))  # range [0, 1]
    fq.eval()
    x = torch.tensor([-0.5, 0.0, 0.3, 0.77, 1.0, 1.5], requires_grad=True)
    fq(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_per_channel_weights_equal_per_tensor_row_by_row() -> None:
    w = torch.randn(6, 32) * torch.logspace(-2, 1, 6)[:, None]
    per_channel = weight_fake_quantize(w, 4, "symmetric", axis=0)
    for row in range(6):
        assert torch.equal(per_channel[row], weight_fake_quantize(w[row], 4, "symmetric", axis=None))
    per_tensor = weight_fake_quantize(w, 4, "symmetric", axis=None)
    assert (per_channel - w).abs()[0].max() < (per_tensor - w).abs()[0].max()  # small rows keep precision


def test_transposed_conv_uses_output_channel_axis() -> None:
    conv = nn.ConvTranspose1d(3, 5, 2)  # weight (in=3, out=5, k)
    fq = EMAFakeQuantizer(conv, activations=False).prepare()
    seen = []
    conv.register_forward_pre_hook(lambda m, i: seen.append(m.weight.detach()))
    conv(torch.randn(1, 3, 4))
    assert torch.equal(seen[0], weight_fake_quantize(conv.weight.detach(), 8, "symmetric", axis=1))
    fq.remove()


# ----------------------------------------------------------------------------- prepare / remove
def test_prepare_and_remove_round_trip() -> None:
    model = tiny_model().net
    x = torch.randn(4, 16)
    before_keys, before_out = set(model.state_dict()), model(x)
    fq = EMAFakeQuantizer(model, weight_bits=4, activation_bits=4).prepare()
    assert set(fq.activation_quantizers()) == {"0.output_fake_quant", "1.output_fake_quant", "2.output_fake_quant"}
    assert not torch.equal(model(x), before_out)
    fq.remove()
    assert set(model.state_dict()) == before_keys and torch.equal(model(x), before_out)


def test_exclude_and_inputs() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    fq = EMAFakeQuantizer(model, exclude=["2"]).prepare()
    assert set(fq.activation_quantizers()) == {"0.output_fake_quant", "1.output_fake_quant"}
    with pytest.raises(ValueError, match="quantize_inputs needs a model that is not an nn.Sequential"):
        EMAFakeQuantizer(nn.Sequential(nn.Linear(2, 2)), quantize_inputs=True).prepare()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_bits": 1}, "weight_bits must be an integer >= 2 and <= 16"),
        ({"activation_bits": 17}, "activation_bits must be an integer >= 2 and <= 16"),
        ({"weight_mode": "sym"}, "weight_mode must be one of 'symmetric'"),
        ({"activation_mode": "unsigned"}, "activation_mode must be one of"),
        ({"ema_decay": 1.0}, "ema_decay must be a number >= 0 and < 1"),
        ({"per_channel": "yes"}, "per_channel must be True or False"),
        ({"exclude": "fc"}, "exclude must be a list of fnmatch patterns"),
        ({"start_step": -1}, "start_step must be an integer >= 0"),
        ({"start_step": 5, "freeze_step": 2}, "freeze_step must be an integer >= 5"),
    ],
)
def test_callback_constructor_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EMAFakeQuant(**kwargs)


# ----------------------------------------------------------------------------- callback
def _counts(callback: EMAFakeQuant) -> list[float]:
    return [q.iter_count.item() for q in callback.quantizer.activation_quantizers().values()]


def test_ranges_update_in_training_steps_only() -> None:
    ema = EMAFakeQuant()
    trainer = tiny_trainer(max_epochs=2, num_sanity_val_steps=2, callbacks=[ema])
    trainer.fit(tiny_model(), tiny_loader(), tiny_loader(seed=1))  # 4 steps per epoch, validation each epoch
    assert _counts(ema) == [8.0] * 3
    trainer.test(trainer.lightning_module, tiny_loader(), verbose=False)
    assert _counts(ema) == [8.0] * 3


def test_start_and_freeze_steps() -> None:
    class Probe(pl.Callback):
        def __init__(self) -> None:
            self.enabled: list[bool] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self.enabled.append(next(iter(ema.quantizer.activation_quantizers().values())).enabled)

    ema, probe = EMAFakeQuant(start_step=2, freeze_step=5), Probe()
    tiny_trainer(max_epochs=2, callbacks=[ema, probe]).fit(tiny_model(), tiny_loader())
    assert probe.enabled == [False, False, True, True, True, True, True, True]
    assert _counts(ema) == [5.0] * 3  # steps 0..4 observed, frozen from step 5


def test_logs_range_summary_per_epoch(tmp_path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    trainer = tiny_trainer(max_epochs=1, logger=CSVLogger(tmp_path), callbacks=[EMAFakeQuant()])
    trainer.fit(tiny_model(), tiny_loader())
    for key in ("quant/act_range_min", "quant/act_range_max", "quant/act_scale_mean"):
        assert key in trainer.logged_metrics


def test_resume_restores_ema_buffers_exactly(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[EMAFakeQuant(), ckpt]).fit(tiny_model(), tiny_loader())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert any("output_fake_quant.tracked_biased" in k for k in saved["state_dict"])

    class Check(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            for key, value in pl_module.state_dict().items():
                assert torch.equal(value, saved["state_dict"][key]), key
            self.ok = True

    check, ema = Check(), EMAFakeQuant()
    tiny_trainer(tmp_path, max_epochs=2, callbacks=[ema, check]).fit(tiny_model(), tiny_loader(), ckpt_path=tmp_path / "last.ckpt")
    assert check.ok and _counts(ema) == [8.0] * 3


def test_with_diffq_validation_sees_quantized_weights_and_fake_quantized_activations() -> None:
    class Probe(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
            q = diffq.quantizer
            self.weights_quantized = q.is_quantized
            self.activations_on = all(f.enabled and not f.training for f in ema.quantizer.activation_quantizers().values())

    diffq, ema, probe = DiffQ(min_size=0, exclude=["*.bias"]), EMAFakeQuant(weights=False), Probe()
    tiny_trainer(max_epochs=1, callbacks=[diffq, ema, probe]).fit(tiny_model(), tiny_loader(), tiny_loader(seed=1))
    assert probe.weights_quantized and probe.activations_on
    with pytest.raises(ValueError, match=r"use EMAFakeQuant\(weights=False\) next to DiffQ"):
        tiny_trainer(callbacks=[DiffQ(), EMAFakeQuant()]).fit(tiny_model(), tiny_loader())


@pytest.mark.parametrize("mode", ["symmetric", "symmetric_restricted", "asymmetric_unsigned", "asymmetric_signed"])
@pytest.mark.parametrize("bits", [4, 8])
def test_module_parameters_equal_the_formulas(mode: str, bits: int) -> None:
    fq = FakeLinearQuantization(bits, mode, ema_decay=0.7)
    for batch in (torch.randn(50) * 3 + 1, torch.rand(50) * 2, torch.randn(50) - 4):
        fq(batch)
        scale, zero_point, low, high = linear_quant_params(bits, mode, fq.tracked_min, fq.tracked_max)
        assert_close(fq.scale, scale, rtol=1e-6, atol=0)
        assert fq.zero_point.item() == zero_point.item()
        assert_close(fq.clamp_range, torch.stack([low, high]), rtol=0, atol=0)


def test_zero_width_range_gets_scale_one() -> None:
    fq = FakeLinearQuantization(8, "asymmetric_unsigned", ema_decay=0.0)
    fq(torch.zeros(10))
    assert fq.scale.item() == 1.0 and fq.zero_point.item() == 0.0
    assert torch.equal(fq.eval()(torch.tensor([0.0, 1.0])), torch.tensor([0.0, 0.0]))


@pytest.mark.parametrize("weight_mode", ["symmetric", "asymmetric_unsigned"])
def test_prepared_model_trains_weights_and_biases(weight_mode: str) -> None:
    model = tiny_model().net
    EMAFakeQuantizer(model, weight_mode=weight_mode).prepare()
    model(torch.randn(8, 16)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mode", ["symmetric", "symmetric_restricted", "asymmetric_unsigned", "asymmetric_signed"])
@pytest.mark.parametrize("decay", [0.95, 0.3])
def test_host_bookkeeping_equals_the_device_ops_bit_for_bit(mode: str, decay: float) -> None:
    """The CPU path computes the range update on the host; CUDA uses tensor ops. Same bits."""
    host = FakeLinearQuantization(6, mode, ema_decay=decay)
    device = FakeLinearQuantization(6, mode, ema_decay=decay)
    for step, batch in enumerate([torch.randn(300) * 3 + 1, torch.rand(300), torch.randn(300) - 4] * 5, start=1):
        host.update_range(batch)
        mn, mx = torch.aminmax(batch)
        device._host.step = step
        device._update_on_device(torch.stack([mn, mx]), step)  # what CUDA runs, here on CPU tensors
        for name, value in device.state_dict().items():
            assert torch.equal(host.state_dict()[name], value), (step, name)
    x = torch.randn(1000) * 4
    fresh = FakeLinearQuantization(6, mode)
    fresh.load_state_dict(device.state_dict())  # host plan re-read from the buffers
    assert torch.equal(fresh.eval()(x), host.eval()(x))


# ----------------------------------------------------------------------------- buffers are the truth
def _ema_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    EMAFakeQuantizer(model, ema_decay=0.5).prepare()
    return model


def _fresh_output(state: dict, x: torch.Tensor) -> torch.Tensor:
    """What the state dict alone computes: a new model, prepared, loaded, in eval."""
    fresh = _ema_model()
    fresh.load_state_dict(state)
    with torch.no_grad():
        return fresh.eval()(x)


def test_deepcopy_trains_and_evaluates_on_its_own_buffers() -> None:
    import copy

    model = _ema_model()
    for _ in range(3):
        model(torch.randn(32, 8))
    twin = copy.deepcopy(model)
    for step in range(5):  # the copy trains on, with other data
        twin(torch.randn(32, 8) * (2 + step))
    fq = twin[0].output_fake_quant
    assert int(fq.iter_count) == 8 and int(model[0].output_fake_quant.iter_count) == 3
    x = torch.randn(64, 8) * 4
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), _fresh_output(twin.state_dict(), x))
        assert torch.equal(model.eval()(x), _fresh_output(model.state_dict(), x))


@pytest.mark.parametrize("write", ["copy_", "data.copy_", "numpy"])
def test_in_place_writes_to_the_buffers_are_used_in_eval(write: str) -> None:
    model = _ema_model()
    model(torch.randn(32, 8))
    model.eval()
    x = torch.randn(64, 8)
    with torch.no_grad():
        before = model(x)
        fq = model[0].output_fake_quant
        for name, value in (("scale", fq.scale / 4), ("clamp_range", fq.clamp_range * 0.25)):
            target = getattr(fq, name)
            if write == "copy_":
                target.copy_(value)
            elif write == "data.copy_":  # bypasses the version counter, as WeightAveraging's swap does
                target.data.copy_(value)
            else:
                target.numpy()[...] = value.numpy()
        after = model(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, _fresh_output(model.state_dict(), x))


def test_replaced_buffers_are_read_not_the_cached_views() -> None:
    """The CPU paths read the buffers through cached numpy views: a buffer replaced by assignment
    (a new tensor object and storage) must be seen from the next call on."""
    from qat_lightning.quantizers.weight import WeightRange

    w = torch.randn(8, 16)
    wr = WeightRange(8, num_bits=4)
    assert torch.equal(wr(w), weight_fake_quantize(w, 4, "symmetric", axis=0))  # uncalibrated: the view is cached now
    wr.clip_ratio = torch.full((8,), 0.5)
    wr.calibrated = torch.ones(())  # a new flag buffer: calibrated from here on
    expected = fake_quantize(w, *wr.quant_params(w), 4, "symmetric", axis=0)
    assert torch.equal(wr(w), expected) and not torch.equal(expected, weight_fake_quantize(w, 4, "symmetric", axis=0))
    fq = FakeLinearQuantization(num_bits=8, mode="asymmetric_unsigned", ema_decay=0.0)
    fq(torch.tensor([0.0, 1.0]))
    fq.eval()
    x = torch.tensor([0.3, 0.77, 1.5])
    fq.scale, fq.clamp_range = fq.scale / 4, fq.clamp_range * 4  # the range [0, 4]: levels 4 / 255 apart
    assert torch.equal(fq(x), fake_quantize(x, fq.scale, fq.zero_point, fq.clamp_range[0], fq.clamp_range[1], 8, "asymmetric_unsigned"))
    assert fq(x)[2].item() == pytest.approx(1.5, abs=2 / 255)


def test_weight_averaging_validation_runs_on_the_averaged_buffers() -> None:
    from lightning.pytorch.callbacks import WeightAveraging

    class Probe(pl.Callback):
        checked = 0

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
            x, _ = batch
            fresh = tiny_model()
            EMAFakeQuantizer(fresh, ema_decay=0.5).prepare()
            fresh.load_state_dict(pl_module.state_dict())
            with torch.no_grad():
                assert torch.equal(pl_module(x), fresh.eval()(x))
            self.checked += 1

    ema, probe = EMAFakeQuant(ema_decay=0.5), Probe()
    trainer = tiny_trainer(callbacks=[ema, WeightAveraging(), probe], max_epochs=3, limit_val_batches=2)
    trainer.fit(tiny_model(), tiny_loader(), tiny_loader())
    assert probe.checked == 6


@pytest.mark.parametrize("learned_step", [False, True])
def test_tied_weights_are_quantized_once_and_seen_quantized_by_every_module(learned_step: bool) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(32, 8)
            self.out = nn.Linear(8, 32, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.out(self.embed(tokens))

    torch.manual_seed(0)
    model = Tied()
    quantizer = EMAFakeQuantizer(model, weight_bits=4, activations=False, learned_step=learned_step).prepare()
    assert list(quantizer.weight_quantizers()) == ["embed.weight"]  # one quantizer for the shared tensor
    seen = {}
    for name in ("embed", "out"):
        getattr(model, name).register_forward_pre_hook(lambda m, i, name=name: seen.__setitem__(name, m.weight))
    model(torch.randint(0, 32, (4, 6)))
    expected = quantizer.weight_quantizers()["embed.weight"](model.embed.weight)
    for name in ("embed", "out"):  # both modules see the fake-quantized tensor, not the float parameter
        assert not isinstance(seen[name], nn.Parameter), name
        assert torch.equal(seen[name], expected) and not torch.equal(seen[name], model.embed.weight), name
