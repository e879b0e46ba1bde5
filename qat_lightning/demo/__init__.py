"""The demo's data (MNIST-1D, generated locally) and models (MLP, CNN, small transformer, classifier), and a character LM task (pydoc text, a tiny HF Llama)."""
from .baselines import TorchAOQAT
from .charlm import CharLlama, PydocCharsDataModule
from .classifier import Classifier
from .data import MNIST1DDataModule, generate_mnist1d
from .nets import CNN1D, MLP, TinyTransformer, TransformerBlock

__all__ = ["CNN1D", "MLP", "CharLlama", "Classifier", "PydocCharsDataModule", "TorchAOQAT", "MNIST1DDataModule", "TinyTransformer", "TransformerBlock", "generate_mnist1d"]
