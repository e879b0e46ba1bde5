"""The fake-quant transform: prepare a model so that its weights and activations are fake-quantized
in any registered number format (Distiller's EMA-tracked grids by default), and undo it."""
from __future__ import annotations

import warnings

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from fnmatch import fnmatch

import torch
from torch import nn

from .._options import args_doc, declared, make_config, option
from .._validate import check_bool, check_choice, check_module_types, check_number, check_patterns
from ..formats import NumberFormat, parse_format
from ..formats.distiller import MODES, DistillerFormat, bias_fake_quantize
from ..coverage import CoverageReport, CoverageRow, parameter_names, weight_rows
from ..layers import LayerKind, direct_readers, layer_kind
from ._common import _MIN_STEP
from .activation import FakeLinearQuantization
from .fold import fold_batchnorm
from .factory import FormatQuantizer, activation_quantizer, weight_quantizer
from .input_scale import InputScale
from .swap import Slot, SwappedParam, WeightSwapper, full_tensor, is_dtensor, rebind
from .weight import LearnedStepWeight

DEFAULT_ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, InputScale,
)  # fmt: skip
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
OUTPUT_NAME = "output_fake_quant"
INPUT_NAME = "input_fake_quant"
WEIGHT_SUFFIX = "_fake_quant"  # every quantizer child's name ends with it
WEIGHT_NAME = "weight" + WEIGHT_SUFFIX  # a layer's weight quantizer: WeightRange, LearnedStepWeight (LSQ) or FormatQuantizer
POSITIONS = ("outputs", "inputs")
ActivationQuantizer = FakeLinearQuantization | FormatQuantizer


@dataclass(eq=False)
class QuantizedSlot(SwappedParam):
    """A weight (or bias) the quantizer swaps: its quantizer module (None for a bias) and axis.

    The quantizer is found through the entry, not through ``id(param)``: a ``copy.deepcopy`` of
    the model copies hooks, entries and modules together, and the copy quantizes its own weights."""

    quantizer: nn.Module | None = None
    axis: int | None = None
    bias: bool = False


@dataclass
class FakeQuantConfig:
    """Options of :class:`EMAFakeQuantizer` (and of the :class:`~qat_lightning.EMAFakeQuant`
    callback), each declared once here with its default and documentation, validated on
    construction."""

    weight_bits: int = option(8, "weight bit width of Distiller's grid (2..16)")
    activation_bits: int = option(8, "activation bit width of Distiller's grid (2..16)")
    weight_mode: str = option("symmetric", "symmetric | symmetric_restricted | asymmetric_unsigned | asymmetric_signed")
    activation_mode: str = option("asymmetric_unsigned", "the same choices; asymmetric uses every level for ReLU outputs")
    per_channel: bool = option(True, "weights per output channel (axis 1 for transposed convolutions), else per tensor")
    ema_decay: float = option(0.999, "decay of the EMA-tracked activation ranges (bias-corrected), in [0, 1)")
    weights: bool = option(True, "fake-quantize the weights (False next to DiffQ or AdaScale)")
    activations: bool = option(True, "fake-quantize the activations")
    quantize_inputs: bool = option(False, "also fake-quantize the model input")
    activation_types: Sequence[type[nn.Module]] = option(DEFAULT_ACTIVATION_TYPES, "module types whose outputs are "
                                                         "fake-quantized with activation_position='outputs'")  # fmt: skip
    exclude: Sequence[str] = option((), "fnmatch patterns of module or parameter names left float (a tied tensor by any name)")
    include: Sequence[str] | None = option(None, "fnmatch patterns of module names to quantize; None: every module")
    learned_step: bool = option(False, "LSQ: learn the step sizes of Distiller's grids instead of tracking ranges")
    quantize_bias: bool = option(False, "fake-quantize the biases of quantized layers to a symmetric 32-bit grid")
    weight_format: str | None = option(None, "a number format instead of Distiller's grid: int4_g32, int8_per_channel, "
                                             "fp8_e4m3, mxfp4, nvfp4, ...")  # fmt: skip
    activation_format: str | None = option(None, "a number format for the activations: int8_per_token (dynamic), "
                                                 "fp8_e4m3_per_row, mxfp8, ...; None: Distiller's EMA-tracked grid")  # fmt: skip
    fold_batchnorm: bool = option(False, "fold each BatchNorm into the convolution / Linear before it (running statistics) "
                                         "before quantizing: the deployed int8 graph")  # fmt: skip
    activation_position: str = option("outputs", "outputs (Distiller: of the activation_types layers) | inputs (of the "
                                                 "layers with weights: deployable W8A8 graphs)")  # fmt: skip

    def __post_init__(self) -> None:
        check_number("weight_bits", self.weight_bits, low=2, high=16, integer=True)
        check_number("activation_bits", self.activation_bits, low=2, high=16, integer=True)
        check_choice("weight_mode", self.weight_mode, MODES)
        check_choice("activation_mode", self.activation_mode, MODES)
        check_bool("per_channel", self.per_channel)
        check_number("ema_decay", self.ema_decay, low=0, high=1, high_open=True)
        for name in ("weights", "activations", "quantize_inputs", "learned_step", "quantize_bias", "fold_batchnorm"):
            check_bool(name, getattr(self, name))
        if not (self.weights or self.activations or self.quantize_inputs):
            raise ValueError("weights, activations and quantize_inputs are all False: nothing to quantize; enable at least one")
        self.activation_types = check_module_types("activation_types", self.activation_types, allow_none=False)
        self.exclude = check_patterns("exclude", self.exclude)
        self.include = None if self.include is None else check_patterns("include", self.include)
        check_choice("activation_position", self.activation_position, POSITIONS)
        for name in ("weight_format", "activation_format"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, NumberFormat)):
                raise ValueError(f"{name} must be a format spec such as 'int4_g32' or None; got {value!r}")
        self.formats()  # named formats parse, and do not clash with Distiller's arguments

    def formats(self) -> tuple[NumberFormat, NumberFormat]:
        """The weight and activation formats these options name."""
        return resolve_formats(
            self.weight_format, self.activation_format, weight_bits=self.weight_bits, weight_mode=self.weight_mode,
            per_channel=self.per_channel, activation_bits=self.activation_bits, activation_mode=self.activation_mode,
            learned_step=self.learned_step,
        )  # fmt: skip


