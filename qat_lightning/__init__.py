"""qat_lightning: quantization-aware training as PyTorch Lightning callbacks."""
from .callbacks import DiffQ, EMAFakeQuant
from .core import DiffQConfig, DiffQuantizer, EMAFakeQuantizer, FakeLinearQuantization

__all__ = ["DiffQ", "DiffQConfig", "DiffQuantizer", "EMAFakeQuant", "EMAFakeQuantizer", "FakeLinearQuantization"]
__version__ = "0.1.0"
