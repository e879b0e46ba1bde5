"""Framework-free quantization core (plain torch)."""
from .diffq import DiffQConfig, DiffQuantizer, KeptParam, QuantizedParam
from .uniform import uniform_dequantize, uniform_quantize

__all__ = ["DiffQConfig", "DiffQuantizer", "KeptParam", "QuantizedParam", "uniform_dequantize", "uniform_quantize"]
