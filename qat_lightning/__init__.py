"""qat_lightning: quantization-aware training as PyTorch Lightning callbacks."""
from .callbacks import DiffQ
from .core import DiffQConfig, DiffQuantizer

__all__ = ["DiffQ", "DiffQConfig", "DiffQuantizer"]
__version__ = "0.1.0"
