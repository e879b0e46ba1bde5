"""qat_lightning: quantization-aware training as PyTorch Lightning callbacks."""
from .core import DiffQuantizer

__all__ = ["DiffQuantizer"]
__version__ = "0.1.0"
