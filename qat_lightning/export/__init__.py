"""Deployable files: bit-packed safetensors (DiffQ), ONNX with QDQ pairs, plain state dicts with
quantized weights (``save_pretrained`` after QAT), torchao's quantized inference
(``convert_to_torchao``), and the checkpoint CLI (``python -m qat_lightning.export <ckpt> <out>``)."""
from .inference import convert_to_torchao
from .packing import load_quantized, read_quantized, save_quantized
from .plain import quantized_state_dict, save_pretrained_quantized

__all__ = ["convert_to_torchao", "load_quantized", "quantized_state_dict", "read_quantized", "save_pretrained_quantized", "save_quantized"]
