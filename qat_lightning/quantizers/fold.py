"""Conv-BatchNorm folding: a BatchNorm that reads only a convolution's (or Linear's) output is folded
into that layer's weight and bias, and replaced by ``nn.Identity``; what a deployed int8 graph
runs (TensorRT, ONNX Runtime, torchao fold BatchNorm before quantizing).

With running statistics ``mean``, ``var`` and affine ``gamma``, ``beta``:
``W' = W * gamma / sqrt(var + eps)`` per output channel, ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``.
The folded model computes, in eval mode, what the unfolded one did (to float rounding); in
training it normalizes with the frozen running statistics instead of each batch's.
"""
from __future__ import annotations

import torch
from torch import nn

FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` names where the BatchNorm's only input is the layer's output and the
    layer's output feeds nothing else (found by tracing with ``torch.fx``)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as error:  # noqa: BLE001 - any tracing failure: one clear message
        raise ValueError(
            f"fold_batchnorm: torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {str(error)[:200]}), so "
            "which BatchNorm reads which convolution is unknown; fold by hand or set fold_batchnorm=False"
        ) from None
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), BATCHNORMS):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        layer, bn = modules[source.target], modules[node.target]
        channels = layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else getattr(layer, "out_features", None)
        if isinstance(layer, FOLDABLE_LAYERS) and calls[source.target] == 1 and calls[node.target] == 1 and channels == bn.num_features:
            pairs.append((source.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every foldable BatchNorm into the layer before it (in place); returns the pairs folded."""
    pairs = conv_bn_pairs(model)
    modules = dict(model.named_modules())
    for layer_name, bn_name in pairs:
        layer, bn = modules[layer_name], modules[bn_name]
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"fold_batchnorm: {bn_name} tracks no running statistics (track_running_stats=False); it cannot be folded")
        wide = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
        scale = bn.running_var.to(wide).add(bn.eps).rsqrt()
        if bn.affine:
            scale = scale * bn.weight.to(wide)
        shift = -bn.running_mean.to(wide) * scale + (bn.bias.to(wide) if bn.affine else 0)
        bias = layer.bias.to(wide) * scale if layer.bias is not None else torch.zeros_like(scale)
        layer.weight.copy_((layer.weight.to(wide) * scale.reshape(-1, *[1] * (layer.weight.dim() - 1))).to(layer.weight.dtype))
        new_bias = (bias + shift).to(layer.weight.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias)
        else:
            layer.bias.copy_(new_bias)
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, nn.Identity())
    return pairs


__all__ = ["conv_bn_pairs", "fold_batchnorm"]
