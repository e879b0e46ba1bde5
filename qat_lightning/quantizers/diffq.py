"""DiffQ: differentiable quantization by noise injection, with a learned number of bits per group.

Plain torch, usable without Lightning. Public API compatible with ``diffq.DiffQuantizer``
(facebookresearch/diffq); see ``ALGORITHMS.md`` in the reference folder for the formulas.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from typing import Any

import torch
from torch import nn

from .._optim import fused_options
from .._options import args_doc, make_config, option
from .._validate import check_bool, check_choice, check_number, check_patterns
from .diffq_bits import BitsParameterization
from .diffq_records import KeptParam, QuantizedParam
from .diffq_size import MAX_QUANT_BITS, MEGABYTE_BITS, DiffQSize
from .noise import inject_noise, inject_noise_many
from .noise_draw import SAMPLERS, NoiseSampler
from .noise_rng import NoiseGenerators
from ..coverage import CoverageReport, weight_rows
from ..layers import direct_readers, layer_weights
from .swap import Slot, SwappedParam, WeightSwapper, full_tensor, is_dtensor, rebind, refresh_rnn
from ..formats.uniform import (SCALE_DTYPES, block_range, cell_size, compute_dtype, given_ranges, grid_dequantize, grid_quantize, grid_rounding_pull,
                               learned_grid_fake_quantize, per_cell, range_block, range_ends, stored_ranges, tensor_range)  # fmt: skip

BATCH_NUMEL = 2**16  # weights up to this size draw their noise together (_draw_small_weights): dispatch-bound alone
MAX_MIN_SIZE_MB = 2.0**20  # 1 TB: beyond it "keep every tensor float" is exclude=["*"]


@dataclass
class DiffQConfig:
    """Options of :class:`DiffQuantizer` (and of the :class:`~qat_lightning.DiffQ` callback), each
    declared once here with its default and documentation, validated on construction."""

    min_size: float = option(0.01, "tensors of at most this many MB (fp32) stay unquantized (0 .. 2**20)")
    float16: bool = option(False, "keep the unquantized tensors in fp16 (counted as 16 bits, rounded in eval)")
    group_size: int = option(8, "weights sharing one learned bit width; must divide each quantized tensor's size; 0: one per "
                                "tensor (the reference's default 1 doubles parameter memory)")
    scale: str = option("tensor", "range grid of the true quantization and the noise: 'tensor' (the reference: one fp32 min / max "
                                  "per tensor, bit-equal to diffq-fixed), 'channel' (one per output channel: per row of the weight) "
                                  "or 'group' (one per scale_group_size entries of a row)")
    scale_group_size: int = option(32, "entries sharing one range with scale='group' (>= 1); a row it does not divide gets one "
                                       "range (reported by coverage()); bit groups and ranges must nest")
    scale_dtype: str = option("float16", "storage of the channel / group ranges (counted in the size): 'float16', 'bfloat16' "
                                         "or 'float32'; the tensor grid keeps the reference's fp32")
    symmetric_ranges: bool = option(False, "channel / group ranges symmetric about zero, [-m, m] with m the block's largest "
                                           "magnitude: one stored value per block instead of a min and a max (half the "
                                           "range overhead); needs scale='channel' or 'group'")
    range_search: int = option(0, "clipping search at true quantization: each range block also tries this many ranges "
                                  "shrunk about its centre (down to half) and keeps the one of least squared error "
                                  "(0 .. 64; 0: the min / max range, the reference)")
    learn_ranges: bool = option(False, "in the straight-through phase, learn each range block's min and max (LSQ-style: the "
                                       "gradient passes the rounding, the clamp stops it), from the searched ranges at the "
                                       "switch; parameters '<param>_range<suffix>', trained by the optimizer group that holds "
                                       "them (the weights' unless moved)")
    min_bits: float = option(2, "lower bound of the learned bits, 0 < min_bits < init_bits < max_bits <= 15")
    max_bits: float = option(15, "upper bound of the learned bits (at most 15)")
    param: str = option("bits", "'bits': sigmoid interpolation of the bits; 'noise': of the log noise scale")
    noise: str = option("gaussian", "training noise: randn / 2 ('gaussian') or rand - 0.5 ('uniform')")
    noise_sampler: str = option("auto", "how the noise is drawn: 'torch' (normal_ / uniform_), 'table' (16-bit draws, four per "
                                        "64 random bits; gaussian through a 65 536-quantile table: about half the time of "
                                        "normal_ on a CPU) or 'auto' (the table on the CPU, torch's samplers elsewhere)")
    init_bits: float = option(8, "starting number of bits")
    extra_bits: float = option(0, "added to the bits before rounding, for true quantization and size "
                                  "(-min_bits < extra_bits <= 15 - min_bits)")
    suffix: str = option("_diffq", "name suffix of the bits parameters registered on the model: '_' then letters, digits or '_'")
    exclude: Sequence[str] = option((), "fnmatch patterns ('module.param' or the bare name) of parameters kept float, e.g. ['*.bias']; "
                                        "a tied tensor by any of its names")
    include: Sequence[str] | None = option(None, "fnmatch patterns of parameter or module names to quantize; None: every parameter")
    detect_bound: bool = option(True, "tied parameters share one bits logit and one noisy tensor, and count once")

    def __post_init__(self) -> None:
        check_number("min_size", self.min_size, low=0, high=MAX_MIN_SIZE_MB)
        check_bool("float16", self.float16)
        check_number("group_size", self.group_size, low=0, integer=True)
        check_choice("scale", self.scale, ("tensor", "channel", "group"))
        check_number("scale_group_size", self.scale_group_size, low=1, integer=True)
        check_choice("scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES))
        check_bool("symmetric_ranges", self.symmetric_ranges)
        if self.symmetric_ranges and self.scale == "tensor":
            raise ValueError("symmetric_ranges=True needs scale='channel' or 'group' (the reference grid scale='tensor' keeps its "
                             "fp32 min and max, bit-equal to diffq-fixed); got scale='tensor'")
        check_number("range_search", self.range_search, low=0, high=64, integer=True)
        check_bool("learn_ranges", self.learn_ranges)
        check_number("min_bits", self.min_bits, low=0, low_open=True, high=MAX_QUANT_BITS, high_open=True)
        check_number("max_bits", self.max_bits, low=self.min_bits, low_open=True, high=MAX_QUANT_BITS)
        check_number("init_bits", self.init_bits, low=self.min_bits, high=self.max_bits, low_open=True, high_open=True)
        check_choice("param", self.param, ("bits", "noise"))
        check_choice("noise", self.noise, ("gaussian", "uniform"))
        check_choice("noise_sampler", self.noise_sampler, SAMPLERS)
        # bits + extra_bits stays a positive width within the grid (the size estimate stays positive)
        check_number("extra_bits", self.extra_bits, low=-self.min_bits, low_open=True, high=MAX_QUANT_BITS - self.min_bits)
        if not isinstance(self.suffix, str) or not re.fullmatch(r"_[A-Za-z0-9_]+", self.suffix):
            raise ValueError(
                "suffix must be '_' followed by letters, digits or '_' (e.g. '_diffq'), so that '<param><suffix>' is a "
                f"new parameter name that no ordinary name ends with; got {self.suffix!r}"
            )
        self.exclude = check_patterns("exclude", self.exclude)
        self.include = None if self.include is None else check_patterns("include", self.include)
        check_bool("detect_bound", self.detect_bound)


def ranges_started(ranges: torch.Tensor) -> bool:
    """Whether learned ranges hold values (they are zeros until the straight-through phase starts
    them; a model whose every weight is 0 has zero ranges either way)."""
    return bool(torch.isfinite(ranges).all()) and bool(ranges.any())


def _unused(t: torch.Tensor) -> torch.Tensor:
    """``t * 0``: keeps a parameter a step does not train in the autograd graph with a zero gradient,
    so that DDP's reducer, which expects a gradient for every parameter, gets one."""
    return t.mul(0)