class EMAFakeQuantizer:
    """Fake-quantizes weights and activations in any registered number format.

    By default Distiller's ``QuantAwareTrainRangeLinearQuantizer``: weights per output channel over
    their current range, activations over a range tracked with a bias-corrected EMA (formats
    ``distiller{weight_bits}_{weight_mode}_per_channel`` and
    ``distiller{activation_bits}_{activation_mode}_ema``); ``learned_step=True`` learns the step
    sizes instead (LSQ, the ``..._lsq`` formats). ``weight_format`` / ``activation_format`` name any
    other format (``"int4_g32"``, ``"int8_per_token"``, ``"fp8_e4m3"``, ``"mxfp4"``, ``"nvfp4"``;
    see :mod:`qat_lightning.formats`): formats whose scales come from the tensor need no range
    tracking and no calibration.

    ``prepare()`` gives every Linear / Conv / ConvTranspose / Embedding weight a child
    ``weight_fake_quant`` swapped in during its forward, and every activation point a quantizer:
    with ``activation_position="outputs"`` (Distiller) the output of each module of
    ``activation_types`` (child ``output_fake_quant``), with ``"inputs"`` the input of each layer
    with a weight (child ``input_fake_quant``: the convention of deployable W8A8 graphs in
    TensorRT, ModelOpt and torchao). ``remove()`` undoes it all.

    Example::

        fq = EMAFakeQuantizer(model, weight_format="int4_g32", activation_format="int8_per_token",
                              activation_position="inputs").prepare()
        train(model)
        fq.remove()

    Args:
        model: the model to prepare.
        config: a :class:`FakeQuantConfig`, or the same options as keywords (``**options``):

    {options}
    """

    def __init__(self, model: nn.Module, config: FakeQuantConfig | None = None, **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if config is not None and options:
            raise ValueError(f"EMAFakeQuantizer: pass a config or options, not both; got config and {sorted(options)}")
        if config is not None and not isinstance(config, FakeQuantConfig):
            raise ValueError(f"config must be a FakeQuantConfig or None; got {type(config).__name__}")
        self.model = model
        self.config = config if config is not None else make_config(FakeQuantConfig, "EMAFakeQuantizer", options)
        for name in declared(FakeQuantConfig):
            setattr(self, name, getattr(self.config, name))
        self.weight_format, self.activation_format = self.config.formats()
        self.weights_enabled = True
        self.left_float: dict[str, str] = {}  # weights the format cannot hold, with the reason
        self.folded: list[tuple[str, str]] = []  # (layer, BatchNorm) pairs folded by prepare()
        self._swapper = WeightSwapper(self._substitute)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._owners: list[nn.Module] = []
        self._created: list[ActivationQuantizer] = []
        self._entries: list[QuantizedSlot] = []
        # which layers may give a weight its quantizer ('' or why not); AdaScale: the layers it trains
        self.weight_filter: Callable[[nn.Module], str] | None = None

    # ----------------------------------------------------------------------------- prepare / remove
    def prepare(self) -> EMAFakeQuantizer:
        """Install the fake quantizers; returns ``self``. ``self.coverage`` then reports every
        weight and activation point, quantized or float with the reason."""
        if self._owners or self._entries:
            raise RuntimeError("EMAFakeQuantizer.prepare() was already called; call remove() first")
        self.folded = fold_batchnorm(self.model) if self.fold_batchnorm else []
        seen: dict[int, QuantizedSlot] = {}  # by id(param): only while preparing
        readers = direct_readers(self.model)
        names = parameter_names(self.model)
        self._reasons: dict[int, str] = {}
        self._points: list[CoverageRow] = []
        refused: dict[int, tuple[str, list[Slot]]] = {}  # tensors the weight filter kept from a layer: why, and its slots
        for name, module in list(self.model.named_modules()):  # a list: quantizers are added on the way
            kind = layer_kind(module)
            skipped = self._skipped(name)
            read_by = readers.get(id(module), [])
            if self.activations and self.activation_position == "outputs" and self._is_activation_type(module) and module is not self.model:
                if isinstance(module, CONTAINERS):
                    raise ValueError(f"activation_types includes container {type(module).__name__} ({name!r}): pick leaf layers")
                self._output_point(module, name, skipped, read_by)
            if self.activations and self.activation_position == "inputs" and kind is not None and kind.activation_input:
                self._input_point(module, name, kind, skipped, read_by)
            if self.weights and kind is not None:
                self._add_weights(module, name, kind, seen, read_by, names, refused)
        for key, (reason, slots) in refused.items():
            if key in seen:  # quantized through another layer (a tied tensor): these slots swap too
                seen[key].slots.extend(slots)
            else:
                self._reasons.setdefault(key, reason)
        self._entries = list(seen.values())
        for entry in self._entries:
            self._swapper.add(entry)
        if self.quantize_inputs and INPUT_NAME not in self.model._modules:
            if isinstance(self.model, CONTAINERS):
                raise ValueError("quantize_inputs needs a model that is not an nn.Sequential/ModuleList/ModuleDict")
            self._attach(self.model, INPUT_NAME, "model input")
            self._handles.append(self.model.register_forward_pre_hook(_quantize_first_input))
            self._points.append(CoverageRow("model input", "activation", type(self.model).__name__, None, self.activation_format.spec))
        self.coverage = self._coverage()
        if self.left_float:
            warnings.warn(f"EMAFakeQuantizer: the formats cannot hold these tensors, left float: {self.left_float}", stacklevel=2)
        if not self._created and not self._entries:
            warnings.warn(
                f"EMAFakeQuantizer found nothing to quantize in {type(self.model).__name__}: no layer of "
                f"activation_types and no registered layer kind with weights (exclude={list(self.exclude)}, "
                f"include={self.include})",
                stacklevel=2,
            )
        return self

    def _is_activation_type(self, module: nn.Module) -> bool:
        if isinstance(module, self.activation_types):
            return True  # by default also Hugging Face's activation modules (GELUActivation, SiLUActivation, ...)
        return tuple(self.activation_types) == DEFAULT_ACTIVATION_TYPES and type(module).__module__ == "transformers.activations"

    def _skipped(self, name: str) -> str:
        """Why the module ``name`` is left alone by the include / exclude patterns ('' if it is not)."""
        hit = next((p for p in self.exclude if fnmatch(name, p)), None)
        if hit is not None:
            return f"excluded by {hit!r}"
        if self.include is not None and not any(fnmatch(name, p) for p in self.include):
            return f"not in include={list(self.include)}"
        return ""

    def _output_point(self, module: nn.Module, name: str, skipped: str, read_by: list[nn.Module]) -> None:
        where = f"output of {name}"
        label = type(module).__name__
        if skipped:
            self._points.append(CoverageRow(where, "activation", label, None, None, skipped))
        elif read_by:  # MultiheadAttention's out_proj: its output is the parent's first output
            parent = read_by[0]
            if OUTPUT_NAME not in parent._modules:
                self._attach(parent, OUTPUT_NAME, where)
                self._handles.append(parent.register_forward_hook(_quantize_first_output))
            self._points.append(CoverageRow(where, "activation", label, None, self.activation_format.spec))
        elif self._activation_fits(module, where, getattr(module, "out_features", None) if isinstance(module, nn.Linear) else None):
            self._attach(module, OUTPUT_NAME, where)
            self._handles.append(module.register_forward_hook(_quantize_output))
            self._points.append(CoverageRow(where, "activation", label, None, self.activation_format.spec))
        else:
            self._points.append(CoverageRow(where, "activation", label, None, None, self.left_float[where]))

    def _input_point(self, module: nn.Module, name: str, kind: LayerKind, skipped: str, read_by: list[nn.Module]) -> None:
        where = f"input of {name or type(module).__name__}"
        if skipped:
            self._points.append(CoverageRow(where, "activation", kind.name, None, None, skipped))
        elif read_by:
            reason = f"computed inside the fused forward of {type(read_by[0]).__name__}, which never calls this layer"
            self._points.append(CoverageRow(where, "activation", kind.name, None, None, reason))
        elif self._activation_fits(module, where, kind.in_features(module)):
            self._attach(module, INPUT_NAME, where)
            hook = _quantize_attention_inputs if isinstance(module, nn.MultiheadAttention) else _quantize_first_input
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=hook is _quantize_attention_inputs))
            self._points.append(CoverageRow(where, "activation", kind.name, None, self.activation_format.spec))
        else:
            self._points.append(CoverageRow(where, "activation", kind.name, None, None, self.left_float[where]))

    def _add_weights(
        self, module: nn.Module, name: str, kind: LayerKind, seen: dict[int, QuantizedSlot],
        read_by: list[nn.Module], names: dict[int, list[str]], refused: dict[int, tuple[str, list[Slot]]],
    ) -> None:  # fmt: skip
        weights = kind.weights(module)
        not_here = self.weight_filter(module) if self.weight_filter is not None else ""
        attrs = [*weights, *(("bias",) if self.quantize_bias and "bias" not in weights else ())]
        for attr in attrs:
            param = module._parameters.get(attr)
            if not isinstance(param, nn.Parameter):
                continue
            slot = Slot(module, attr, f"{name}.{attr}" if name else attr, tuple(read_by))
            if id(param) in seen:  # tied: one quantizer, every slot swapped
                seen[id(param)].slots.append(slot)
                continue
            if id(param) in self._reasons:
                continue
            if not_here:
                refused.setdefault(id(param), (not_here, []))[1].append(slot)
                continue
            every_name = names.get(id(param), [slot.qualified_name])
            skipped = self._skipped(name) or next(
                (f"excluded by {p!r} ({n})" for n in every_name for p in self.exclude if fnmatch(n, p)), ""
            )  # a tied tensor is excluded by any of its names
            if skipped:
                self._reasons[id(param)] = skipped
                continue
            if attr == "bias" and attr not in weights:
                seen[id(param)] = QuantizedSlot(slot.qualified_name, param, [slot], bias=True)
                continue
            axis = weights[attr]
            try:
                quantizer = weight_quantizer(self.weight_format, param, axis)
            except ValueError as error:  # e.g. a block size that does not divide the input features
                self.left_float[slot.qualified_name] = str(error)
                self._reasons[id(param)] = str(error)
                continue
            quantizer.label = f"weight quantizer ({slot.qualified_name})"
            module.add_module(_quantizer_name(attr), quantizer)
            per_channel = not isinstance(self.weight_format, DistillerFormat) or self.weight_format.per_channel
            seen[id(param)] = QuantizedSlot(slot.qualified_name, param, [slot], quantizer=quantizer, axis=axis if per_channel else None)
            if module not in self._owners:
                self._owners.append(module)

    def _coverage(self) -> CoverageReport:
        quantized = {id(e.param): ("int32 bias grid" if e.bias else self.weight_format.spec) for e in self._entries}
        reasons = dict(self._reasons)
        if not self.weights:
            reasons.update({id(p): "weights=False" for p in self.model.parameters()})
        own = {id(p) for q in self._quantizer_modules() for p in q.parameters()}
        rows = weight_rows(self.model, quantized, reasons, own, default_vector="bias / norm (quantize_bias=False)" if not self.quantize_bias else "")
        return CoverageReport("EMAFakeQuantizer", rows + self._points)

    def _activation_fits(self, module: nn.Module, where: str, size: int | None) -> bool:
        """Whether the activation format can hold a layer's input / output (when its feature count
        is known a block size must divide it); else it stays float, named in ``left_float``."""
        if size is None:
            return True
        try:
            self.activation_format.check_shape((1, size))
        except ValueError as error:
            self.left_float[where] = str(error)
            return False
        return True

    def _attach(self, module: nn.Module, name: str, label: str) -> None:
        fq = activation_quantizer(self.activation_format, self.ema_decay)
        fq.label = f"activation quantizer ({label})"
        reference = next(iter(module.parameters(recurse=False)), None)
        if reference is not None:
            fq.to(reference.device)
        module.add_module(name, fq)
        self._owners.append(module)
        self._created.append(fq)

    def remove(self) -> None:
        """Remove every hook and fake quantizer; the model is as before ``prepare()``."""
        self._swapper.remove()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._owners:
            for name in [n for n in module._modules if n.endswith(WEIGHT_SUFFIX)]:  # input, output and weight quantizers
                del module._modules[name]
        self._owners.clear()
        self._created.clear()
        self._entries.clear()
        self.left_float.clear()

    # ----------------------------------------------------------------------------- control
    def weight_quantizers(self) -> dict[str, nn.Module]:
        """Every weight quantizer, by the qualified name of the weight."""
        return {e.name: e.quantizer for e in self._entries if e.quantizer is not None}

    def activation_quantizers(self) -> dict[str, ActivationQuantizer]:
        """Every activation quantizer (tracked or learned ranges, or a dynamic format), by qualified name."""
        created = {id(q) for q in self._created}
        return {name: m for name, m in self.model.named_modules() if id(m) in created}

    def parameters(self) -> list[nn.Parameter]:
        """The learned step sizes (LSQ), weights' then activations'; empty for other formats."""
        weights = [m.step for m in self.weight_quantizers().values() if isinstance(m, LearnedStepWeight)]
        return weights + [fq.step for fq in self._created if isinstance(fq, FakeLinearQuantization) and fq.learned_step]
    @torch.no_grad()
    def check_finite(self) -> None:
        """``FloatingPointError`` naming every quantizer whose LSQ step sizes hold NaN or Inf (one
        device sync for all of them)."""
        named = [(n, m.step) for n, m in {**self.weight_quantizers(), **self.activation_quantizers()}.items()
                 if isinstance(getattr(m, "step", None), nn.Parameter)]  # fmt: skip
        if not named:
            return
        # FSDP2 shards: the whole step on every rank (all of them call this), so all raise alike
        finite = torch.stack([torch.isfinite(full_tensor(step)).all() for _, step in named]).tolist()
        broken = [name for (name, _), ok in zip(named, finite) if not ok]
        if broken:
            raise FloatingPointError(
                f"EMAFakeQuantizer: NaN or Inf in the LSQ step sizes of {broken} (an optimizer step from a NaN loss or "
                "gradient). The model diverged: check the loss and the learning rates (Trainer(detect_anomaly=True) "
                "finds the first op)"
            )

    @torch.no_grad()
    def collapsed_steps(self) -> dict[str, int]:
        """LSQ step sizes at (or past) their floor ``1e-8``, by quantizer name: how many entries.

        An optimizer step that takes a step size through zero leaves it clamped at the floor: that
        channel quantizes to about zero and its weights get no gradient (everything is clipped),
        and an int8 runtime cannot hold the bias at ``input scale x 1e-8``. The cure is a smaller
        step-size learning rate."""
        collapsed = {}
        named = {**self.weight_quantizers(), **self.activation_quantizers()}
        for name, module in named.items():
            step = getattr(module, "step", None)
            if isinstance(step, nn.Parameter):
                count = int((step <= _MIN_STEP).sum())
                if count:
                    collapsed[name] = count
        return collapsed

    def set_state(self, *, enabled: bool | None = None, observe: bool | None = None) -> None:
        """Switch quantization (``enabled``) and range tracking (``observe``) of all activation quantizers."""
        for fq in self._created:  # called every step: nn.Module.__setattr__ only where a value changes
            if enabled is not None and fq.enabled != enabled:
                fq.enabled = enabled
            if observe is not None and isinstance(fq, FakeLinearQuantization) and fq.observe != observe:
                fq.observe = observe
        if enabled is not None:
            self.weights_enabled = enabled

    def model_size(self) -> float:
        """Size in MB of the deployed model: what a file holding the integer weights and their
        quantization parameters needs.

        * a quantized weight: what its format stores (``storage_bits``: elements at the format's
          width, one scale per channel / group / block, zero points in the asymmetric modes); for
          Distiller's grids one float32 scale per output channel (or tensor) and a zero point of the
          weight width in the asymmetric modes; LSQ step sizes are those scales (counted once);
        * a quantized bias: 32 bits per entry and one float32 scale;
        * an activation quantizer with a tracked or learned range: one float32 scale, plus a zero
          point of its width in the asymmetric modes (dynamic formats store nothing: their scales
          come from each activation);
        * every other parameter of the model at its own width (tied tensors once); buffers (such as
          BatchNorm statistics) are not counted, as in DiffQ's size.
        """
        own = {id(p) for owner in self._quantizer_modules() for p in owner.parameters()}
        counted, bits = set(own), 0
        for entry in self._entries:
            counted.add(id(entry.param))
            if entry.bias:
                bits += 32 * entry.param.numel() + 32
                continue
            bits += self._weight_bits(entry)
        for fq in self._created:
            if isinstance(fq, FakeLinearQuantization):
                bits += 32 + (0 if fq.mode.value.startswith("symmetric") else fq.num_bits)
        unique = {id(p): p for p in self.model.parameters()}
        bits += sum(8 * p.element_size() * p.numel() for key, p in unique.items() if key not in counted)
        return bits / (8 * 2**20)

    def bits_per_weight(self) -> float:
        """Storage per quantized weight, scales and zero points included (``int4_g32``: 5.0); NaN
        when no weight is quantized."""
        bits, numel = 0, 0
        for entry in self._entries:
            if entry.bias:
                continue
            numel += entry.param.numel()
            bits += self._weight_bits(entry)
        return bits / numel if numel else float("nan")

    def _weight_bits(self, entry: QuantizedSlot) -> int:
        """What one quantized weight stores: its format's elements, scales and zero points."""
        if isinstance(entry.quantizer, FormatQuantizer):
            return entry.quantizer.storage_bits(tuple(entry.param.shape))
        fmt = self.weight_format  # Distiller's grid: a float32 scale (and a zero point) per channel
        channels = 1 if entry.axis is None else entry.param.shape[entry.axis]
        return fmt.bits * entry.param.numel() + (32 + (0 if fmt.mode.startswith("symmetric") else fmt.bits)) * channels

    def _quantizer_modules(self) -> list[nn.Module]:
        return [*self._created, *self.weight_quantizers().values()]

    def rebind(self) -> None:
        """Re-read every quantized parameter from its module (after FSDP2's ``fully_shard`` replaced
        them with shards); the forward always quantizes what the module holds."""
        rebind(self._entries)
        for module in self._quantizer_modules():
            module.sharded = True

    @torch.no_grad()
    def write_back_steps(self) -> None:
        """FSDP2: LSQ steps initialised in this step's forward were set on the gathered copies only;
        put the values into the sharded parameters (before the optimizer step, on every rank)."""
        from torch.distributed.tensor import distribute_tensor

        for module in self._quantizer_modules():
            pending = getattr(module, "_pending_step", None)
            if pending is None:
                continue
            step = module.step
            if is_dtensor(step):
                step.copy_(distribute_tensor(pending.to(step.dtype), step.device_mesh, step.placements))
            else:
                step.copy_(pending)
            module._pending_step = None

    def quantized_weight(self, entry: QuantizedSlot, current: torch.Tensor | None = None) -> torch.Tensor:
        """What a forward sees for one quantized weight (or bias); ``current``: the tensor in its
        slot (FSDP2's gathered parameter), else the entry's parameter."""
        p = entry.param if current is None else current
        return bias_fake_quantize(p) if entry.bias else entry.quantizer(p)

    def _substitute(self, entry: QuantizedSlot, module: nn.Module, current: torch.Tensor) -> torch.Tensor | None:
        return self.quantized_weight(entry, current) if self.weights_enabled else None


