"""Every constructor argument of every callback and core class: a wrong type, an out-of-range value
or an inconsistent combination raises ValueError naming the argument (one case per argument)."""
from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch import nn

from qat_lightning import (
    AdaScale, DiffQ, DiffQuantizer, EMAFakeQuant, EMAFakeQuantizer, FakeLinearQuantization, HistogramCalibration, Rescaling,
)  # fmt: skip
from qat_lightning import DiffQConfig
from qat_lightning._options import declared
from qat_lightning.calibration.histogram import HistogramCalibrator
from qat_lightning.quantizers.fake_quantizer import FakeQuantConfig
from qat_lightning.calibration.rescaling import RescalingCalibrator


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


DIFFQ_CASES = {
    "group_size": 3.5, "min_size": -0.1, "float16": "yes", "min_bits": 0, "max_bits": 16, "param": "logit",
    "noise": "laplace", "noise_sampler": "mt19937", "init_bits": 1, "extra_bits": "one", "suffix": "", "exclude": 5, "include": 6, "detect_bound": 2,
    "scale": "row", "scale_group_size": 0, "scale_dtype": "int8", "symmetric_ranges": "yes", "range_search": -1, "learn_ranges": "yes",
}  # fmt: skip
CASES: dict[type, dict[str, Any]] = {
    DiffQ: {**DIFFQ_CASES, "penalty": -1, "bits_lr": 0, "bits_weight_decay": -1, "quantize_eval": None, "quantize_on_fit_end": "no",
            "export_path": 3, "layer_report": 3.0, "seed": -1, "straight_through_fraction": 2, "range_lr": 0, "dampening": -1,
            "target_bits": 0},
    DiffQuantizer: {**DIFFQ_CASES, "model": "not a module"},
    EMAFakeQuant: {"weight_bits": 1, "activation_bits": 17, "weight_mode": "ternary", "activation_mode": "x", "per_channel": "y",
                   "ema_decay": 1.0, "weights": 0.5, "activations": "no", "quantize_inputs": 1.5, "exclude": 3, "include": 4,
                   "start_step": -1, "freeze_step": -2, "learned_step": "yes", "quantize_bias": "no", "step_lr": 0,
                   "step_weight_decay": -1, "weight_format": "int4_g31x", "activation_format": 8, "activation_position": "middle",
                   "fold_batchnorm": "yes"},
    EMAFakeQuantizer: {"model": None, "weight_bits": 0, "activation_bits": 40, "weight_mode": "x", "activation_mode": "y",
                       "per_channel": None, "ema_decay": -0.5, "weights": "w", "activations": 2, "quantize_inputs": "q",
                       "activation_types": (int,), "exclude": 1, "include": [2], "learned_step": "l", "quantize_bias": "b",
                       "weight_format": "mxfp5", "activation_format": "int9", "activation_position": 1,
                       "fold_batchnorm": 2},
    FakeLinearQuantization: {"num_bits": 1, "mode": "m", "ema_decay": 2, "dequantize": "d", "learned_step": 3},
    HistogramCalibration: {"method": "median", "num_batches": 0, "percentile": 101, "num_bins": 1, "stride": 0,
                           "start_bin": -1, "weights": "w", "weight_method": "entropy2", "forward_fn": 3},
    HistogramCalibrator: {"num_bits": 0, "axis": "x", "unsigned": "u", "num_bins": 0, "grow_method": "shrink",
                          "skip_zeros": 2, "torch_hist": "t"},
    Rescaling: {"alpha": 1.5, "num_batches": 0, "exclude": 7, "forward_fn": "f"},
    RescalingCalibrator: {"model": "m", "args": 3, "kwargs": 4, "excluded_modules": 5, "inplace": "i"},
    AdaScale: {"bits": 1, "num_batches": 0, "num_epochs": 0, "num_iterations": -5, "lr": 0, "scale_lr": -1,
               "fp_input_mix": 1.5, "block_types": [3], "forward_fn": 4, "progress": "p", "exclude": 5},
}
NEEDS_MODEL = {DiffQuantizer, EMAFakeQuantizer, RescalingCalibrator}


def _params(cls: type) -> list[str]:
    """The arguments a class takes: its signature's, or the options of its config (``**options``)."""
    configs = {DiffQuantizer: DiffQConfig, EMAFakeQuantizer: FakeQuantConfig}
    if cls in configs:
        return ["model", *declared(configs[cls])]
    return [k for k in inspect.signature(cls.__init__).parameters if k != "self"]


@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.__name__)
def test_the_table_covers_every_argument(cls: type) -> None:
    assert set(CASES[cls]) == set(_params(cls))