@torch.compiler.disable
def _no_drawn_noise(name: str) -> None:
    """Raised eagerly (a traced ``raise`` would take dynamo down with it)."""
    raise RuntimeError(
        f"DiffQuantizer: {name!r} has no noisy weight for this torch.compile'd training forward: call "
        "quantizer.prepare_compiled_step() before each one (the DiffQ callback does it at on_train_batch_start)"
    )


class DiffQuantizer:
    """Noise-injection quantizer with learned bits and a differentiable model-size estimate.

    In training mode each quantized weight is seen by its module as ``w + noise``, the noise
    scaled per group by the learned number of bits; in eval mode modules see the true quantized
    weights (``round(extra_bits + bits)`` bits, uniform quantization over the tensor's range),
    computed once and reused until the weights or bits change. ``model_size()`` is a
    differentiable estimate in MB to add to the loss as a penalty.

    Example::

        model = nn.Sequential(nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 10))
        quantizer = DiffQuantizer(model, group_size=8)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        quantizer.setup_optimizer(optimizer, lr=1e-2)    # bits in their own group, no weight decay
        loss = F.cross_entropy(model(x), y) + 1.0 * quantizer.model_size()
        ...
        with quantizer.quantized():                      # true quantized weights, restored after
            accuracy = evaluate(model)
        print(quantizer.true_model_size(), "MB")

    Args:
        model: the model to quantize; bits logits are registered on it as ``<param><suffix>``.
        config: a :class:`DiffQConfig`, or the same options as keywords (``**options``):

    {options}
    """

    def __init__(self, model: nn.Module, config: DiffQConfig | None = None, **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if config is not None and options:
            raise ValueError(f"DiffQuantizer: pass a config or options, not both; got config and {sorted(options)}")
        if config is not None and not isinstance(config, DiffQConfig):
            raise ValueError(f"config must be a DiffQConfig or None; got {type(config).__name__}")
        self.config = config if config is not None else make_config(DiffQConfig, "DiffQuantizer", options)
        for key, value in asdict(self.config).items():
            setattr(self, key, value)
        suffix = self.suffix
        for name, _ in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(suffix):
                raise ValueError(
                    f"model already has a parameter named {name!r} ending with suffix {suffix!r}: "
                    "a DiffQuantizer is already attached (call detach() first) or pick another suffix"
                )

        self.model = model
        self.enabled = True  # False: modules see their float weights in training and eval
        self._straight_through = False
        self._bits = BitsParameterization(self.min_bits, self.max_bits, self.param)
        self._qparams: list[QuantizedParam] = []
        self._kept: list[KeptParam] = []
        self._saved: dict[int, torch.Tensor] | None = None
        self._constants: tuple[tuple, dict] | None = None
        self._batch: tuple[list[QuantizedParam], set[int], torch.Tensor | None] | None = None  # _draw_small_weights's, per new_noise
        self._rng = NoiseGenerators()  # unseeded: noise from torch's global RNG (as the reference)
        self._sampler = NoiseSampler(self.noise, self.noise_sampler)
        self._size_penalty = 0.0
        self._size = DiffQSize(self._qparams, self._kept, self._bits, self.extra_bits)
        self._find_params()

        self._swapper = WeightSwapper(self._substitute)
        self._handles = [model.register_forward_pre_hook(self._on_root_forward)]
        by_module: dict[nn.Module, list[tuple[str, SwappedParam]]] = {}
        for entry in self._swapped_entries():
            self._swapper.add(entry)
            for slot in entry.slots:
                by_module.setdefault(slot.module, []).append((slot.attr, entry))
        for module, slots in by_module.items():
            # a closure, not a bound method: torch tags public hooks with an attribute
            hook = lambda m, state, prefix, meta, slots=slots: self._float_state_dict(state, prefix, slots)  # noqa: E731
            self._handles.append(module.register_state_dict_post_hook(hook))
        for qp in self._qparams:
            if qp.ranges is not None:  # a loaded state may hold started ranges or zeros: read them again once
                hook = lambda module, keys, qp=qp: setattr(qp, "_ranges_ready", None)  # noqa: E731
                self._handles.append(qp.slots[0].module.register_load_state_dict_post_hook(hook))
            for tensor in (qp.param, qp.logit):
                if tensor.requires_grad:  # after backward the noisy tensor's graph is spent: draw anew
                    self._handles.append(tensor.register_post_accumulate_grad_hook(lambda _, qp=qp: self._backward_done(qp)))
        if not self._qparams:
            warnings.warn(
                f"DiffQuantizer found nothing to quantize: every parameter is excluded or at most "
                f"min_size={self.min_size} MB ({self._min_numel} entries)",
                stacklevel=2,
            )

    @property
    def straight_through(self) -> bool:
        """When True, training forwards see the true quantized weights through a straight-through
        estimator (``p + (q(p) - p).detach()``: the gradient reaches ``p`` unchanged) instead of the
        noisy ones, at the bits the logits hold now, which get no gradient (frozen; no penalty):
        the last phase of training adapts the weights to their grid. False: noise injection."""
        return self._straight_through

    @straight_through.setter
    def straight_through(self, value: bool) -> None:
        self._straight_through = check_bool("straight_through", value)
        if value and self.learn_ranges:
            self._start_learned_ranges()
        self.new_noise()

    @property
    def size_penalty(self) -> float:
        """Weight of the model size (MB) added to the objective inside the backward: when > 0, each
        backward through a noisy weight adds ``size_penalty * d model_size() / d logit`` to its
        logits' gradient, so ``model_size()`` need not be part of the loss (0: nothing added).
        With gradient accumulation over ``k`` backwards per step, set ``penalty / k``."""
        return self._size_penalty

    @size_penalty.setter
    def size_penalty(self, value: float) -> None:
        self._size_penalty = float(check_number("size_penalty", value, low=0))

    # ----------------------------------------------------------------------------- discovery
    @property
    def _min_numel(self) -> int:
        return int(self.min_size * 2**20 // 4)

    def _find_params(self) -> None:
        readers = direct_readers(self.model)  # nn.MultiheadAttention reads out_proj.weight itself
        found: dict[int, tuple[nn.Parameter, list[Slot]]] = {}
        for module_name, module in self.model.named_modules():
            for name, param in list(module.named_parameters(recurse=False)):
                qualified = f"{module_name}.{name}" if module_name else name
                slot = Slot(module, name, qualified, tuple(readers.get(id(module), ())))
                key = id(param) if self.detect_bound else id(slot)
                found.setdefault(key, (param, []))[1].append(slot)
        self._kept_reasons: dict[int, str] = {}
        self._grid_notes: dict[int, str] = {}
        for param, slots in found.values():
            # a tied tensor is excluded by any of its names (GPT-2's lm_head.weight is transformer.wte.weight)
            excluded = any(fnmatch(s.qualified_name, pat) or fnmatch(s.attr, pat) for s in slots for pat in self.exclude)
            if self.include is not None:
                excluded = excluded or not any(fnmatch(s.qualified_name, pat) or fnmatch(s.qualified_name.rsplit(".", 1)[0], pat)
                                               for s in slots for pat in self.include)  # fmt: skip
            qualified = slots[0].qualified_name
            if excluded or param.numel() <= self._min_numel or not param.is_floating_point():
                entry: SwappedParam = KeptParam(qualified, param, slots, half=self.float16)
                self._kept_reasons[id(param)] = (
                    ("excluded by exclude / include" if excluded else "")
                    or ("not floating point" if not param.is_floating_point() else f"at most min_size={self.min_size} MB")
                ) + (" (kept float16)" if self.float16 else "")
                self._kept.append(entry)
            else:
                entry = self._register(qualified, param, slots[0])
                entry.slots.extend(slots[1:])
                self._qparams.append(entry)

    def _register(self, qualified: str, param: nn.Parameter, slot: Slot) -> QuantizedParam:
        group_size = self.group_size or param.numel()
        if param.numel() % group_size:
            raise ValueError(
                f"group_size={self.group_size} does not divide the size of parameter {qualified!r} "
                f"(shape {tuple(param.shape)}, {param.numel()} entries): pick a group_size that divides it, "
                f"group_size=0 (one group per tensor), or exclude it with exclude=[{qualified!r}]"
            )
        block, note = range_block(tuple(param.shape), self.scale, self.scale_group_size)
        if block % group_size and group_size % block:
            raise ValueError(
                f"group_size={self.group_size} and the {self.scale!r} ranges of parameter {qualified!r} (shape "
                f"{tuple(param.shape)}: one per {block} entries) do not nest: a bit group must lie within one range or a "
                f"range within one bit group; pick a group_size that divides {block} or a multiple of it, or exclude it "
                f"with exclude=[{qualified!r}]"
            )
        if not note and self.scale != "tensor" and layer_weights(slot.module).get(slot.attr, 0) != 0:
            # GPT-2's Conv1D, transposed convolutions: the stored rows are input channels
            where = "row" if self.scale == "channel" else f"{block} entries of a row"
            note = f"a {self.scale_dtype} range per {where} of the stored weight (its output channels lie on another axis)"
        if note:
            self._grid_notes[id(param)] = note
        logit = nn.Parameter(torch.full((param.numel() // group_size,), self._bits.init_logit(self.init_bits), dtype=torch.float32, device=param.device))
        slot.module.register_parameter(slot.attr + self.suffix, logit)
        scale_dtype = None if self.scale == "tensor" else SCALE_DTYPES[self.scale_dtype]
        ranges = None
        if self.learn_ranges:  # zeros until the straight-through phase starts them from the searched ranges
            ends = 1 if self.symmetric_ranges else 2  # [m] of [-m, m], or [min, max]
            ranges = nn.Parameter(torch.zeros((ends, param.numel() // block), dtype=torch.float32, device=param.device))
            slot.module.register_parameter(slot.attr + "_range" + self.suffix, ranges)
        return QuantizedParam(qualified, param, [slot], logit=logit, group_size=group_size, range_block=block, scale_dtype=scale_dtype,
                              range_search=self.range_search, ranges=ranges, symmetric=self.symmetric_ranges)

    # ----------------------------------------------------------------------------- bits
    def get_bits(self, logit: torch.Tensor) -> torch.Tensor:
        """Bits per group (before ``extra_bits`` and rounding) for a logit tensor."""
        return self._bits.bits(logit)

    def bits_derivative(self, logit: torch.Tensor) -> torch.Tensor:
        """``d bits / d logit``, in closed form (used for the size penalty's gradient)."""
        return self._bits.derivative(logit)

    def true_bits(self, qp: QuantizedParam) -> torch.Tensor:
        """The stored width of each group of ``qp``: ``round(extra_bits + bits)``, within 1..15."""
        return self._size.true_bits(qp)

    # ----------------------------------------------------------------------------- weights
    def _substitute(self, entry: SwappedParam, module: nn.Module, current: torch.Tensor) -> torch.Tensor | None:
        if self._saved is not None:  # quantized in place by quantize()
            if not module.training:
                return None
            self.restore()  # a training forward always works on the float weights
        if not self.enabled:
            return None
        if torch.compiler.is_compiling():
            return self._traced_weight(entry, module)
        if current is not entry.param:  # FSDP2 gathered the full tensor for this forward
            return self._gathered_weight(entry, module, current)
        if module.training:
            if not isinstance(entry, QuantizedParam):
                return None
            return self._straight_through_weight(entry, entry.param, entry.logit) if self._straight_through else self._noisy_weight(entry)
        return self._eval_weight(entry)

    def _gathered_weight(self, entry: SwappedParam, module: nn.Module, current: torch.Tensor) -> torch.Tensor | None:
        """Under FSDP2 (``fully_shard``): the entry's parameter and bits logit are shards; the slot
        holds the full weight gathered for this forward, and the module that holds the logit its
        full logit. Both are used; no cache (the gathered tensors are new every forward)."""
        if isinstance(entry, KeptParam):
            return None if not entry.half or module.training else current.detach().half().to(current.dtype)
        slot = entry.slots[0]
        logit = slot.module._parameters[slot.attr + self.suffix]
        if is_dtensor(logit):
            raise RuntimeError(
                f"DiffQuantizer under FSDP2: the bits of {entry.name!r} are not gathered while its weight is: "
                f"fully_shard the module that holds both ({type(slot.module).__name__}) as one unit, or a parent of it"
            )
        if not module.training:
            with torch.no_grad():
                return self._dequantized(entry, current.detach(), logit.detach())
        if self._straight_through:
            return self._straight_through_weight(entry, current, logit)
        return self._noisy_weight(entry, current, logit)

    def _traced_weight(self, entry: SwappedParam, module: nn.Module) -> torch.Tensor | None:
        """Inside a ``torch.compile``d forward: the noisy weight :meth:`prepare_compiled_step`
        drew before it (a graph input; the noise generators cannot be traced, and the version-keyed
        caches of the eager path would be frozen into the graph), or the true quantized weight
        computed in the graph."""
        if not module.training:
            return self.quantized_weight(entry)
        if not isinstance(entry, QuantizedParam):
            return None
        if self._straight_through:
            return self._straight_through_weight(entry, entry.param, entry.logit)
        if entry._noisy is None:
            _no_drawn_noise(entry.name)
        return entry._noisy[0]

    def prepare_compiled_step(self) -> None:
        """Draw this step's noisy weights now, eagerly, in registration order, for a ``torch.compile``d
        training forward that follows: the compiled swap hooks hand them out (graph inputs whose
        backward runs DiffQ's own autograd node, penalty included). The same noise as an eager
        forward that uses the weights in registration order."""
        self.new_noise()
        if self.enabled and self._saved is None and not self._straight_through:
            for qp in self._qparams:
                self._noisy_weight(qp)

    def _noisy_weight(self, qp: QuantizedParam, p: torch.Tensor | None = None, logit: torch.Tensor | None = None) -> torch.Tensor:
        """``p`` / ``logit``: FSDP2's gathered tensors, else the entry's own."""
        gathered = p is not None
        p, logit = (p, logit) if gathered else (qp.param, qp.logit)
        versions = (p._version, logit._version)
        if qp._noisy is not None and qp._noisy[1:] == (*versions, qp._noisy[0]._version):
            return qp._noisy[0]  # a tied weight used again in this forward (its backward reuses the memory)
        if not gathered and self._draw_small_weights(qp):
            return qp._noisy[0]
        noise = torch.empty_like(p, memory_format=torch.contiguous_format) if gathered else qp.noise_buffer()
        noise, half = self._sampler.draw(noise, self._rng.generator(p.device))
        if gathered:
            with torch.no_grad():
                unit, log_slope, penalty_grad = self._constants_of(logit.detach(), qp)
        else:
            unit, log_slope, penalty_grad = self._step_constants()[qp.logit]
        with torch.no_grad():
            std = self._noise_std(qp, p, unit, half)
        if qp.ranges is not None and not gathered:  # not learned yet: in the graph with a zero gradient (DDP)
            logit = logit + _unused(qp.ranges).sum()
        noisy = inject_noise(p, logit, std, log_slope, noise, penalty_grad)
        if not gathered:  # FSDP2's gathered tensors are new every forward: nothing to reuse, nothing kept
            qp._noisy = (noisy, *versions, noisy._version)
        return noisy

    def _small_weights(self) -> list[QuantizedParam]:
        """The quantized weights whose noise :meth:`_draw_small_weights` draws together: float32,
        contiguous, on the reference grid (one range per tensor, no learned ranges), with the
        configured group size, at most ``BATCH_NUMEL`` entries each and a multiple of 4 (the
        16-bit draws then fall on them exactly as when each is drawn alone), on one device where
        the noise is drawn from the table; none when the parameters are FSDP2 shards."""
        if not self.group_size or not self._qparams:
            return []
        device = self._qparams[0].param.device
        if not self._sampler.uses_table(device) or self.sharded:
            return []
        return [qp for qp in self._qparams
                if qp.range_block == qp.param.numel() and qp.ranges is None and qp.group_size == self.group_size
                and qp.param.dtype == torch.float32 and qp.param.device == device and qp.param.is_contiguous()
                and qp.param.numel() <= BATCH_NUMEL and qp.param.numel() % 4 == 0]  # fmt: skip

    def _draw_small_weights(self, qp: QuantizedParam) -> bool:
        """When ``qp`` is one of :meth:`_small_weights`: this step's noisy weights of all of them
        at once, in registration order (one draw, one range pass, one autograd node), the same
        values, noise included, as drawing each alone in that order; True. Models of many small
        weights spend their DiffQ time in per-op dispatch, not arithmetic. The others are drawn
        one by one when first used."""
        if self._batch is None:
            batch = self._small_weights()
            if len(batch) < 2:
                batch = []
            counts = torch.tensor([b.num_groups for b in batch], dtype=torch.int64, device=batch[0].param.device) if batch else None
            self._batch = (batch, {id(b) for b in batch}, counts)
        batch, members, counts = self._batch
        if id(qp) not in members:
            return False
        params = [b.param for b in batch]
        noise = torch.empty(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device)
        noise, half = self._sampler.draw(noise, self._rng.generator(noise.device))
        constants = self._step_constants()
        unit, log_slope, penalty_grad = (
            None if parts[0] is None else torch.cat(parts) for parts in zip(*(constants[b.logit] for b in batch))
        )
        with torch.no_grad():
            detached = [p.detach() for p in params]  # the spans as tensor_range's: exact min and max, float64 difference
            if hasattr(torch, "_foreach_max"):  # torch >= 2.4
                mx = torch.stack(torch._foreach_max(detached)).double()
                mn = torch.stack(torch._foreach_max(torch._foreach_neg(detached))).double().neg_()
            else:
                mn, mx = (torch.stack(ends).double() for ends in zip(*(torch.aminmax(p) for p in detached)))
            span = (mx - mn).float().mul_(half)
            std = unit * torch.repeat_interleave(span, counts, output_size=unit.numel())
        outputs = inject_noise_many(params, [b.logit for b in batch], self.group_size, std, log_slope, noise, penalty_grad)
        for entry, noisy in zip(batch, outputs):
            entry._noisy = (noisy, entry.param._version, entry.logit._version, noisy._version)
        return True

    def _straight_through_weight(self, qp: QuantizedParam, p: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        """``p + (q(p) - p).detach()``: the true quantized values forward, the identity backward;
        with learned ranges, LSQ's gradient for ``p`` and the ranges."""
        ranges = self.learned_ranges(qp)
        if ranges is not None:
            bits = self._size.true_bits_of(logit.detach()) + _unused(logit)  # frozen bits, still in the graph
            return learned_grid_fake_quantize(p, bits, qp.group_size, qp.range_block, *range_ends(ranges, qp.symmetric), qp.scale_dtype)
        with torch.no_grad():
            delta = self._dequantized(qp, p.detach(), logit.detach()).sub_(p.detach())
        one = _unused(logit).sum().add(1)  # exactly 1; the frozen bits stay in the graph (DDP expects their gradient)
        return torch.addcmul(p, delta, one)

    @staticmethod
    def _noise_std(qp: QuantizedParam, p: torch.Tensor, unit: torch.Tensor, half: float) -> torch.Tensor:
        """The noise scale of each cell of ``p``: ``unit * span * half``, ``span`` the range of the
        cell's block (the whole tensor's on the reference grid: one value per group)."""
        if qp.range_block == p.numel():
            _, _, span = tensor_range(p)
            return (unit * (span * half)).to(p.dtype)
        mn, mx = block_range(p, qp.range_block, symmetric=qp.symmetric)
        cell = cell_size(qp.group_size, qp.range_block)
        span = per_cell(mx.sub_(mn).mul_(half), qp.range_block, cell)
        return per_cell(unit, qp.group_size, cell).mul(span).to(p.dtype)

    # ----------------------------------------------------------------------------- noise RNG
    def seed_noise(self, seed: int | None) -> None:
        """Draw the training noise from generators of its own, seeded with ``seed`` (one per
        device), instead of torch's global RNG: the noise no longer depends on what else draws
        random numbers, so it can be checkpointed (:meth:`noise_rng_state`) and is the same on
        every DDP rank. ``None``: back to the global RNG."""
        self._rng.reseed(seed)

    def noise_rng_state(self) -> dict[str, torch.Tensor]:
        """The noise seed (key ``"seed"``) and each generator's state by device name; empty without
        :meth:`seed_noise`. Tensors only, so checkpoints load with ``weights_only=True``."""
        return self._rng.state()

    def set_noise_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`noise_rng_state` returned: the seed, then each generator's state."""
        self._rng.load_state(state)

    def _backward_done(self, qp: QuantizedParam) -> None:
        qp.backward_done()
        self._constants = None  # the optimizer step that follows changes the logits

    def _step_constants(self) -> dict[nn.Parameter, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Per logit: noise unit ``1 / (2**bits - 1)``, its logarithmic derivative and the size
        penalty's gradient (None without penalty), for every logit at once (a handful of ops per
        step instead of a handful per tensor), recomputed when a logit or the penalty changes."""
        # fused optimizers (Adam(fused=True)) update in place without bumping version counters: the
        # cache is also dropped at every root forward and after every backward (new_noise, backward_done)
        key = (tuple(qp.logit._version for qp in self._qparams), self.size_penalty)
        if self._constants is not None and self._constants[0] == key:
            return self._constants[1]
        logits = [qp.logit.detach() for qp in self._qparams]
        with torch.no_grad():
            if len({logit.device for logit in logits}) == 1:
                lengths = [qp.num_groups for qp in self._qparams]
                columns = [t.split(lengths) if t is not None else [None] * len(lengths) for t in self._constants_of(torch.cat(logits))]
                parts = zip(*columns)
            else:  # logits on several devices: one computation each
                parts = (self._constants_of(logit, qp) for logit, qp in zip(logits, self._qparams))
            constants = {qp.logit: part for qp, part in zip(self._qparams, parts)}
        self._constants = (key, constants)
        return constants

    def _constants_of(
        self, logit: torch.Tensor, qp: QuantizedParam | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``unit``, ``d log(unit) / d logit`` and the penalty's gradient of ``logit``."""
        unit, log_slope, bits_slope = self._bits.step_constants(logit)
        if not self.size_penalty:
            return unit, log_slope, None
        group_sizes = self._size.layout().group_sizes if qp is None else qp.group_size
        return unit, log_slope, bits_slope.mul_(group_sizes).mul_(self.size_penalty / MEGABYTE_BITS)

    def _eval_weight(self, entry: SwappedParam) -> torch.Tensor:
        logit_version = entry.logit._version if isinstance(entry, QuantizedParam) else 0
        ranges_version = entry.ranges._version if isinstance(entry, QuantizedParam) and entry.ranges is not None else 0
        versions = (entry.param._version, logit_version, ranges_version)
        if entry._eval is None or entry._eval[1:] != versions:
            entry._eval = (self.quantized_weight(entry), *versions)
        return entry._eval[0]

    @torch.no_grad()
    def quantized_weight(self, entry: SwappedParam) -> torch.Tensor:
        """The true quantized (or fp16-rounded) value of one parameter, as a float tensor."""
        p = entry.param.detach()
        if isinstance(entry, KeptParam):
            return p.half().to(p.dtype) if entry.half else p
        return self._dequantized(entry, p, entry.logit.detach())

    def _dequantized(self, qp: QuantizedParam, p: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        bits = self._size.true_bits_of(logit)
        levels, mn, mx = self.grid_levels(qp, p, bits)
        return grid_dequantize(levels, mn, mx, bits, qp.range_block, dtype=p.dtype).view_as(p)

    def grid_levels(self, qp: QuantizedParam, p: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer levels and the ranges (one per block) of ``p`` at ``bits`` per group: the learned
        ranges once they are trained, else the (searched) min / max ranges."""
        ranges = self.learned_ranges(qp)
        return grid_quantize(p, bits, qp.group_size, qp.range_block, qp.scale_dtype, qp.range_search,
                             ranges=None if ranges is None else range_ends(ranges, qp.symmetric), symmetric=qp.symmetric)  # fmt: skip

    @torch.no_grad()
    def rounding_pull(self, qp: QuantizedParam) -> torch.Tensor:
        """``offset / step`` for each entry of ``qp`` on its true grid (frozen bits, learned or
        searched ranges; :func:`grid_rounding_pull`): half the gradient of ``offset**2`` in the
        weight, so a step against it moves the entry towards its level. Zero beyond the range.
        Learned ranges are read as they are (no levels computed); searched ones need the search."""
        p = qp.param.detach()
        bits = self._size.true_bits_of(qp.logit.detach())
        ranges = self.learned_ranges(qp)
        if ranges is None:
            _, mn, mx = self.grid_levels(qp, p, bits)
        else:
            mn, mx = given_ranges(range_ends(ranges, qp.symmetric), qp.scale_dtype, compute_dtype(p.dtype))
        return grid_rounding_pull(p, bits, qp.group_size, qp.range_block, mn, mx).to(p.dtype)

    def learned_ranges(self, qp: QuantizedParam) -> torch.Tensor | None:
        """``qp``'s learned ``[min, max]`` per block (shape ``(2, blocks)``; ``(1, blocks)`` of ``m``
        on a symmetric grid) once the straight-through phase has started them, else None."""
        ranges = qp.ranges
        if ranges is None:
            return None
        if qp._ranges_ready is None and not torch.compiler.is_compiling():  # once, and after each load_state_dict
            qp._ranges_ready = ranges_started(ranges)
        return ranges if qp._ranges_ready else None

    @torch.no_grad()
    def _start_learned_ranges(self) -> None:
        """Start every learned range that has no value yet from the (searched) min / max ranges."""
        for qp in self._qparams:
            if qp.ranges is not None and self.learned_ranges(qp) is None:
                _, mn, mx = grid_quantize(qp.param.detach(), self.true_bits(qp), qp.group_size, qp.range_block, qp.scale_dtype,
                                          qp.range_search, symmetric=qp.symmetric)  # fmt: skip
                qp.ranges.copy_(stored_ranges(mn, mx, qp.symmetric))
                qp._ranges_ready = True  # a host flag: no device read per step, compiled forwards read it too

    def new_noise(self) -> None:
        """Draw fresh noise at the next training forward.

        Happens by itself on every forward of the root model and after each backward; a tied
        parameter used twice within one forward sees the same noisy tensor.
        """
        for qp in self._qparams:
            qp.drop_noise()
        self._constants = None
        self._batch = None

    def _on_root_forward(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():
            return  # prepare_compiled_step drew this step's noise; the eval weights are computed in the graph
        self._keep_logits_float32()
        self.new_noise()
        if module.training:  # the eval cache is only worth its memory while evaluating
            for entry in self._swapped_entries():
                entry._eval = None

    def _keep_logits_float32(self) -> None:
        """Bits logits stay float32 (``model.half()`` / ``.to(torch.bfloat16)`` / ``.double()`` convert
        them too): in bfloat16 Adam's updates of a logit vanish below its ulp. Put back, once, with a
        warning; the Lightning callback keeps them float32 through the conversion itself."""
        changed = [qp.name for qp in self._qparams if qp.logit.dtype != torch.float32]
        if not changed:
            return
        for qp in self._qparams:
            if qp.logit.dtype != torch.float32:
                qp.logit.data = qp.logit.data.float()
                if qp.logit.grad is not None:
                    qp.logit.grad = qp.logit.grad.float()
        self._constants = None
        warnings.warn(
            f"DiffQuantizer: the bits logits of {changed[:3]}{'...' if len(changed) > 3 else ''} were converted to another "
            "dtype with the model; they are kept float32 (half-precision logits do not learn). Build the optimizer after "
            "converting the model, or convert the model before attaching the quantizer",
            stacklevel=3,
        )

    # ----------------------------------------------------------------------------- quantize / restore
    @property
    def is_quantized(self) -> bool:
        """True between :meth:`quantize` and :meth:`restore`."""
        return self._saved is not None

    @torch.no_grad()
    def quantize(self) -> bool:
        """Write the true quantized weights into the parameters, keeping the float ones aside.

        Returns False if already quantized. ``state_dict()`` still returns the float weights.
        """
        if self._saved is not None:
            return False
        self.check_finite()
        saved: dict[int, torch.Tensor] = {}
        for entry in self._swapped_entries():
            if id(entry.param) in saved:
                continue
            value = self.quantized_weight(entry)
            saved[id(entry.param)] = entry.param.detach().clone()
            entry.param.detach().copy_(value)
        self._saved = saved
        self._refresh_rnns()
        return True

    @torch.no_grad()
    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` naming every quantized tensor, and every tensor's bits
        logits, that holds NaN or Inf (a NaN logit has no number of bits: its weights would
        quantize to NaN)."""
        broken = [qp.name for qp in self._qparams if not torch.isfinite(qp.param).all()]
        broken += [f"{qp.name} (its bits, {qp.slots[0].qualified_name}{self.suffix})" for qp in self._qparams
                   if not torch.isfinite(qp.logit).all()]  # fmt: skip
        broken += [f"{qp.name} (its learned ranges)" for qp in self._qparams
                   if qp.ranges is not None and not torch.isfinite(qp.ranges).all()]  # fmt: skip
        if broken:
            raise FloatingPointError(
                f"DiffQuantizer: NaN or Inf in {broken}; their quantized values would be meaningless. The model "
                "diverged: check the loss and the learning rates (Trainer(detect_anomaly=True) finds the first op)"
            )

    @torch.no_grad()
    def restore(self) -> bool:
        """Put back the exact float weights saved by :meth:`quantize`. Returns False if not quantized."""
        if self._saved is None:
            return False
        saved, self._saved = self._saved, None
        for entry in self._swapped_entries():
            if id(entry.param) in saved:
                entry.param.detach().copy_(saved[id(entry.param)])
        self._refresh_rnns()
        return True

    unquantize = restore  # reference name

    @contextmanager
    def quantized(self) -> Iterator[None]:
        """Context manager: true quantized weights inside, exact float weights restored on exit."""
        entered = self.quantize()
        try:
            yield
        finally:
            if entered:
                self.restore()

    enter_quantize = quantized  # reference name

    def _refresh_rnns(self) -> None:
        for entry in self._swapped_entries():
            for slot in entry.slots:
                refresh_rnn(slot.module)

    def rebind(self) -> None:
        """Re-read every parameter and bits logit from the module that holds it: FSDP2's
        ``fully_shard`` replaces them with sharded ``DTensor`` parameters after the quantizer was
        attached (the optimizer then holds those). Forwards use the gathered full tensors."""
        rebind([*self._qparams, *self._kept])
        for qp in self._qparams:
            slot = qp.slots[0]
            qp.logit = slot.module._parameters[slot.attr + self.suffix]
            qp._noisy = qp._eval = None
        self._constants = None

    @property
    def sharded(self) -> bool:
        """Whether the parameters are FSDP2 shards (``DTensor``)."""
        return any(is_dtensor(qp.param) for qp in self._qparams)

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Inside: every sharded parameter and bits logit is replaced, in the entries, by its full
        tensor (one all-gather each; every rank must enter), so sizes, statistics, checks and the
        export see whole tensors. Back to the shards on exit. A no-op when nothing is sharded."""
        if not self.sharded:
            yield
            return
        shards = [(e, e.param, getattr(e, "logit", None)) for e in [*self._qparams, *self._kept]]
        try:
            with torch.no_grad():
                for entry, param, logit in shards:
                    entry.param = full_tensor(param)
                    if logit is not None:
                        entry.logit = full_tensor(logit)
            yield
        finally:
            for entry, param, logit in shards:
                entry.param = param
                if logit is not None:
                    entry.logit = logit

    def _grid_name(self, qp: QuantizedParam) -> str:
        if qp.scale_dtype is None:
            return "one fp32 range per tensor"
        where = "channel" if self.scale == "channel" else f"{qp.range_block} entries"
        return f"a {self.scale_dtype} {'symmetric range [-m, m]' if qp.symmetric else 'range'} per {where}"

    def _swapped_entries(self) -> list[SwappedParam]:
        """Entries whose modules see another tensor in some mode (fp32-kept ones never do)."""
        return [*self._qparams, *(k for k in self._kept if k.half)]

    def _float_state_dict(self, state_dict: dict[str, Any], prefix: str, slots: list[tuple[str, SwappedParam]]) -> None:
        if self._saved is None:
            return
        for attr, entry in slots:
            key = prefix + attr
            if key in state_dict and id(entry.param) in self._saved:
                state_dict[key] = self._saved[id(entry.param)]

    def coverage(self) -> CoverageReport:
        """Every parameter: quantized with learned bits, or kept float and why (no activations:
        DiffQ quantizes weights; add ``EMAFakeQuant(weights=False)`` for them)."""
        quantized = {id(qp.param): f"diffq {self.min_bits:g}..{self.max_bits:g} learned bits, groups of {qp.group_size}, "
                                   + self._grid_notes.get(id(qp.param), self._grid_name(qp))
                                   + (f", clipping searched over {qp.range_search + 1} ratios" if qp.range_search else "")
                     for qp in self._qparams}  # fmt: skip
        own = {id(qp.logit) for qp in self._qparams} | {id(qp.ranges) for qp in self._qparams if qp.ranges is not None}
        return CoverageReport("DiffQ", weight_rows(self.model, quantized, self._kept_reasons, own))

    # ----------------------------------------------------------------------------- sizes
    def model_size(self, exact: bool = False) -> torch.Tensor:
        """Estimated model size in MB: differentiable w.r.t. the bits unless ``exact`` (formula in
        :mod:`~qat_lightning.quantizers.diffq_size`)."""
        return self._size.model_size(exact)

    def true_model_size(self) -> float:
        """Exact size in MB of the quantized model (rounded bits, no further compression)."""
        with torch.no_grad():
            return self._size.model_size(exact=True).item()

    def float_model_size(self) -> float:
        """Size in MB of the same parameters stored in fp32 (bits logits not counted)."""
        return self._size.float_model_size()

    def average_bits(self, exact: bool = False) -> torch.Tensor:
        """Mean number of bits per quantized weight (``extra_bits`` included); not differentiable."""
        return self._size.average_bits(exact)

    def stored_bits(self) -> float:
        """Bits per quantized weight as stored (payload, each group's width, the ranges, headers):
        the "bits per weight including scales" to compare with other formats."""
        return self._size.stored_bits()

    def stored_bits_if(self, width: int) -> float:
        """:meth:`stored_bits` if every group had ``width`` bits (``min_bits``: the smallest size)."""
        return self._size.stored_bits_if(width)

    def fit_budget(self, target_bits: float) -> float:
        """Bring the model to a size budget: move every bits logit by the one common amount, up or
        down, the largest that keeps :meth:`stored_bits` at most ``target_bits``; returns the amount.
        ``DiffQ(target_bits=...)`` calls it once, when the bits stop being learned."""
        return self._size.fit_budget(target_bits)

    def size_gradient(self) -> list[torch.Tensor]:
        """``d model_size() / d logit`` for each logit of :meth:`parameters`, in closed form without
        autograd (cheaper than differentiating ``model_size()`` every step)."""
        return self._size.size_gradient()

    def layer_stats(self) -> list[dict[str, Any]]:
        """Per tensor, in model order: name, shape, entries, true bits per group (mean, std, min,
        max), size in MB (as counted by :meth:`true_model_size`, which is their sum) and share of
        the total. Unquantized tensors report 32 or 16 bits."""
        return self._size.layer_stats()

    # ----------------------------------------------------------------------------- optimizer
    def parameters(self) -> list[nn.Parameter]:
        """The bits logits, one per quantized tensor (one per tied group with ``detect_bound``)."""
        return [qp.logit for qp in self._qparams]

    def clear_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Remove the bits logits from every param group of ``optimizer``."""
        ids = {id(p) for p in self.parameters()}
        for group in optimizer.param_groups:
            group["params"][:] = [p for p in group["params"] if id(p) not in ids]

    def setup_optimizer(self, optimizer: torch.optim.Optimizer, lr: float = 1e-3, **kwargs: Any) -> dict[str, Any]:
        """Give the bits logits their own param group (``lr``, weight decay 0, ``kwargs`` on top;
        Adam / AdamW run it with their fused kernel unless ``kwargs`` say otherwise).

        Logits already in the optimizer (built after the quantizer) are moved out of their group.
        """
        check_number("lr", lr, low=0, low_open=True)
        self.clear_optimizer(optimizer)
        options = fused_options(optimizer, self.parameters()) if "foreach" not in kwargs else {}
        group = {"params": self.parameters(), "lr": lr, "weight_decay": 0.0, **options, **kwargs}
        optimizer.add_param_group(group)
        return optimizer.param_groups[-1]

    def no_optimizer(self) -> None:
        """Reference API; nothing to do here (training does not require an optimizer setup)."""

    # ----------------------------------------------------------------------------- lifecycle
    def detach(self) -> None:
        """Restore float weights, remove every hook and the bits logits from the model."""
        self.restore()
        self._swapper.remove()
        for handle in self._handles:
            handle.remove()
        for qp in self._qparams:
            slot = qp.slots[0]
            for name in (slot.attr + self.suffix, slot.attr + "_range" + self.suffix):
                if name in slot.module._parameters:
                    del slot.module._parameters[name]
        self._qparams.clear()
        self._kept.clear()
        self._constants = None

    def quantized_params(self) -> list[QuantizedParam]:
        """Quantized parameter records (name, parameter, logit, group size), in model order."""
        return list(self._qparams)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(quantized={len(self._qparams)}, kept={len(self._kept)}, "
            f"group_size={self.group_size}, bits=[{self.min_bits}, {self.max_bits}], param={self.param!r}, "
            f"noise={self.noise!r})"
        )


DiffQuantizer.__doc__ = DiffQuantizer.__doc__.replace("{options}", args_doc(DiffQConfig).lstrip())
