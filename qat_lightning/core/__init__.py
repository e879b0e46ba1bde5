"""Framework-free quantization core (plain torch)."""
from .adascale import AdaScaleResult, apply_adascale, find_blocks, round_to_nearest
from .calibrate import calibrate, calibrate_weights
from .diffq import DiffQConfig, DiffQuantizer, KeptParam, QuantizedParam
from .ema_quantizer import EMAFakeQuantizer
from .fake_quant import FakeLinearQuantization, LearnedStepWeight, LinearQuantMode, WeightRange, linear_quant_params, update_ema
from .histogram import HistogramCalibrator
from .rescaling import InputScale, RescalingCalibrator
from .uniform import uniform_dequantize, uniform_quantize

__all__ = [
    "AdaScaleResult", "apply_adascale", "find_blocks", "round_to_nearest",
    "DiffQConfig", "DiffQuantizer", "EMAFakeQuantizer", "FakeLinearQuantization", "HistogramCalibrator", "InputScale", "KeptParam",
    "LearnedStepWeight", "LinearQuantMode", "QuantizedParam", "RescalingCalibrator", "WeightRange", "calibrate", "calibrate_weights",
    "linear_quant_params", "uniform_dequantize", "uniform_quantize", "update_ema",
]  # fmt: skip
