"""Lightning callbacks: thin adapters over the core quantizers."""
from .adascale import AdaScale
from .calibration import HistogramCalibration
from .diffq import DiffQ
from .ema_fake_quant import EMAFakeQuant
from .rescaling import Rescaling

__all__ = ["AdaScale", "DiffQ", "EMAFakeQuant", "HistogramCalibration", "Rescaling"]
