"""Trainer(precision="bf16-true" | "16-true" | "64-true") with every callback: quantizer state stays
float32, quantization math runs in float32 (float64 for float64) rounded once into the dtype."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from qat_lightning import AdaScale, DiffQ, DiffQuantizer, EMAFakeQuant, FakeLinearQuantization, HistogramCalibration, Rescaling
from qat_lightning.quantizers.weight import LearnedStepWeight, WeightRange
from qat_lightning.demo import MLP, Classifier

from .helpers import tiny_loader, tiny_trainer

PRECISIONS = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}
CALLBACKS = {
    "diffq": lambda: [DiffQ(min_size=0, penalty=5.0, bits_lr=0.05, seed=0)],
    "ema": lambda: [EMAFakeQuant()],
    "lsq": lambda: [EMAFakeQuant(learned_step=True)],
    "calibration": lambda: [EMAFakeQuant(), HistogramCalibration(num_batches=1, num_bins=64, start_bin=8)],
    "rescaling": lambda: [Rescaling(num_batches=1), EMAFakeQuant()],
    "adascale": lambda: [AdaScale(num_batches=1, num_iterations=3, progress=False)],
    "diffq_ema": lambda: [DiffQ(min_size=0, seed=0), EMAFakeQuant(weights=False)],
}


class HalfSafe(Classifier):
    """Adam with an epsilon float16 can hold (1e-8 underflows to 0 and divides by zero)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2, eps=1e-4)


def _model() -> HalfSafe:
    torch.manual_seed(0)
    return HalfSafe(MLP(in_features=16, hidden=(32,), num_classes=8), num_classes=8)


def _quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, (FakeLinearQuantization, WeightRange, LearnedStepWeight)):
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    state.update({k: v for k, v in model.state_dict().items() if k.endswith("_diffq")})
    return state


@pytest.mark.parametrize("callbacks", list(CALLBACKS))
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_every_callback_trains_and_evaluates_in_true_half_and_double(callbacks: str, precision: str) -> None:
    made = CALLBACKS[callbacks]()
    model = _model()
    trainer = tiny_trainer(callbacks=made, max_epochs=2, precision=precision, limit_val_batches=1)
    trainer.fit(model, tiny_loader(), tiny_loader())
    trainer.validate(model, tiny_loader(), verbose=False)
    dtype = PRECISIONS[precision]
    assert model.net[0].weight.dtype == dtype and torch.isfinite(model.net[0].weight).all()
    state = _quantizer_state(model)
    assert state or callbacks == "rescaling"
    for key, value in state.items():  # ranges, scales, step sizes, bits logits: float32, finite
        if value.is_floating_point():
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), key
    for callback in made:
        if isinstance(callback, DiffQ):
            assert any(bool((p != p.flatten()[0]).any()) for p in callback.quantizer.parameters())  # bits learned


def _float32_quantized(weight: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """DiffQ's quantization of ``weight`` computed in float32 (float64) by hand, rounded once."""
    wide = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(wide).reshape(bits.numel(), -1)
    mn, mx = w.min(), w.max()
    unit = 1 / (2 ** bits.to(wide)[:, None] - 1)
    return (((w - mn) / (mx - mn) / unit).round() * unit * (mx - mn) + mn).to(weight.dtype).view_as(weight)


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_diffq_validation_sees_the_float32_quantization_rounded_once(precision: str) -> None:
    class Probe(pl.Callback):
        checked = 0

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
            for qp in diffq.quantizer.quantized_params():
                assert torch.equal(qp.param.detach(), _float32_quantized(saved[qp.name], diffq.quantizer.true_bits(qp))), qp.name
            self.checked += 1

        def on_validation_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            saved.update({qp.name: diffq.quantizer._saved[id(qp.param)] for qp in diffq.quantizer.quantized_params()})

    saved: dict[str, torch.Tensor] = {}
    diffq, probe = DiffQ(min_size=0, group_size=8, min_bits=2, max_bits=15, init_bits=12, seed=0), Probe()
    model = _model()
    trainer = tiny_trainer(callbacks=[diffq, probe], max_epochs=1, precision=precision, limit_val_batches=1)
    trainer.fit(model, tiny_loader(), tiny_loader())
    assert probe.checked and {int(b) for qp in diffq.quantizer.quantized_params() for b in diffq.quantizer.true_bits(qp)} >= {12}


def test_ema_fake_quant_of_half_inputs_is_the_float32_result_rounded_once() -> None:
    fq = FakeLinearQuantization(8, "asymmetric_unsigned", ema_decay=0.0)
    x = torch.randn(4096) * 3
    fq(x)  # the range, from float32 data
    fq.eval()
    for dtype in (torch.bfloat16, torch.float16):
        half = x.to(dtype)
        assert torch.equal(fq(half), fq(half.float()).to(dtype)), dtype


def test_conversions_keep_quantizer_state_float32_and_exact() -> None:
    from qat_lightning import EMAFakeQuantizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    EMAFakeQuantizer(model, learned_step=True).prepare()
    model(torch.randn(16, 8))
    model(torch.randn(16, 8))
    before = {k: v.clone() for k, v in _quantizer_state(model).items()}
    model.to(torch.bfloat16)
    after = _quantizer_state(model)
    assert model[0].weight.dtype == torch.bfloat16
    for key, value in before.items():
        assert torch.equal(after[key], value) and after[key].dtype == value.dtype, key


def test_core_diffq_logits_converted_with_the_model_are_put_back_with_a_warning() -> None:
    model = nn.Sequential(nn.Linear(16, 16))
    quantizer = DiffQuantizer(model, min_size=0)
    model.to(torch.bfloat16)
    with pytest.warns(UserWarning, match="kept float32"):
        model(torch.randn(2, 16, dtype=torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in quantizer.parameters())


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_diffq_resume_in_half_precision_is_exact(precision: str, tmp_path: Path) -> None:
    """The logits never pass through half precision: neither the checkpoint's values nor Adam's
    state lose bits on the way back in."""

    def run(epochs: int, ckpt: Path | None = None) -> dict[str, torch.Tensor]:
        diffq = DiffQ(min_size=0, penalty=5.0, bits_lr=0.05, seed=0)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = tiny_trainer(tmp_path, callbacks=[diffq, checkpoint], max_epochs=epochs, precision=precision,
                               enable_checkpointing=True)  # fmt: skip
        model = _model()
        trainer.fit(model, tiny_loader(), ckpt_path=ckpt)
        return {k: v.clone() for k, v in model.state_dict().items()}

    full = run(2)
    run(1)
    resumed = run(2, tmp_path / "ckpt" / "last.ckpt")
    for key, value in full.items():
        assert torch.equal(resumed[key], value), key
