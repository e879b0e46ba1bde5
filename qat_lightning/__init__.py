"""qat_lightning: quantization-aware training as PyTorch Lightning callbacks."""
from .calibration import HistogramCalibrator, RescalingCalibrator, apply_adascale, calibrate, calibrate_weights, round_to_nearest
from .callbacks import AdaScale, DiffQ, EMAFakeQuant, HistogramCalibration, Rescaling
from .export import load_quantized, save_quantized
from .formats import NumberFormat, fake_quantize, parse_format, register_format
from .quantizers import DiffQConfig, DiffQuantizer, EMAFakeQuantizer, FakeLinearQuantization

__all__ = [
    "AdaScale", "DiffQ", "DiffQConfig", "DiffQuantizer", "EMAFakeQuant", "EMAFakeQuantizer", "FakeLinearQuantization",
    "HistogramCalibration", "HistogramCalibrator", "Rescaling", "RescalingCalibrator", "apply_adascale", "calibrate",
    "NumberFormat", "calibrate_weights", "fake_quantize", "load_quantized", "parse_format", "register_format", "round_to_nearest",
    "save_quantized",
]  # fmt: skip
__version__ = "0.1.0"
