"""Layer kinds: which parameters of a module are weights, the axis of their output channels, and
whether the layer's input is an activation point. Every callback finds the layers to quantize
here, by layer type (subclasses included), not by exact class.

Built in: ``nn.Linear`` (and every subclass), ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``
(output channels on axis 1), ``nn.Embedding`` / ``nn.EmbeddingBag`` (no activation input: they
take indices), Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2: weight stored
``(in, out)``, output channels on axis 1; matched by name, so transformers need not be installed),
``nn.MultiheadAttention`` (``in_proj_weight`` or ``q/k/v_proj_weight``; its forward reads
``out_proj.weight`` itself, without calling ``out_proj``), ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``
(every ``weight_ih_l*`` / ``weight_hh_l*`` / ``weight_hr_l*``) and their cells.

A layer of your own::

    from qat_lightning import register_layer
    register_layer(MyLowRankLinear, weights={"u": 0, "v": 0})

Biases and norm scales are never "weights" here: they stay float in the fake-quant callbacks
(``quantize_bias`` puts biases on a 32-bit grid); DiffQ decides for every parameter by size.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

WeightsOf = Callable[[nn.Module], dict[str, int]]


@dataclass(frozen=True)
class LayerKind:
    """How a layer type holds its weights.

    Attributes:
        name: shown in coverage reports.
        weights: ``module -> {parameter name: output-channel axis}`` for the weights it has.
        activation_input: whether its first input is an activation (an index tensor is not).
        reads_children: children whose weights this layer's forward reads directly, without calling
            the child (``nn.MultiheadAttention`` reads ``out_proj.weight``): hooks that swap those
            weights must also sit on this layer.
        in_features: ``module -> size of the last input dimension`` when known (block formats
            check it divides), else None.
    """

    name: str
    weights: WeightsOf
    activation_input: bool = True
    reads_children: tuple[str, ...] = ()
    in_features: Callable[[nn.Module], int | None] = lambda module: None


_BY_CLASS: dict[type, LayerKind] = {}
_BY_NAME: dict[str, LayerKind] = {}


def register_layer(
    layer: type[nn.Module] | str,
    weights: Mapping[str, int] | WeightsOf,
    *,
    name: str | None = None,
    activation_input: bool = True,
    reads_children: tuple[str, ...] = (),
    in_features: Callable[[nn.Module], int | None] | None = None,
) -> LayerKind:
    """Declare a layer type (a class, or its ``"module.QualName"`` to avoid importing it) and its
    weights: a mapping ``{parameter name: output-channel axis}`` or a function of the module that
    returns one. Subclasses inherit the kind unless registered themselves. Returns the kind."""
    if isinstance(layer, str):
        if "." not in layer:
            raise ValueError(f"register_layer: a layer named by string must be 'package.module.ClassName'; got {layer!r}")
        label = layer.rsplit(".", 1)[1]
    elif isinstance(layer, type) and issubclass(layer, nn.Module):
        label = layer.__name__
    else:
        raise ValueError(f"register_layer: layer must be an nn.Module subclass or its qualified name; got {layer!r}")
    if isinstance(weights, Mapping):
        table = dict(weights)
        for attr, axis in table.items():
            if not isinstance(attr, str) or not isinstance(axis, int) or isinstance(axis, bool) or axis < 0:
                raise ValueError(f"register_layer({label}): weights must map parameter names to axes >= 0; got {attr!r}: {axis!r}")
        weights_of: WeightsOf = lambda module: {a: x for a, x in table.items() if isinstance(module._parameters.get(a), nn.Parameter)}  # noqa: E731
    elif callable(weights):
        weights_of = weights
    else:
        raise ValueError(f"register_layer({label}): weights must be a mapping or a function of the module; got {weights!r}")
    kind = LayerKind(name or label, weights_of, activation_input, tuple(reads_children), in_features or (lambda module: None))
    if isinstance(layer, str):
        _BY_NAME[layer] = kind
    else:
        _BY_CLASS[layer] = kind
    return kind


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of ``module`` (its class or the nearest registered base class), or None."""
    for cls in type(module).__mro__:
        kind = _BY_CLASS.get(cls) or _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if kind is not None:
            return kind
    return None


def layer_weights(module: nn.Module) -> dict[str, int]:
    """``{parameter name: output-channel axis}`` of the weights ``module`` holds itself (empty when
    it is not a registered layer kind)."""
    kind = layer_kind(module)
    return {} if kind is None else kind.weights(module)


def direct_readers(model: nn.Module) -> dict[int, list[nn.Module]]:
    """``id(child) -> [parents]`` for children whose weights a parent's forward reads directly."""
    readers: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        kind = layer_kind(module)
        for child_name in kind.reads_children if kind is not None else ():
            child = module._modules.get(child_name)
            if child is not None:
                readers.setdefault(id(child), []).append(module)
    return readers


def _rnn_weights(module: nn.Module) -> dict[str, int]:
    return {name: 0 for name, p in module._parameters.items() if name.startswith("weight_") and isinstance(p, nn.Parameter)}


def _mha_weights(module: nn.Module) -> dict[str, int]:
    names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    return {name: 0 for name in names if isinstance(module._parameters.get(name), nn.Parameter)}


def _linear_in(module: nn.Module) -> int | None:
    return getattr(module, "in_features", None)


def _conv1d_hf_in(module: nn.Module) -> int | None:
    weight = module._parameters.get("weight")
    return int(weight.shape[0]) if weight is not None else None


register_layer(nn.Linear, {"weight": 0}, in_features=_linear_in)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer(_conv, {"weight": 0})
for _conv in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer(_conv, {"weight": 1})  # transposed convolutions store (in, out, ...)
register_layer(nn.Embedding, {"weight": 0}, activation_input=False)
register_layer(nn.EmbeddingBag, {"weight": 0}, activation_input=False)
register_layer("transformers.pytorch_utils.Conv1D", {"weight": 1}, name="Conv1D (transformers)", in_features=_conv1d_hf_in)
register_layer(nn.MultiheadAttention, _mha_weights, reads_children=("out_proj",))
register_layer(nn.RNNBase, _rnn_weights, name="RNN")
register_layer(nn.RNNCellBase, _rnn_weights, name="RNN cell")

__all__ = ["LayerKind", "direct_readers", "layer_kind", "layer_weights", "register_layer"]
