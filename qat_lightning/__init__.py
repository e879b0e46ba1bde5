"""qat_lightning: quantization-aware training as PyTorch Lightning callbacks."""
from .calibration import HistogramCalibrator, RescalingCalibrator, apply_adascale, calibrate, calibrate_weights, round_to_nearest
from .callbacks import AdaScale, DiffQ, EMAFakeQuant, HistogramCalibration, Rescaling
from .export import load_quantized, save_quantized
from .coverage import CoverageReport
from .formats import NumberFormat, fake_quantize, parse_format, register_format
from .layers import register_layer
from .quantizers import DiffQConfig, DiffQuantizer, EMAFakeQuantizer, FakeLinearQuantization

__all__ = [
    "AdaScale", "CoverageReport", "DiffQ", "DiffQConfig", "DiffQuantizer", "EMAFakeQuant", "EMAFakeQuantizer", "FakeLinearQuantization",
    "HistogramCalibration", "HistogramCalibrator", "Rescaling", "RescalingCalibrator", "apply_adascale", "calibrate",
    "NumberFormat", "calibrate_weights", "fake_quantize", "load_quantized", "parse_format", "register_format", "register_layer",
    "round_to_nearest", "save_quantized",
]  # fmt: skip
__version__ = "0.1.0"
