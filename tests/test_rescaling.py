"""SmoothQuant-style rescaling: exactness of the float function, folding, scales, and its benefit."""
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from qat_lightning import EMAFakeQuant, EMAFakeQuantizer, HistogramCalibration, Rescaling, RescalingCalibrator, calibrate
from qat_lightning.quantizers.input_scale import InputScale

from .helpers import tiny_loader, tiny_model, tiny_trainer


class Block(nn.Module):
    """A pre-norm transformer block: LayerNorm -> q/k/v -> attention -> out; LayerNorm -> MLP."""

    def __init__(self, d: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        attention = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 8, dim=-1)
        x = x + self.o(attention @ self.v(h))
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class Tiny(nn.Module):
    def __init__(self, d: int = 32, outliers: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.head = nn.Linear(d, 4)
        if outliers:  # a few activation channels 40x larger than the rest and the weights that read
            with torch.no_grad():  # them 40x smaller, as in LLMs: same function, hard to quantize
                for block in self.blocks:
                    for ln, readers in ((block.ln1, (block.q, block.k, block.v)), (block.ln2, (block.fc1,))):
                        ln.weight[[3, 17]] *= 40
                        ln.bias[[3, 17]] *= 40
                        for layer in readers:
                            layer.weight[:, [3, 17]] /= 40

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)))


def _data(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 10, 8, generator=g) for _ in range(n)]


def test_float_function_unchanged_and_norms_folded() -> None:
    torch.manual_seed(0)
    model = Tiny().double()  # float64: rounding far below the tolerance
    data = [x.double() for x in _data()]
    before = [model(x) for x in data]
    calibrator = RescalingCalibrator(model)
    for x in data:
        calibrator(x)
    rescaled = calibrator.rescale(alpha=0.5)
    assert rescaled is not model  # inplace=False: the caller's model is untouched
    assert all(torch.equal(model(x), y) for x, y in zip(data, before))
    for x, y in zip(data, before):
        assert_close(rescaled(x), y, rtol=1e-10, atol=1e-10)
    folded = calibrator.folded()
    assert folded["blocks.0.ln1"] == ["blocks.0.q", "blocks.0.k", "blocks.0.v"] and folded["blocks.1.ln2"] == ["blocks.1.fc1"]
    scaled = {n for n, m in rescaled.named_modules() if isinstance(m, InputScale)}
    assert scaled == {f"blocks.{i}.{name}.input_scale" for i in (0, 1) for name in ("o", "fc2")} | {"embed.input_scale", "head.input_scale"}


def test_scales_follow_the_formula() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(50, 4) * torch.tensor([1.0, 10.0, 0.1, 3.0])
    x_max = model[0](x).abs().amax(0)
    w_max = model[1].weight.abs().amax(0)
    w_before, ln_before = model[1].weight.detach().clone(), model[0].weight.detach().clone()
    calibrator = RescalingCalibrator(model, inplace=True)
    calibrator(x)
    calibrator.rescale(alpha=0.75)
    s = (x_max.pow(0.75) / w_max.pow(0.25)).clamp(min=1e-5)
    assert_close(model[1].weight, w_before * s, rtol=1e-6, atol=0)
    assert_close(model[0].weight, ln_before / s, rtol=1e-6, atol=0)


def test_inplace_and_excluded_modules() -> None:
    torch.manual_seed(0)
    model = Tiny()
    q_before = model.blocks[0].q.weight.detach().clone()
    calibrator = RescalingCalibrator(model, inplace=True, excluded_modules=[nn.Conv1d, model.blocks[0]])
    calibrator(_data(1)[0])
    assert calibrator.rescale() is model
    assert torch.equal(model.blocks[0].q.weight, q_before)  # excluded instance: everything inside it
    assert not torch.equal(model.blocks[1].q.weight, Tiny().blocks[1].q.weight)
    with pytest.raises(ValueError, match="is not a submodule of model"):
        RescalingCalibrator(model, excluded_modules=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="excluded_modules must contain nn.Module types or instances"):
        RescalingCalibrator(model, excluded_modules=["blocks"])


def test_conv_and_grouped_conv_fold_into_batchnorm_and_keep_the_function() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, groups=4), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model.eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].weight.uniform_(0.5, 20)
    x = torch.randn(2, 3, 12, 12)
    y = model(x)
    calibrator = RescalingCalibrator(model)
    calibrator(x)
    rescaled = calibrator.rescale()
    assert calibrator.folded() == {"1": ["2"]}
    assert_close(rescaled(x), y, rtol=1e-5, atol=1e-5)


