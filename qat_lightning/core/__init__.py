"""Framework-free quantization core (plain torch)."""
from .diffq import DiffQConfig, DiffQuantizer, KeptParam, QuantizedParam
from .ema_quantizer import EMAFakeQuantizer
from .fake_quant import FakeLinearQuantization, LinearQuantMode, linear_quant_params, update_ema
from .uniform import uniform_dequantize, uniform_quantize

__all__ = [
    "DiffQConfig", "DiffQuantizer", "EMAFakeQuantizer", "FakeLinearQuantization", "KeptParam", "LinearQuantMode",
    "QuantizedParam", "linear_quant_params", "uniform_dequantize", "uniform_quantize", "update_ema",
]  # fmt: skip