def _quantize_output(module: nn.Module, args: tuple, output: object) -> object:
    fq = module._modules.get(OUTPUT_NAME)
    return fq(output) if fq is not None and isinstance(output, torch.Tensor) else output


def _quantizer_name(attr: str) -> str:
    """The child that holds the quantizer of weight ``attr`` (``weight_fake_quant``, ``weight_ih_l0_fake_quant``)."""
    return attr + WEIGHT_SUFFIX


def _quantize_first_output(module: nn.Module, args: tuple, output: object) -> object:
    """``nn.MultiheadAttention`` returns ``(attention output, weights)``: the output is the first."""
    fq = module._modules.get(OUTPUT_NAME)
    if fq is None or not isinstance(output, tuple) or not output or not isinstance(output[0], torch.Tensor):
        return output
    return (fq(output[0]), *output[1:])


def _quantize_attention_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Query, key and value of ``nn.MultiheadAttention`` (positional or keyword), each once: a key
    that is the query stays the same tensor (self-attention's fast path checks ``key is query``)."""
    fq = module._modules.get(INPUT_NAME)
    if fq is None:
        return None
    done: dict[int, torch.Tensor] = {}

    def quantize(x: object) -> object:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        if id(x) not in done:
            done[id(x)] = fq(x)
        return done[id(x)]

    args = tuple(quantize(a) if i < 3 else a for i, a in enumerate(args))
    kwargs = {k: quantize(v) if k in ("query", "key", "value") else v for k, v in kwargs.items()}
    return args, kwargs


def _quantize_first_input(module: nn.Module, args: tuple) -> tuple | None:
    fq = module._modules.get(INPUT_NAME)
    if fq is None or not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return None
    return (fq(args[0]), *args[1:])


def resolve_formats(
    weight_format: str | NumberFormat | None, activation_format: str | NumberFormat | None, *, weight_bits: int,
    weight_mode: str, per_channel: bool, activation_bits: int, activation_mode: str, learned_step: bool,
) -> tuple[NumberFormat, NumberFormat]:  # fmt: skip
    """The weight and activation formats: the ones named, or Distiller's grids from the bit widths and
    modes. A named format with a Distiller argument that is not its default is refused (one of the
    two would be ignored)."""
    defaults = {"weight_bits": 8, "weight_mode": "symmetric", "per_channel": True, "activation_bits": 8,
                "activation_mode": "asymmetric_unsigned", "learned_step": False}  # fmt: skip
    given = {"weight_bits": weight_bits, "weight_mode": weight_mode, "per_channel": per_channel, "activation_bits": activation_bits,
             "activation_mode": activation_mode, "learned_step": learned_step}  # fmt: skip
    sides = {"weight_format": (weight_format, ("weight_bits", "weight_mode", "per_channel")),
             "activation_format": (activation_format, ("activation_bits", "activation_mode"))}  # fmt: skip
    for name, (fmt, arguments) in sides.items():
        if fmt is None:
            continue
        clash = [a for a in (*arguments, "learned_step") if given[a] != defaults[a]]
        if clash and not (clash == ["learned_step"] and (weight_format is None or activation_format is None)):
            raise ValueError(f"{name}={fmt!s} and {', '.join(f'{a}={given[a]!r}' for a in clash)} both say how to quantize: name "
                             f"the grid in the format (e.g. 'distiller4_symmetric_per_channel_lsq'), or drop {name}")  # fmt: skip
    lsq = "_lsq" if learned_step else ""
    weights = _named_format("weight_format", weight_format or f"distiller{weight_bits}_{weight_mode}{'_per_channel' if per_channel else ''}{lsq}")
    activations = _named_format("activation_format", activation_format or f"distiller{activation_bits}_{activation_mode}{lsq or '_ema'}")
    if isinstance(weights, DistillerFormat) and weights.range_method == "ema":
        raise ValueError(f"weight_format={weights.spec}: an EMA-tracked range is for activations; weights use their current "
                         f"range ({weights.spec.removesuffix('_ema')}) or a learned step (..._lsq)")  # fmt: skip
    return weights, activations


def _named_format(argument: str, spec: str | NumberFormat) -> NumberFormat:
    try:
        return parse_format(spec)
    except ValueError as error:
        raise ValueError(f"{argument}: {error}") from None


EMAFakeQuantizer.__doc__ = EMAFakeQuantizer.__doc__.replace("{options}", args_doc(FakeQuantConfig).lstrip())