def test_untraceable_model_falls_back_to_scale_modules() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln(x)
            return self.fc(h) if h.sum() > 0 else -self.fc(h)  # data-dependent: fx cannot trace

    torch.manual_seed(0)
    model, x = Branchy(), torch.randn(5, 6) * 3
    y = model(x)
    with pytest.warns(UserWarning, match="cannot trace"):
        calibrator = RescalingCalibrator(model)
    calibrator(x)
    assert_close(calibrator.rescale()(x), y, rtol=1e-5, atol=1e-5)
    assert calibrator.folded() == {}


def test_errors() -> None:
    calibrator = RescalingCalibrator(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no statistics"):
        calibrator.rescale()
    calibrator(torch.randn(1, 2))
    with pytest.raises(ValueError, match="alpha must be a number >= 0 and <= 1"):
        calibrator.rescale(alpha=1.5)
    calibrator.rescale()
    with pytest.raises(RuntimeError, match="already rescaled"):
        calibrator(torch.randn(1, 2))
    with pytest.raises(ValueError, match="inplace must be True or False"):
        RescalingCalibrator(nn.Linear(2, 2), inplace=None)


def _w8a8_error(model: nn.Module, data: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Relative output error with 8-bit weights (per channel) and 8-bit inputs of every Linear."""
    quantizer = EMAFakeQuantizer(model, activation_mode="asymmetric_signed", activation_types=(nn.LayerNorm, InputScale, nn.ReLU))
    quantizer.prepare()
    calibrate(model, data, method="max", weights=False)
    model.eval()
    with torch.no_grad():
        errors = [((model(x) - y).norm() / y.norm()).item() for x, y in zip(data, reference)]
    quantizer.remove()
    return sum(errors) / len(errors)


def test_rescaling_shrinks_the_w8a8_error_with_outlier_channels() -> None:
    torch.manual_seed(0)
    model, data = Tiny(), _data()
    with torch.no_grad():
        reference = [model(x) for x in data]
    plain = _w8a8_error(Tiny_copy(model), data, reference)
    calibrator = RescalingCalibrator(model)
    for x in data:
        calibrator(x)
    smoothed = _w8a8_error(calibrator.rescale(alpha=0.5), data, reference)
    print(f"W8A8 relative output error: plain {plain:.4f}, rescaled {smoothed:.4f}")
    assert smoothed < plain / 4


def Tiny_copy(model: nn.Module) -> nn.Module:  # noqa: N802
    import copy

    return copy.deepcopy(model)


# ----------------------------------------------------------------------------- callback
def test_callback_rescales_once_before_calibration_and_training() -> None:
    import lightning.pytorch as pl

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if trainer.global_step == 0:
                ema.quantizer.set_state(enabled=False)
                pl_module.eval()
                with torch.no_grad():
                    self.after = pl_module(x)
                pl_module.train()
                ema.quantizer.set_state(enabled=True)
                self.calibrated_counts = [q.iter_count.item() for q in ema.quantizer.activation_quantizers().values()]

    model, x = tiny_model(), torch.randn(16, 16)
    model.eval()
    with torch.no_grad():
        before = model(x)
    rescaling, ema, probe = Rescaling(alpha=0.5, num_batches=2), EMAFakeQuant(), Probe()
    calibration = HistogramCalibration(num_batches=1, num_bins=64, start_bin=8)
    tiny_trainer(max_steps=1, callbacks=[rescaling, ema, calibration, probe]).fit(model, tiny_loader())
    assert rescaling.rescaled and probe.calibrated_counts == [1.0] * 5  # 3 layers + 2 input_scale outputs
    assert any(isinstance(m, InputScale) for m in model.modules())
    assert_close(probe.after, before, rtol=1e-5, atol=1e-5)  # float function unchanged by the rescaling
    assert not torch.equal(model.net[0].weight, tiny_model().net[0].weight)


def test_calibration_listed_first_still_sees_the_rescaled_model() -> None:
    rescaling, ema = Rescaling(num_batches=1), EMAFakeQuant()
    calibration = HistogramCalibration(num_batches=1, num_bins=64, start_bin=8)
    tiny_trainer(max_steps=1, callbacks=[ema, calibration, rescaling]).fit(tiny_model(), tiny_loader())
    assert rescaling.rescaled and calibration.calibrated
    assert len(calibration.ranges) == 5  # the input_scale outputs existed and were calibrated


def test_callback_arguments() -> None:
    for kwargs, match in [({"alpha": -0.1}, "alpha must be a number >= 0 and <= 1"), ({"num_batches": 0}, "num_batches must be an integer >= 1"), ({"exclude": "fc"}, "exclude must be a list")]:
        with pytest.raises(ValueError, match=match):
            Rescaling(**kwargs)
