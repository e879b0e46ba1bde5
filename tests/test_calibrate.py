"""Calibration of fake-quant ranges from histograms: core functions and the Lightning callback."""
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from qat_lightning import EMAFakeQuant, EMAFakeQuantizer, HistogramCalibration, HistogramCalibrator, calibrate, calibrate_weights
from qat_lightning.quantizers.activation import FakeLinearQuantization
from qat_lightning.quantizers.weight import WeightRange

from .helpers import tiny_loader, tiny_model, tiny_trainer


def _identity_layer() -> nn.Linear:
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4))
        layer.bias.zero_()
    return layer


@pytest.mark.parametrize("method", ["entropy", "mse", "percentile", "max"])
def test_activation_range_is_the_histogram_amax(method: str) -> None:
    model = nn.Sequential(_identity_layer())
    quantizer = EMAFakeQuantizer(model, weights=False).prepare()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(256, 4, generator=g) * (1 + 3 * (torch.rand(256, 4, generator=g) > 0.99)) for _ in range(3)]
    ranges = calibrate(model, data, method=method, num_bins=512, start_bin=64)
    reference = HistogramCalibrator(num_bins=512)
    for x in data:
        reference.collect(x)
    amax = reference.compute_amax(method, start_bin=64).item()
    everything = torch.cat(data)
    expected = (max(everything.min().item(), -amax), min(everything.max().item(), amax))
    fq = quantizer.activation_quantizers()["0.output_fake_quant"]
    assert ranges["0.output_fake_quant"] == pytest.approx(expected, rel=1e-6)
    assert fq.tracked.tolist() == pytest.approx(list(expected), rel=1e-6)
    assert fq.iter_count.item() == 3 and fq.enabled and fq.observe  # switches restored
    # the EMA continues from the calibrated range, weighted as three batches
    fq.train()(torch.full((8,), 100.0))
    d = fq.ema_decay
    assert fq.tracked_max.item() == pytest.approx((expected[1] * (1 - d**3) * d + (1 - d) * 100) / (1 - d**4), rel=1e-5)


def test_nonnegative_inputs_use_unsigned_levels() -> None:
    model = nn.Sequential(_identity_layer(), nn.ReLU())
    quantizer = EMAFakeQuantizer(model, weights=False).prepare()
    data = [torch.randn(512, 4) for _ in range(2)]
    ranges = calibrate(model, data, method="mse", num_bins=256, start_bin=16)
    relu_inputs = HistogramCalibrator(num_bins=256, unsigned=True)
    for x in data:
        relu_inputs.collect(torch.relu(x))
    assert ranges["1.output_fake_quant"][0] == 0.0
    assert ranges["1.output_fake_quant"][1] == pytest.approx(relu_inputs.compute_amax("mse", start_bin=16).item(), rel=1e-6)
    assert quantizer.activation_quantizers()["1.output_fake_quant"].zero_point.item() == 0


def test_model_mode_and_weights_restored_and_weights_calibrated() -> None:
    model = tiny_model().net
    quantizer = EMAFakeQuantizer(model).prepare()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "weight_fake_quant" not in k and "output_fake_quant" not in k}
    calibrate(model, tiny_loader(), num_batches=2, weight_method="max", num_bins=256)
    assert model.training and all(m.training for m in model.modules())
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key  # float weights untouched
    ranges = quantizer.weight_quantizers()
    assert torch.equal(ranges["0.weight"].amax(model[0].weight), model[0].weight.detach().abs().amax(1))
    assert torch.equal(ranges["0.weight"].clip_ratio, torch.ones(32))  # "max": no clipping
    assert ranges["0.weight"].calibrated.item() == 1


def test_weight_clip_limits_the_range_and_the_gradient() -> None:
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -0.2, 5.0], [0.3, 0.2, -0.1]]))
    EMAFakeQuantizer(layer, activations=False).prepare()
    results = calibrate_weights(layer, method="max")
    assert torch.equal(results["weight"], torch.tensor([5.0, 0.3]))
    layer.weight_fake_quant.set_amax(torch.tensor([0.25, 0.3]), layer.weight)  # clip the outlier of row 0
    assert layer.weight_fake_quant.clip_ratio.tolist() == pytest.approx([0.05, 1.0])
    seen = []
    layer.register_forward_pre_hook(lambda m, i: seen.append(m.weight))
    layer(torch.ones(1, 3)).sum().backward()
    assert seen[-1][0].abs().max().item() == pytest.approx(128 / 510, rel=1e-6)  # Distiller: n = 127.5, 127.5 rounds to 128
    assert layer.weight.grad[0].tolist() == [1.0, 1.0, 0.0]  # clipped entry: gradient 0
    with torch.no_grad():
        layer.weight.mul_(2)  # the weights grow: the clip follows
    assert torch.allclose(layer.weight_fake_quant.amax(layer.weight), torch.tensor([0.5, 0.6]))


