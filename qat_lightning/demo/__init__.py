"""The demo's data (MNIST-1D, generated locally) and models (MLP, CNN, small transformer, classifier)."""
from .classifier import Classifier
from .data import MNIST1DDataModule, generate_mnist1d
from .nets import CNN1D, MLP, TinyTransformer, TransformerBlock

__all__ = ["CNN1D", "MLP", "Classifier", "MNIST1DDataModule", "TinyTransformer", "TransformerBlock", "generate_mnist1d"]
