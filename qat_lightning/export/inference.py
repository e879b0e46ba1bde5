"""After QAT, torchao's quantized inference: the fake quantization of each Linear becomes torchao's
quantized weight tensors (``quantize_``), holding the levels the QAT run validated on.

Integer weight formats (``int{1..8}_g<K>`` symmetric groups, ``int{1..8}_per_channel``) map to
``IntxWeightOnlyConfig``; with ``int8_per_token`` inputs (``activation_position="inputs"``) to
``Int8DynamicActivationIntxWeightConfig``, torchao's own int8-per-token x intN recipe. The numerics
are torchao's (``formats/integer.py`` matches them), so the converted model computes what the
fake-quantized model computed in eval (tests check equality). Needs ``torchao``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..formats.integer import IntFormat
from ..quantizers.factory import FormatQuantizer
from ..quantizers.fake_quantizer import INPUT_NAME, EMAFakeQuantizer


def torchao_config(weight: Any, inputs: Any | None) -> Any:
    """The torchao config that computes a Linear whose weight is fake-quantized to ``weight`` and
    whose input to ``inputs`` (a format, or None); ``ValueError`` with the reason where none does."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if not isinstance(weight, IntFormat) or not weight.symmetric or weight.granularity not in ("group", "channel"):
        raise ValueError(f"weight format {getattr(weight, 'spec', weight)!r}: torchao's integer inference holds symmetric "
                         "per-group (int4_g32) or per-channel (int8_per_channel) integer weights")  # fmt: skip
    dtype = getattr(torch, f"int{weight.bits}")
    granularity = PerGroup(weight.group_size) if weight.granularity == "group" else PerAxis(0)
    if inputs is None:
        return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)
    if not (isinstance(inputs, IntFormat) and inputs.bits == 8 and inputs.granularity == "row" and not inputs.symmetric):
        raise ValueError(f"input format {getattr(inputs, 'spec', inputs)!r}: torchao's dynamic activation quantization "
                         "is int8_per_token (asymmetric, one scale per row)")  # fmt: skip
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity)


def convert_to_torchao(quantizer: EMAFakeQuantizer) -> dict[str, str]:
    """Replace ``quantizer``'s fake quantization of ``quantizer.model`` by torchao's quantized
    inference, in place; returns ``{layer: torchao config}``.

    Every quantized weight must be a Linear's in a format :func:`torchao_config` maps, and every
    activation quantizer an ``int8_per_token`` input of such a Linear: anything else is refused
    before the model is touched (``ValueError`` naming it and why), nothing is silently left float.
    The quantizer's hooks and modules are removed; the model is then an inference model (eval)."""
    try:
        from torchao.quantization import quantize_
    except ImportError as error:
        raise ImportError("convert_to_torchao needs torchao: pip install torchao") from error
    model = quantizer.model
    names = {id(m): n for n, m in model.named_modules()}
    plans: dict[str, Any] = {}
    problems: list[str] = []
    converted_inputs: set[int] = set()
    for entry in quantizer._entries:
        if entry.bias:
            problems.append(f"{entry.name}: a fake-quantized bias (torchao keeps biases float)")
            continue
        layer = entry.slots[0].module
        if type(layer) is not nn.Linear or entry.slots[0].attr != "weight" or len(entry.slots) > 1:
            problems.append(f"{entry.name}: {type(layer).__name__} (torchao's quantize_ converts nn.Linear weights, untied)")
            continue
        if not isinstance(entry.quantizer, FormatQuantizer):
            problems.append(f"{entry.name}: Distiller / LSQ grid (torchao converts the integer number formats, e.g. int4_g32)")
            continue
        inputs = layer._modules.get(INPUT_NAME)
        try:
            plans[names[id(layer)]] = torchao_config(entry.quantizer.format, _format_of(inputs))
        except ValueError as error:
            problems.append(f"{entry.name}: {error}")
            continue
        if inputs is not None:
            converted_inputs.add(id(inputs))
    for name, activation in quantizer.activation_quantizers().items():
        if id(activation) not in converted_inputs:
            problems.append(f"activation quantizer {name}: only int8_per_token inputs of converted Linears have a torchao kernel")
    if problems:
        raise ValueError("convert_to_torchao: cannot convert without changing what the model computes:\n  " + "\n  ".join(problems))
    if not plans:
        raise ValueError("convert_to_torchao: the quantizer quantizes no weight")
    quantizer.remove()
    model.eval()
    for config in {repr(c): c for c in plans.values()}.values():
        chosen = {name for name, c in plans.items() if repr(c) == repr(config)}
        quantize_(model, config, filter_fn=lambda module, fqn, chosen=chosen: fqn in chosen)
    return {name: type(config).__name__ for name, config in plans.items()}


def _format_of(module: nn.Module | None) -> Any | None:
    if module is None:
        return None
    if not isinstance(module, FormatQuantizer):
        raise ValueError(f"{type(module).__name__} input quantizer (torchao's dynamic activations are int8_per_token)")
    return module.format


__all__ = ["convert_to_torchao", "torchao_config"]
