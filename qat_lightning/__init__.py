"""qat_lightning: quantization-aware training as PyTorch Lightning callbacks."""
from .callbacks import DiffQ, EMAFakeQuant, HistogramCalibration
from .core import (
    DiffQConfig, DiffQuantizer, EMAFakeQuantizer, FakeLinearQuantization, HistogramCalibrator, calibrate, calibrate_weights,
)  # fmt: skip

__all__ = [
    "DiffQ", "DiffQConfig", "DiffQuantizer", "EMAFakeQuant", "EMAFakeQuantizer", "FakeLinearQuantization",
    "HistogramCalibration", "HistogramCalibrator", "calibrate", "calibrate_weights",
]  # fmt: skip
__version__ = "0.1.0"
