"""Lightning callbacks: thin adapters over the core quantizers."""
from .diffq import DiffQ

__all__ = ["DiffQ"]
