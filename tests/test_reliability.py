"""Reliability: unsupported setups refused with the reason, NaN/Inf never stored, property-based
round trips, awkward models and training setups."""
from __future__ import annotations

import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning import AdaScale, DiffQ, DiffQuantizer, EMAFakeQuant, HistogramCalibration, Rescaling
from qat_lightning.callbacks._param_groups import check_trainer
from qat_lightning.quantizers.activation import FakeLinearQuantization
from qat_lightning.export.packing import pack_levels, save_quantized, unpack_levels
from qat_lightning.formats.uniform import uniform_dequantize, uniform_quantize

from .helpers import tiny_loader, tiny_model, tiny_trainer

ALL_CALLBACKS = [DiffQ, EMAFakeQuant, HistogramCalibration, Rescaling, AdaScale]


# ----------------------------------------------------------------------------- refused setups
@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
@pytest.mark.parametrize("callback", ALL_CALLBACKS, ids=lambda c: c.__name__)
def test_sharded_strategies_are_refused_with_the_reason(strategy: str, callback: type) -> None:
    """FSDP2 (ModelParallelStrategy) trains with DiffQ and EMAFakeQuant (tests/test_fsdp.py); every
    other pairing is refused, and FSDP1 / DeepSpeed users of those two are pointed at FSDP2."""
    trainer = types.SimpleNamespace(strategy=type(strategy, (), {})())
    if strategy == "ModelParallelStrategy" and callback in (DiffQ, EMAFakeQuant):
        check_trainer(trainer, tiny_model(), callback())
        return
    fsdp2 = "ModelParallelStrategy.*" if callback in (DiffQ, EMAFakeQuant) else ""
    with pytest.raises(ValueError, match=f"{callback.__name__} does not support strategy={strategy}.*{fsdp2}'ddp'"):
        check_trainer(trainer, tiny_model(), callback())


# ----------------------------------------------------------------------------- NaN / Inf
def test_activation_nan_names_the_layer_and_keeps_the_range() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    from qat_lightning import EMAFakeQuantizer

    quantizer = EMAFakeQuantizer(model).prepare()
    model(torch.randn(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"activation quantizer \(output of 0\).*non-finite"):
        model(torch.full((8, 4), float("nan")))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "quant" in k or "tracked" in k)
    model(torch.randn(8, 4))  # the next finite batch is tracked as if the bad one never came
    assert int(quantizer.activation_quantizers()["0.output_fake_quant"].iter_count) == 2


def test_device_path_skips_a_non_finite_batch() -> None:
    fq = FakeLinearQuantization(8, "asymmetric_unsigned")
    fq.update_range(torch.tensor([-1.0, 2.0]))
    biased = fq.tracked_biased.clone()
    fq._update_on_device(torch.tensor([float("nan"), 3.0]), 2)  # what CUDA runs, on CPU tensors
    assert torch.equal(fq.tracked_biased, biased) and torch.isfinite(fq.tracked).all()


def test_diffq_refuses_to_quantize_or_pack_nan_weights(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    quantizer = DiffQuantizer(model, min_size=0, exclude=["*.bias"])
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"NaN or Inf in \['2.weight'\]"):
        quantizer.quantize()
    assert not quantizer.is_quantized and torch.isinf(model[2].weight).any()  # nothing was swapped
    path = tmp_path / "m.safetensors"
    with pytest.raises(FloatingPointError, match=r"NaN or Inf in \['2.weight'\].*nothing was written"):
        save_quantized(quantizer, path)
    assert not path.exists()


def test_lsq_stops_on_a_nan_loss_naming_the_quantizers() -> None:
    class NanLoss(type(tiny_model())):
        def training_step(self, batch, batch_idx: int) -> torch.Tensor:  # noqa: ANN001
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step == 1 else loss

    torch.manual_seed(0)
    from qat_lightning.demo import MLP

    model = NanLoss(MLP(in_features=16, hidden=(32,), num_classes=8), num_classes=8)
    with pytest.raises(FloatingPointError, match=r"(quantizer \(net\.0\.weight\)|output of net\.\d\)).*LSQ step size is NaN or Inf"):
        tiny_trainer(callbacks=[EMAFakeQuant(learned_step=True)], max_steps=4).fit(model, tiny_loader())


def test_lsq_check_on_other_devices_names_every_broken_quantizer() -> None:
    from qat_lightning import EMAFakeQuantizer

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    quantizer = EMAFakeQuantizer(model, learned_step=True).prepare()
    model(torch.randn(8, 4))
    quantizer.check_finite()
    with torch.no_grad():
        model[2].weight_fake_quant.step[1] = float("inf")
    with pytest.raises(FloatingPointError, match=r"LSQ step sizes of \['2.weight'\]"):
        quantizer.check_finite()