def test_lsq_steps_start_from_the_calibration() -> None:
    model = nn.Sequential(_identity_layer(), nn.ReLU())
    quantizer = EMAFakeQuantizer(model, learned_step=True).prepare()
    calibrate(model, [torch.randn(64, 4)], method="max", num_bins=64, start_bin=8, weight_method="max")
    fq = quantizer.activation_quantizers()["1.output_fake_quant"]
    assert fq.step_initialized.item() == 1 and fq.step.item() == pytest.approx(1 / fq.scale.item(), rel=1e-6)
    weight_q = quantizer.weight_quantizers()["0.weight"]
    assert weight_q.initialized.item() == 1
    assert torch.allclose(weight_q.step, torch.full((4,), 1 / 127))  # identity rows: amax 1, 8-bit symmetric


def test_calibrate_errors() -> None:
    with pytest.raises(ValueError, match="the model has no fake quantizers"):
        calibrate(nn.Linear(2, 2), [torch.randn(1, 2)])
    model = nn.Sequential(nn.Linear(2, 2))
    EMAFakeQuantizer(model).prepare()
    with pytest.raises(ValueError, match="empty calibration"):
        calibrate(model, [])
    with pytest.raises(ValueError, match="method must be one of"):
        calibrate(model, [torch.randn(1, 2)], method="kl")
    with pytest.raises(ValueError, match="percentile must be a number > 0 and <= 100"):
        calibrate(model, [torch.randn(1, 2)], percentile=0)
    with pytest.raises(ValueError, match="no quantized weights"):
        calibrate_weights(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="method must be one of 'max', 'mse', 'percentile'"):
        calibrate_weights(model, method="entropy")
    with pytest.raises(ValueError, match="cannot feed a batch of type str"):
        calibrate(model, ["text"])


# ----------------------------------------------------------------------------- callback
def _counts(ema: EMAFakeQuant) -> list[float]:
    return [q.iter_count.item() for q in ema.quantizer.activation_quantizers().values()]


def test_callback_calibrates_before_training_then_ema_continues() -> None:
    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if batch_idx == 0:
                self.counts = _counts(ema)

    ema, calib, probe = EMAFakeQuant(), HistogramCalibration(num_batches=2, num_bins=256, start_bin=32), Probe()
    tiny_trainer(max_epochs=1, callbacks=[ema, calib, probe]).fit(tiny_model(), tiny_loader())
    assert probe.counts == [2.0] * 3  # calibrated over two batches before the first step
    assert _counts(ema) == [6.0] * 3 and calib.calibrated and len(calib.ranges) == 3
    assert all(isinstance(q, WeightRange) and q.calibrated.item() == 1 for q in ema.quantizer.weight_quantizers().values())


def test_callback_for_post_training_quantization_with_validate() -> None:
    ema, calib = EMAFakeQuant(), HistogramCalibration(num_batches=3, method="percentile", num_bins=128)
    trainer = tiny_trainer(callbacks=[ema, calib])
    trainer.validate(tiny_model(), tiny_loader(seed=1), verbose=False)
    assert _counts(ema) == [3.0] * 3
    assert all(isinstance(q, FakeLinearQuantization) and q.enabled for q in ema.quantizer.activation_quantizers().values())


def test_callback_does_not_recalibrate_on_resume(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    callbacks = [EMAFakeQuant(), HistogramCalibration(num_batches=2, num_bins=128, start_bin=16), ckpt]
    tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=callbacks).fit(tiny_model(), tiny_loader())
    ema, calib = EMAFakeQuant(), HistogramCalibration(num_batches=2, num_bins=128, start_bin=16)
    tiny_trainer(tmp_path, max_epochs=2, callbacks=[ema, calib]).fit(tiny_model(), tiny_loader(), ckpt_path=tmp_path / "last.ckpt")
    assert _counts(ema) == [10.0] * 3  # 2 calibration + 4 + 4 steps; no second calibration


def test_callback_needs_ema_fake_quant_and_validates_arguments() -> None:
    with pytest.raises(ValueError, match="add EMAFakeQuant"):
        tiny_trainer(callbacks=[HistogramCalibration()]).fit(tiny_model(), tiny_loader())
    for kwargs, match in [
        ({"method": "kl"}, "method must be one of"),
        ({"num_batches": 0}, "num_batches must be an integer >= 1"),
        ({"weight_method": "entropy"}, "weight_method must be one of 'max', 'mse', 'percentile'"),
        ({"percentile": 120}, "percentile must be a number > 0 and <= 100"),
        ({"forward_fn": 3}, "forward_fn must be a callable"),
    ]:
        with pytest.raises(ValueError, match=match):
            HistogramCalibration(**kwargs)