@pytest.mark.parametrize(
    ("cls", "argument"), [(cls, arg) for cls, cases in CASES.items() for arg in cases], ids=lambda v: getattr(v, "__name__", v)
)
def test_bad_argument_raises_value_error_naming_it(cls: type, argument: str) -> None:
    kwargs: dict[str, Any] = {"model": _model()} if cls in NEEDS_MODEL else {}
    kwargs[argument] = CASES[cls][argument]
    with pytest.raises(ValueError, match=argument):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (DiffQ, {"min_bits": 6, "init_bits": 4}, "init_bits"),
        (DiffQ, {"min_bits": 8, "max_bits": 6}, "max_bits"),
        (DiffQ, {"group_size": 7}, "group_size=7 does not divide"),
        (EMAFakeQuant, {"start_step": 10, "freeze_step": 5}, "freeze_step"),
        (EMAFakeQuant, {"weights": False, "activations": False, "quantize_inputs": False}, "nothing to quantize"),
        (DiffQ, {"extra_bits": -100}, r"extra_bits must be a number > -2 and <= 13"),
        (DiffQ, {"extra_bits": 1e300}, r"extra_bits must be a number > -2 and <= 13"),
        (DiffQ, {"min_bits": 4, "init_bits": 8, "extra_bits": -4}, r"extra_bits must be a number > -4"),
        (DiffQ, {"seed": 2**70}, r"seed must be an integer >= 0 and <= 9223372036854775807"),
        (DiffQ, {"min_size": 1e308}, r"min_size must be a number >= 0 and <= 1048576"),
        (DiffQ, {"target_bits": 33}, r"target_bits must be a number > 0 and <= 32"),
        (DiffQ, {"dampening": 1.0}, r"dampening=1.0\) damps the rounding oscillations of the straight-through phase: set straight_through_fraction > 0"),
        (DiffQ, {"suffix": ""}, r"suffix must be '_' followed by letters"),
        (DiffQ, {"suffix": ".x"}, r"suffix must be '_' followed by letters"),
        (DiffQ, {"suffix": "weight"}, r"suffix must be '_' followed by letters.*got 'weight'"),
        (DiffQuantizer, {"suffix": "_x.y"}, r"suffix must be '_' followed by letters"),
        (HistogramCalibration, {"num_bins": 10**12}, r"num_bins must be an integer >= 2 and <= 65536"),
        (HistogramCalibrator, {"num_bins": 10**12}, r"num_bins must be an integer >= 2 and <= 65536"),
        (AdaScale, {"block_types": nn.Linear}, r"block_types must be a list of nn.Module subclasses or None; got the single type Linear: write \[Linear\]"),
        (EMAFakeQuantizer, {"activation_types": nn.ReLU}, r"activation_types must be a list.*write \[ReLU\]"),
    ],
)
def test_inconsistent_combinations_are_refused(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        made = cls(**({"model": _model()} if cls in NEEDS_MODEL else {}), **kwargs)
        if isinstance(made, DiffQ):  # group sizes are checked against the model's tensors
            DiffQuantizer(_model(), min_size=0, **{k: v for k, v in kwargs.items() if k != "seed"})


def test_core_functions_refuse_what_their_callbacks_refuse() -> None:
    from qat_lightning import apply_adascale, calibrate, calibrate_weights

    model = _model()
    EMAFakeQuantizer(model).prepare()
    with pytest.raises(ValueError, match="num_bins must be an integer >= 2 and <= 65536"):
        calibrate(model, [torch.randn(2, 16)], num_bins=10**12)
    with pytest.raises(ValueError, match="num_bins must be an integer >= 2 and <= 65536"):
        calibrate_weights(model, num_bins=10**9)
    with pytest.raises(ValueError, match="block_types must be a list.*write \\[Linear\\]"):
        apply_adascale(_model(), [torch.randn(2, 16)], block_types=nn.Linear, progress=False)
    with pytest.raises(ValueError, match="seed must be an integer >= 0 and <= 9223372036854775807"):
        DiffQuantizer(_model(), min_size=0).seed_noise(2**64)


def test_freezing_ranges_before_any_was_tracked_is_refused_at_the_first_frozen_step() -> None:
    from .helpers import tiny_loader, tiny_model, tiny_trainer

    with pytest.raises(ValueError, match=r"EMAFakeQuant\(freeze_step=0\): the activation ranges are frozen at step 0 before.*HistogramCalibration"):
        tiny_trainer(callbacks=[EMAFakeQuant(freeze_step=0)], max_steps=2).fit(tiny_model(), tiny_loader())
    calibrated = [EMAFakeQuant(freeze_step=0), HistogramCalibration(num_batches=1, num_bins=64, start_bin=8)]
    tiny_trainer(callbacks=calibrated, max_steps=2).fit(tiny_model(), tiny_loader())  # calibrated ranges may be frozen at once


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_an_empty_calibration_loader_is_refused_not_a_silent_no_op(stage: str) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from .helpers import tiny_model, tiny_trainer

    empty = DataLoader(TensorDataset(torch.zeros(0, 16), torch.zeros(0, dtype=torch.long)), batch_size=4)
    for callbacks, name in (([EMAFakeQuant(), HistogramCalibration(num_batches=1)], "HistogramCalibration"),
                            ([AdaScale(num_batches=1, progress=False)], "AdaScale")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{name}: trainer.{stage}\\(\\) ran no batch.*nothing was"):
            getattr(tiny_trainer(callbacks=callbacks), stage)(tiny_model(), empty, verbose=False)


def test_empty_calibration_loader_and_nothing_to_quantize_have_clear_messages() -> None:
    from qat_lightning.calibration.calibrate import calibrate

    model = _model()
    EMAFakeQuantizer(model).prepare()
    with pytest.raises(ValueError, match="no batches"):
        calibrate(model, [], method="max", num_batches=4)
    with pytest.warns(UserWarning, match="found nothing to quantize"):
        DiffQuantizer(nn.Sequential(nn.Linear(2, 2)))  # below min_size
    with pytest.warns(UserWarning, match="found nothing to quantize"):
        EMAFakeQuantizer(nn.Sequential(nn.LayerNorm(4), nn.Tanh())).prepare()  # no weights, no activation type