def test_a_nan_bits_logit_is_named_before_it_reaches_the_weights(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    quantizer = DiffQuantizer(model, min_size=0, exclude=["*.bias"])
    with torch.no_grad():
        model[2].weight_diffq[3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"NaN or Inf in \['2.weight \(its bits, 2.weight_diffq\)'\]"):
        quantizer.quantize()
    assert not quantizer.is_quantized
    with pytest.raises(FloatingPointError, match=r"2.weight \(its bits.*nothing was written"):
        save_quantized(quantizer, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_nan_weights_at_fit_end_are_named_not_a_conversion_error(tmp_path: Path) -> None:
    class Diverging(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            if trainer.global_step == 4:
                with torch.no_grad():
                    pl_module.net[2].weight[0, 0] = float("nan")

    diffq = DiffQ(min_size=0, exclude=["*.bias"], export_path="packed.safetensors")
    with pytest.raises(FloatingPointError, match=r"end of fit.*NaN or Inf in \['net.2.weight'\].*packed.safetensors not written"):
        tiny_trainer(tmp_path, callbacks=[diffq, Diverging()], max_epochs=1).fit(tiny_model(), tiny_loader())
    assert not (tmp_path / "packed.safetensors").exists()


def test_nan_in_a_calibration_batch_names_the_quantizer() -> None:
    from qat_lightning import EMAFakeQuantizer, calibrate
    from qat_lightning.calibration.histogram import HistogramCalibrator

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    EMAFakeQuantizer(model).prepare()
    batch = torch.randn(8, 4)
    batch[3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"calibrate\(\): NaN or Inf reaches the activation quantizer '0.output_fake_quant' \(batch 1\)"):
        calibrate(model, [torch.randn(8, 4).abs(), batch], method="max")  # the first quantizer to see it
    with pytest.raises(FloatingPointError, match="nothing was collected"):
        HistogramCalibrator().collect(torch.tensor([1.0, float("inf")]))


def test_nan_statistics_are_refused_before_rescaling() -> None:
    from qat_lightning import RescalingCalibrator

    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    calibrator = RescalingCalibrator(model, inplace=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrator(torch.full((2, 4), float("nan")))
    with pytest.raises(FloatingPointError, match=r"NaN or Inf in the inputs or weights of \['0', '2'\].*nothing was rescaled"):
        calibrator.rescale(alpha=0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_nan_in_adascale_calibration_names_the_block() -> None:
    from qat_lightning import apply_adascale

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    data = [torch.randn(8, 4), torch.full((8, 4), float("nan"))]
    with pytest.raises(FloatingPointError, match=r"apply_adascale\(\): NaN or Inf in block '0'.*batches \[1\]"):
        apply_adascale(model, data, num_iterations=2, progress=False)


def test_diffq_validation_stops_on_a_diverged_model() -> None:
    class Diverging(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            with torch.no_grad():
                pl_module.net[0].weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match="net.0.weight"):
        tiny_trainer(callbacks=[DiffQ(min_size=0, exclude=["*.bias"]), Diverging()], limit_train_batches=1, limit_val_batches=1).fit(
            tiny_model(), tiny_loader(), tiny_loader()
        )


# ----------------------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None)
@given(
    groups=st.integers(1, 12),
    group_size=st.integers(1, 9),
    bits=st.lists(st.integers(1, 15), min_size=12, max_size=12),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_quantize_dequantize_requantize_is_exact(groups: int, group_size: int, bits: list[int], scale: float, seed: int) -> None:
    """Dequantized levels quantize back to the same levels over the same range, within
    [0, 2**bits - 1], for any shape, widths and group size; each weight is at most half a step off."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(groups, group_size, generator=g) * scale
    b = torch.tensor(bits[:groups], dtype=torch.float32)[:, None]
    levels, mn, mx = uniform_quantize(p, b)
    assert (levels >= 0).all() and (levels <= 2**b - 1).all()
    q = uniform_dequantize(levels, mn, mx, b)
    step = (mx.double() - mn.double()) / (2 ** b.double() - 1)
    assert (q.double() - p.double()).abs().le(step / 2 * (1 + 1e-5) + 1e-6 * scale).all()
    # the inverse over the original range, in float64: the levels come back in every case
    span = mx.double() - mn.double()
    again = ((q.double() - mn.double()) / (span if span > 0 else 1.0) * (2 ** b.double() - 1)).round()
    assert torch.equal(again.to(torch.int16), levels)


@settings(max_examples=60, deadline=None)
@given(widths=st.lists(st.integers(1, 15), min_size=1, max_size=20), group_size=st.integers(1, 17), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip_over_widths_and_group_sizes(widths: list[int], group_size: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    group_bits = torch.tensor(widths, dtype=torch.int64)
    levels = torch.stack([torch.randint(0, 2**w, (group_size,), generator=g) for w in widths]).to(torch.int16)
    packed = pack_levels(levels, group_bits)
    assert packed.dtype == torch.uint8 and packed.numel() <= sum(-(-w * group_size // 8) for w in widths) + len(set(widths))
    assert torch.equal(unpack_levels(packed, group_bits, group_size).to(torch.int16), levels)


# ----------------------------------------------------------------------------- awkward models
class Awkward(pl.LightningModule):
    """Embedding, LSTM, GRU, Conv1d, Conv2d, ConvTranspose1d, BatchNorm, a bias-less layer, a frozen
    layer and a branch used only every other step."""

    def __init__(self, recurrent: bool = True) -> None:
        super().__init__()
        self.recurrent = recurrent
        self.embed = nn.Embedding(32, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.conv1 = nn.Conv1d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.up = nn.ConvTranspose1d(16, 16, 2, stride=2)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.sometimes = nn.Linear(16, 16)
        self.head = nn.Linear(16, 8, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.recurrent:
            x, _ = self.lstm(x)
            x, _ = self.gru(x)
        x = self.up(F.relu(self.bn(self.conv1(x.transpose(1, 2)))))  # (b, 16, 2t)
        x = x + self.conv2(x[:, None]).mean(1)
        x = self.frozen(x.mean(2))
        if self.training and self.global_step % 2:
            x = x + self.sometimes(x)
        return self.head(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:  # noqa: ANN001
        tokens, y = batch
        return F.cross_entropy(self(tokens), y)

    def validation_step(self, batch, batch_idx: int) -> None:  # noqa: ANN001
        tokens, y = batch
        self.log("val/loss", F.cross_entropy(self(tokens), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam((p for p in self.parameters() if p.requires_grad), lr=1e-2)


def _token_loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randint(0, 32, (32, 6), generator=g), torch.randint(0, 8, (32,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


class QuantizedValidation(pl.Callback):
    """Inside validation: DiffQ's true quantized weights are in the parameters (the float ones
    kept aside), and EMA fake quantization changes the output of the head (not a no-op)."""

    def __init__(self, callbacks: list) -> None:
        self.callbacks, self.checked = callbacks, 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        tokens, _ = batch
        for callback in self.callbacks:
            quantizer = callback.quantizer
            if isinstance(callback, DiffQ):
                assert quantizer.is_quantized
                for qp in quantizer.quantized_params():
                    floats = quantizer._saved[id(qp.param)]
                    assert not torch.equal(qp.param.detach(), floats), qp.name  # quantized values in place
            elif callback.options["weights"] or callback.options["activations"]:
                with torch.no_grad():
                    quantized = pl_module(tokens)
                    quantizer.set_state(enabled=False)
                    plain = pl_module(tokens)
                    quantizer.set_state(enabled=True)
                assert not torch.equal(quantized, plain)
        self.checked += 1


@pytest.mark.parametrize(
    "callbacks",
    [
        lambda: [DiffQ(min_size=0, group_size=0)],
        lambda: [EMAFakeQuant()],
        lambda: [DiffQ(min_size=0, group_size=0), EMAFakeQuant(weights=False)],
        lambda: [EMAFakeQuant(learned_step=True)],
    ],
    ids=["diffq", "ema", "diffq_ema", "lsq"],
)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_awkward_model_trains_validates_and_restores(callbacks, precision: str) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = Awkward(recurrent=precision == "32-true")  # torch's CPU LSTM has no bf16 autocast kernel (oneDNN error)
    made = callbacks()
    probe = QuantizedValidation(made)
    trainer = tiny_trainer(callbacks=[*made, probe], max_epochs=2, precision=precision, gradient_clip_val=1.0,
                           accumulate_grad_batches=2, limit_val_batches=1, val_check_interval=2)  # fmt: skip
    trainer.fit(model, _token_loader(), _token_loader())
    assert trainer.global_step == 4 and probe.checked == 4  # val_check_interval=2 batches: twice per epoch
    state = model.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    frozen_before = model.frozen.weight.detach().clone()
    trainer.validate(model, _token_loader(), verbose=False)
    after = model.state_dict()  # validation swapped quantized weights in and restored the float ones
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert torch.equal(model.frozen.weight, frozen_before)


def test_manual_optimization_with_two_optimizers_gets_the_bits_group() -> None:
    class Manual(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.body, self.head = nn.Linear(16, 32), nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(F.relu(self.body(x)))

        def training_step(self, batch, batch_idx: int) -> None:  # noqa: ANN001
            first, second = self.optimizers()
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            first.zero_grad()
            second.zero_grad()
            self.manual_backward(loss)
            first.step()
            second.step()

        def configure_optimizers(self) -> list[torch.optim.Optimizer]:
            return [torch.optim.Adam(self.body.parameters(), lr=1e-2), torch.optim.SGD(self.head.parameters(), lr=1e-2)]

    diffq = DiffQ(min_size=0, exclude=["*.bias"], penalty=1000.0, bits_lr=0.1)
    model = Manual()
    trainer = tiny_trainer(callbacks=[diffq], max_epochs=3)
    trainer.fit(model, tiny_loader())
    groups = [g for opt in trainer.optimizers for g in opt.param_groups]
    bits_groups = [g for g in groups if any(p is diffq.quantizer.parameters()[0] for p in g["params"])]
    assert len(bits_groups) == 1 and bits_groups[0]["lr"] == 0.1
    assert diffq.quantizer.average_bits(exact=True) < 8  # the penalty reached the bits
