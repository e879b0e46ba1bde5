"""A callback meets a second model, or a checkpoint written with other options: it re-attaches,
or refuses with every changed option named; never silently float, never the old grid."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from qat_lightning import AdaScale, DiffQ, EMAFakeQuant, FakeLinearQuantization, HistogramCalibration, Rescaling
from qat_lightning.quantizers.weight import LearnedStepWeight

from .helpers import tiny_loader, tiny_model, tiny_trainer

SMALL = dict(min_size=0, exclude=["*.bias"])


# ----------------------------------------------------------------------------- a second model
def _diffq_quantized(callbacks: list, model: torch.nn.Module) -> bool:
    diffq = callbacks[0]
    return diffq.quantizer.model is model and any(n.endswith("_diffq") for n, _ in model.named_parameters())


def _ema_quantized(callbacks: list, model: torch.nn.Module) -> bool:
    quantizers = [m for m in model.modules() if isinstance(m, FakeLinearQuantization)]
    return bool(quantizers) and all(q.has_range for q in quantizers) and callbacks[0].quantizer.model is model


def _calibrated(callbacks: list, model: torch.nn.Module) -> bool:
    quantizers = [m for m in model.modules() if isinstance(m, FakeLinearQuantization)]
    return callbacks[1].calibrated and bool(callbacks[1].ranges) and all(q.has_range for q in quantizers)


def _rescaled(callbacks: list, model: torch.nn.Module) -> bool:
    return callbacks[0].rescaled and callbacks[0].calibrator.model is model


def _adascaled(callbacks: list, model: torch.nn.Module) -> bool:
    steps = [m for m in model.modules() if isinstance(m, LearnedStepWeight)]
    return bool(steps) and all(m._has_state() for m in steps) and callbacks[0].result.quantizer.model is model


SECOND_FIT = {
    "diffq": (lambda: [DiffQ(**SMALL)], _diffq_quantized),
    "ema": (lambda: [EMAFakeQuant()], _ema_quantized),
    "lsq": (lambda: [EMAFakeQuant(learned_step=True)], _ema_quantized),
    "calibration": (lambda: [EMAFakeQuant(), HistogramCalibration(num_batches=1, num_bins=64, start_bin=8)], _calibrated),
    "rescaling": (lambda: [Rescaling(num_batches=1)], _rescaled),
    "adascale": (lambda: [AdaScale(num_batches=1, num_iterations=2, progress=False)], _adascaled),
}


@pytest.mark.parametrize("case", list(SECOND_FIT))
def test_the_same_callbacks_fitting_a_second_model_quantize_it(case: str) -> None:
    make, quantized = SECOND_FIT[case]
    callbacks = make()
    first = tiny_model()
    tiny_trainer(callbacks=callbacks, max_steps=2).fit(first, tiny_loader())
    assert quantized(callbacks, first)
    second = tiny_model()
    tiny_trainer(callbacks=callbacks, max_steps=2).fit(second, tiny_loader())
    assert quantized(callbacks, second)


# ----------------------------------------------------------------------------- checkpoints and options
def _checkpoint(tmp_path: Path, callbacks: list) -> Path:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    tiny_trainer(tmp_path, enable_checkpointing=True, callbacks=[*callbacks, ckpt]).fit(tiny_model(), tiny_loader())
    return tmp_path / "ckpt" / "last.ckpt"


CHANGED = {
    "group_size": ([DiffQ(**SMALL)], lambda: [DiffQ(group_size=4, **SMALL)], ["group_size: checkpoint 8, asked 4"]),
    "bits range": ([DiffQ(**SMALL)], lambda: [DiffQ(min_bits=3, max_bits=12, **SMALL)],
                   ["min_bits: checkpoint 2, asked 3", "max_bits: checkpoint 15, asked 12"]),
    "suffix": ([DiffQ(**SMALL)], lambda: [DiffQ(suffix="_bits", **SMALL)], ["suffix: checkpoint '_diffq', asked '_bits'"]),
    "exclude": ([DiffQ(**SMALL)], lambda: [DiffQ(min_size=0)], ["exclude: checkpoint ['*.bias'], asked []"]),
    "activation_bits": ([EMAFakeQuant()], lambda: [EMAFakeQuant(activation_bits=4)], ["activation_bits: checkpoint 8, asked 4"]),
    "learned_step": ([EMAFakeQuant()], lambda: [EMAFakeQuant(learned_step=True)], ["learned_step: checkpoint False, asked True"]),
    "lsq off": ([EMAFakeQuant(learned_step=True)], lambda: [EMAFakeQuant()], ["learned_step: checkpoint True, asked False"]),
    "adascale bits": ([AdaScale(bits=4, num_batches=1, num_iterations=2, progress=False)],
                      lambda: [AdaScale(bits=3, num_batches=1, num_iterations=2, progress=False)], ["bits: checkpoint 4, asked 3"]),
}


@pytest.mark.parametrize("stage", ["fit", "test"])
@pytest.mark.parametrize("case", list(CHANGED))
def test_a_checkpoint_with_other_quantization_options_is_refused_naming_each(case: str, stage: str, tmp_path: Path) -> None:
    written, asked, messages = CHANGED[case]
    path = _checkpoint(tmp_path, written)
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=asked())
    with pytest.raises(ValueError, match="the checkpoint was written with other quantization options") as error:
        if stage == "fit":
            trainer.fit(tiny_model(), tiny_loader(), ckpt_path=path)
        else:
            trainer.test(tiny_model(), tiny_loader(), ckpt_path=path, verbose=False)
    for message in messages:
        assert message in str(error.value)


def test_training_options_may_change_on_resume_with_a_warning(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, [DiffQ(**SMALL)])
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[DiffQ(init_bits=6, bits_lr=0.05, **SMALL)])
    with pytest.warns(UserWarning, match=r"DiffQ: resuming with training options that differ.*init_bits: checkpoint 8, now 6.*bits_lr: checkpoint 0.001, now 0.05"):
        trainer.fit(tiny_model(), tiny_loader(), ckpt_path=path)
    assert trainer.current_epoch == 2


def test_a_float_checkpoint_resumed_with_diffq_is_explained(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, [])
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[DiffQ(**SMALL)])
    with pytest.raises(ValueError, match=r"holds no DiffQ state.*written without DiffQ.*strict=False"):
        trainer.fit(tiny_model(), tiny_loader(), ckpt_path=path)


def test_the_same_options_resume_silently(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    path = _checkpoint(tmp_path, [DiffQ(**SMALL), EMAFakeQuant(weights=False)])
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[DiffQ(**SMALL), EMAFakeQuant(weights=False)])
    trainer.fit(tiny_model(), tiny_loader(), ckpt_path=path)
    assert not [w for w in recwarn if "differ from the checkpoint" in str(w.message)]


def test_rescaling_with_other_excluded_modules_is_refused(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, [Rescaling(num_batches=1, exclude=["net.2"])])
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[Rescaling(num_batches=1)])
    with pytest.raises(ValueError, match=r"exclude: checkpoint \['net.2'\], asked \[\]"):
        trainer.fit(tiny_model(), tiny_loader(), ckpt_path=path)
