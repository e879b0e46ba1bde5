"""Quantizer modules and model transforms (plain torch): DiffQ's noise injection and learned bits,
the fake-quant transform with its activation and weight quantizers, weight swapping."""
from .activation import FakeLinearQuantization
from .diffq import DiffQConfig, DiffQuantizer
from .diffq_records import KeptParam, QuantizedParam
from .fake_quantizer import EMAFakeQuantizer
from .input_scale import InputScale
from .weight import LearnedStepWeight, WeightRange

__all__ = [
    "DiffQConfig", "DiffQuantizer", "EMAFakeQuantizer", "FakeLinearQuantization", "InputScale", "KeptParam",
    "LearnedStepWeight", "QuantizedParam", "WeightRange",
]  # fmt: skip
