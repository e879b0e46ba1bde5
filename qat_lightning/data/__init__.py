"""Embedded datasets (generated locally, no download)."""
from .mnist1d import MNIST1DDataModule, generate_mnist1d

__all__ = ["MNIST1DDataModule", "generate_mnist1d"]
