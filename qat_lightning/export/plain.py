"""A plain model out of a QAT run: every quantized weight replaced by its quantized value, no
quantizer tensors (``*_diffq`` logits, ``*_fake_quant.*`` ranges and steps). What
``save_pretrained`` should write after QAT, so that ``from_pretrained`` gets the quantized model
and not the float one::

    state = quantized_state_dict(callback.quantizer, module=lit.net)   # lit.net: the HF model
    lit.net.save_pretrained(directory, state_dict=state)
    # or: save_pretrained_quantized(callback.quantizer, lit.net, directory)
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..quantizers.diffq import DiffQuantizer
from ..quantizers.fake_quantizer import WEIGHT_SUFFIX, EMAFakeQuantizer
from ..quantizers.swap import full_tensor, is_dtensor

Quantizer = DiffQuantizer | EMAFakeQuantizer


@contextlib.contextmanager
def _whole_steps(quantizer: EMAFakeQuantizer) -> Iterator[None]:
    """Inside: sharded LSQ steps (FSDP2) replaced by their whole tensors, so a quantizer module
    computes on plain tensors; back to the shards on exit."""
    swapped = []
    try:
        for module in quantizer._quantizer_modules():
            step = module._parameters.get("step")
            if step is not None and is_dtensor(step):
                module._parameters["step"] = nn.Parameter(step.full_tensor(), requires_grad=False)
                swapped.append((module, step))
        yield
    finally:
        for module, step in swapped:
            module._parameters["step"] = step


@torch.no_grad()
def quantized_values(quantizer: Quantizer) -> dict[int, torch.Tensor]:
    """``id(parameter) -> its quantized value`` for every weight the quantizer quantizes (under
    FSDP2 the whole tensor, gathered on every rank: call it on all of them)."""
    if isinstance(quantizer, DiffQuantizer):
        sharded = {id(e): id(e.param) for e in [*quantizer.quantized_params(), *quantizer._kept]}
        with quantizer.gathered():
            values = {sharded[id(qp)]: quantizer.quantized_weight(qp) for qp in quantizer.quantized_params()}
            values.update({sharded[id(k)]: quantizer.quantized_weight(k) for k in quantizer._kept if k.half})
        return values
    if isinstance(quantizer, EMAFakeQuantizer):
        with _whole_steps(quantizer):
            return {id(entry.param): quantizer.quantized_weight(entry, full_tensor(entry.param)) for entry in quantizer._entries}
    raise ValueError(f"quantizer must be a DiffQuantizer or an EMAFakeQuantizer (callback.quantizer); got {type(quantizer).__name__}")


def quantized_state_dict(quantizer: Quantizer, module: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The state dict of ``module`` (default: the quantized model; or any submodule of it, keys
    relative to it) with quantized weights and no quantizer tensors; under FSDP2 whole tensors,
    gathered on every rank (call it on all of them)."""
    model = quantizer.model
    module = model if module is None else module
    if not any(m is module for m in model.modules()):
        raise ValueError(f"module ({type(module).__name__}) is not part of the quantized model ({type(model).__name__})")
    suffix = quantizer.suffix if isinstance(quantizer, DiffQuantizer) else None
    values = quantized_values(quantizer)
    state = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if f"{WEIGHT_SUFFIX}." in name or (suffix is not None and name.endswith(suffix)):  # every fake quantizer's state; DiffQ's logits
            continue
        state[name] = full_tensor(values.get(id(tensor), tensor)).detach().clone()
    return state


def save_pretrained_quantized(quantizer: Quantizer, model: Any, directory: str | Path, **kwargs: Any) -> Path:
    """``model.save_pretrained(directory, state_dict=quantized_state_dict(quantizer, model))`` for a
    Hugging Face model that is (part of) the quantized model; returns the directory."""
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"model must be a Hugging Face PreTrainedModel (with save_pretrained); got {type(model).__name__}")
    model.save_pretrained(str(directory), state_dict=quantized_state_dict(quantizer, model), **kwargs)
    return Path(directory)


__all__ = ["quantized_state_dict", "quantized_values", "save_pretrained_quantized"]
