"""Lightning callbacks: thin adapters over the core quantizers."""
from .calibration import HistogramCalibration
from .diffq import DiffQ
from .ema_fake_quant import EMAFakeQuant
from .rescaling import Rescaling

__all__ = ["DiffQ", "EMAFakeQuant", "HistogramCalibration", "Rescaling"]
