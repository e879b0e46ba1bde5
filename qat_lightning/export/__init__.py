"""Deployable files: bit-packed safetensors (DiffQ), ONNX with QDQ pairs, and the checkpoint CLI
(``python -m qat_lightning.export <ckpt> <out>``)."""
from .packing import load_quantized, read_quantized, save_quantized

__all__ = ["load_quantized", "read_quantized", "save_quantized"]
