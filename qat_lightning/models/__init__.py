"""Demo LightningModules for the Hydra app."""
from .classifier import Classifier
from .nets import CNN1D, MLP, TinyTransformer, TransformerBlock

__all__ = ["CNN1D", "MLP", "Classifier", "TinyTransformer", "TransformerBlock"]
