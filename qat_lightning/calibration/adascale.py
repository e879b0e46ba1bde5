"""AdaScale post-training weight quantization (AIMET): FlexRound + learnable weight clipping, trained
block by block against the float model's outputs.

Per supported layer (Linear, Conv1d, Conv2d), zero-initialised: ``gamma``, ``beta`` (per output
channel), ``s2`` (weight-shaped), ``s3`` (per output channel) and, for convolutions, ``s4`` (per
input channel). The quantized weight is the symmetric quantize-dequantize of
``W' = W / (exp(s2)·exp(s3)[·exp(s4)])`` with ``scale = (exp(gamma)·max - exp(beta)·min) / (2^b - 1)``,
``min``/``max`` frozen from the initial per-channel encodings (``∓max|W|``): at zero init this is
plain round-to-nearest symmetric quantization. Each block (a module with one tensor in and one out)
is trained to match the float block's output, ``((fp - q)^2).sum(1).mean()``, with Adam (1e-3 for
gamma/beta, 5e-4 for the scales) under a cosine schedule, its input coming from the already
quantized blocks before it. Afterwards ``W'`` is written into the weight (in place, as AIMET does)
and the scale frozen into a :class:`LearnedStepWeight` (not trainable), so the result is the
plain model plus fixed weight quantizers; activation ranges are calibrated afterwards if wanted.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._validate import check_bool, check_module_types, check_number, check_patterns
from .calibrate import _to_device, default_forward, map_tensors
from ..coverage import CoverageReport, parameter_names
from ..layers import direct_readers, layer_weights
from ..quantizers.fake_quantizer import WEIGHT_SUFFIX, EMAFakeQuantizer
from ..quantizers.weight import LearnedStepWeight
from ..formats.lsq import learned_step_quantize
from ..formats.uniform import compute_dtype
from ..quantizers.swap import Slot, SwappedParam, WeightSwapper

log = logging.getLogger(__name__)
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)  # and subclasses, and HF Conv1D
DEFAULT_BLOCK_TYPES: tuple[type[nn.Module], ...] = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def supported(module: nn.Module) -> bool:
    """Whether AdaScale trains ``module``'s weight: a Linear (or subclass), Conv1d, Conv2d, or a
    registered layer with one 2-D ``weight`` (Hugging Face ``Conv1D``: output channels on axis 1)."""
    if isinstance(module, SUPPORTED_TYPES):
        return isinstance(module._parameters.get("weight"), nn.Parameter)
    weights = layer_weights(module)
    return list(weights) == ["weight"] and module._parameters["weight"].dim() == 2 and not isinstance(module, (nn.Embedding, nn.EmbeddingBag))


def weight_axis(module: nn.Module) -> int:
    return layer_weights(module).get("weight", 0)
CONTAINERS = (nn.Sequential, nn.ModuleList)


class AdaScaleParams(nn.Module):
    """The trainable AdaScale parameters of one layer and its quantized weight (``forward(W)``).

    Parameters and math in float32 whatever the weight's dtype (float64 for float64; the result
    rounded once into it):
    Adam's epsilon and the small scale updates vanish in float16 / bfloat16."""

    def __init__(self, weight: torch.Tensor, bits: int, axis: int = 0) -> None:
        super().__init__()
        self.axis = axis  # 1: a weight stored (in, out) (Hugging Face Conv1D); the math runs on its transpose
        weight = weight.t() if axis else weight
        out_channels = weight.shape[0]
        channel_shape = (out_channels,) + (1,) * (weight.dim() - 1)
        options = dict(dtype=compute_dtype(weight.dtype), device=weight.device)
        self.gamma = nn.Parameter(torch.zeros(out_channels, **options))
        self.beta = nn.Parameter(torch.zeros(out_channels, **options))
        self.s2 = nn.Parameter(torch.zeros(weight.shape, **options))
        self.s3 = nn.Parameter(torch.zeros(channel_shape, **options))
        self.s4 = nn.Parameter(torch.zeros((1, weight.shape[1]) + (1,) * (weight.dim() - 2), **options)) if weight.dim() > 2 else None
        with torch.no_grad():
            largest = weight.detach().flatten(1).abs().amax(1).float()
        self.register_buffer("max", largest)  # symmetric initial encodings: [-max|W|, max|W|]
        self.register_buffer("min", -largest)
        self.register_buffer("zero", torch.zeros_like(largest))  # symmetric: no offset
        self.bits = bits
        self.q_min, self.q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def scale(self) -> torch.Tensor:
        return ((torch.exp(self.gamma) * self.max - torch.exp(self.beta) * self.min) / (2**self.bits - 1)).clamp(min=1e-12)

    def divisor(self) -> torch.Tensor:
        divisor = torch.exp(self.s2) * torch.exp(self.s3)
        return divisor * torch.exp(self.s4) if self.s4 is not None else divisor

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.t() if self.axis else weight
        scaled = w.to(self.s2.dtype) / self.divisor()
        out = learned_step_quantize(scaled, self.scale(), self.zero, self.q_min, self.q_max, 1.0, axis=0).to(weight.dtype)
        return out.t() if self.axis else out

    def folded(self, weight: torch.Tensor) -> torch.Tensor:
        """``W / divisor`` in the weight's layout and dtype: what is written into the weight."""
        w = weight.t() if self.axis else weight
        out = (w.to(self.s2.dtype) / self.divisor()).to(weight.dtype)
        return out.t() if self.axis else out

    def groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(gamma, beta) and the scales (s2, s3[, s4]): the two optimizer groups."""
        scales = [self.s2, self.s3] + ([self.s4] if self.s4 is not None else [])
        return [self.gamma, self.beta], scales


@dataclass
class BlockReport:
    name: str
    layers: list[str]
    loss_before: float  # round-to-nearest (zero init)
    loss_after: float


@dataclass
class AdaScaleResult:
    """What :func:`apply_adascale` produced: the installed weight quantizer (frozen steps), the
    frozen scales by weight name, a loss report per block, the layers left float, the weights
    kept at round-to-nearest (with the reason) and the coverage report."""

    quantizer: EMAFakeQuantizer
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: list[BlockReport] = field(default_factory=list)
    left_float: list[str] = field(default_factory=list)
    round_to_nearest: dict[str, str] = field(default_factory=dict)
    coverage: CoverageReport | None = None


class _StopForward(Exception):
    pass


def find_blocks(model: nn.Module, block_types: Sequence[type[nn.Module]] | None = None) -> list[tuple[str, nn.Module]]:
    """Blocks in model order, outermost matches only: the modules of ``block_types`` if given; by
    default ``nn.TransformerEncoderLayer`` and non-leaf children of ``nn.Sequential`` /
    ``nn.ModuleList`` that contain supported layers. Every supported layer outside those is a block
    of its own."""
    heuristic = block_types is None
    types = tuple(block_types) if block_types is not None else DEFAULT_BLOCK_TYPES
    blocks: list[tuple[str, nn.Module]] = []
    taken: list[str] = []

    def inside(name: str) -> bool:
        return any(name == t or name.startswith(f"{t}.") or t == "" for t in taken)

    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    for name, module in model.named_modules():
        if inside(name):
            continue
        has_layers = any(supported(m) for m in module.modules())
        is_leaf = not any(True for _ in module.children())
        in_container = isinstance(parents.get(id(module)), CONTAINERS)
        if (types and isinstance(module, types)) or (heuristic and has_layers and not is_leaf and in_container and module is not model):
            blocks.append((name, module))
            taken.append(name)
        elif supported(module):
            blocks.append((name, module))
            taken.append(name)
    return blocks


def apply_adascale(
    model: nn.Module,
    data_loader: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    num_epochs: int = 1,
    *,
    num_iterations: int | None = None,
    num_batches: int | None = None,
    bits: int = 4,
    block_types: Sequence[type[nn.Module]] | None = None,
    lr: float = 1e-3,
    scale_lr: float = 5e-4,
    fp_input_mix: float = 0.0,
    device: torch.device | str | None = None,
    progress: bool = True,
    exclude: Sequence[str] = (),
) -> AdaScaleResult:
    """AdaScale the weights of ``model`` in place and install frozen ``bits``-bit weight quantizers.

    Args:
        model: the (trained, float) model; its weights are changed in place.
        data_loader: calibration batches (``num_batches`` of them, all if None), fed by ``forward_fn``
            (default: ``model(batch[0])`` for tuples/lists, ``model(**batch)`` for dicts).
        num_epochs: passes over the calibration batches per block (ignored if ``num_iterations``).
        num_iterations: optimizer steps per block (AIMET's default is 1500).
        bits: weight bit width (2..8).
        block_types: module types treated as blocks (see :func:`find_blocks`).
        lr, scale_lr: Adam learning rates of gamma/beta and of s2/s3/s4.
        fp_input_mix: 0 feeds each block the quantized model's activations, 1 the float model's,
            in between a convex mix.
        progress: a progress bar over blocks and iterations.
        exclude: fnmatch patterns of module or parameter names left float (``["*lm_head*"]``); a
            tied tensor is excluded by any of its names.
    Returns:
        :class:`AdaScaleResult`. Layers other than Linear (and subclasses) / Conv1d / Conv2d /
        Hugging Face Conv1D stay float and are listed (warning); a tied weight (GPT-2's ``wte`` /
        ``lm_head``) keeps round-to-nearest, so both uses stay one tensor; the model's train/eval
        mode (and a Hugging Face ``config.use_cache``) is restored. Blocks are replayed with the
        positional and keyword arguments they were called with (masks, position embeddings).
    """
    # Lightning's validate/test run hooks under inference mode: this needs autograd
    with torch.inference_mode(False), torch.enable_grad():
        return _apply_adascale(
            model, data_loader, forward_fn, num_epochs, num_iterations=num_iterations, num_batches=num_batches, bits=bits,
            block_types=block_types, lr=lr, scale_lr=scale_lr, fp_input_mix=fp_input_mix, device=device, progress=progress,
            exclude=exclude,
        )  # fmt: skip


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face models fill a key/value cache passed to every layer: replaying a block with it
    would grow it; switch ``config.use_cache`` off while AdaScale runs."""
    config = getattr(model, "config", None)
    before = getattr(config, "use_cache", None)
    if before:
        config.use_cache = False
    try:
        yield
    finally:
        if before:
            config.use_cache = before


def _apply_adascale(
    model: nn.Module, data_loader: Iterable[Any], forward_fn: Callable[[nn.Module, Any], Any] | None, num_epochs: int, *,
    num_iterations: int | None, num_batches: int | None, bits: int, block_types: Sequence[type[nn.Module]] | None,
    lr: float, scale_lr: float, fp_input_mix: float, device: torch.device | str | None, progress: bool,
    exclude: Sequence[str],
) -> AdaScaleResult:  # fmt: skip
    exclude = check_patterns("exclude", exclude)
    check_number("num_epochs", num_epochs, low=1, integer=True)
    if num_iterations is not None:
        check_number("num_iterations", num_iterations, low=1, integer=True)
    if num_batches is not None:
        check_number("num_batches", num_batches, low=1, integer=True)
    check_number("bits", bits, low=2, high=8, integer=True)
    check_number("lr", lr, low=0, low_open=True)
    check_number("scale_lr", scale_lr, low=0, low_open=True)
    check_number("fp_input_mix", fp_input_mix, low=0, high=1)
    check_bool("progress", progress)
    block_types = check_module_types("block_types", block_types)
    forward_fn = forward_fn or default_forward

    names = {id(m): n for n, m in model.named_modules()}
    blocks = find_blocks(model, block_types)
    quantizer = frozen_weight_quantizer(model, bits, exclude)
    weight_quantizers = {id(q_module): q for q_module, q in _layer_quantizers(model).items()}
    layers_in_blocks = {id(layer) for _, block in blocks for layer in block.modules() if id(layer) in weight_quantizers}
    left_float = [
        n for n, m in model.named_modules()
        if layer_weights(m) and id(m) not in layers_in_blocks
    ]  # fmt: skip
    if not layers_in_blocks:
        quantizer.remove()
        raise ValueError("apply_adascale(): the model has no Linear / Conv1d / Conv2d layer to quantize (or exclude took them all)")
    if left_float:
        log.warning("AdaScale leaves these layers float (unsupported types or excluded): %s", left_float)
    tied = _tied_weights(model)

    batches = []
    for index, batch in enumerate(data_loader):
        if num_batches is not None and index >= num_batches:
            break
        batches.append(_normal_tensors(_to_device(batch, device)))
    if not batches:
        raise ValueError("apply_adascale(): the data loader gave no batches")

    modes = {m: m.training for m in model.modules()}
    blocks = _in_execution_order(model, blocks, batches[0], forward_fn)
    float_model = copy.deepcopy(model)
    _strip_quantizers(float_model)
    result = AdaScaleResult(quantizer=quantizer, left_float=left_float)
    model.eval()
    float_model.eval()
    per_block = num_iterations or num_epochs * len(batches)
    bar = _progress(len(blocks) * per_block, progress)
    try:
        for block_name, block in blocks:
            in_block = [m for m in block.modules() if id(m) in weight_quantizers]
            for layer in in_block:
                if id(layer.weight) in tied:
                    result.round_to_nearest[f"{names[id(layer)]}.weight"] = f"tied to {tied[id(layer.weight)]}: one tensor, one grid"
                    _freeze(weight_quantizers[id(layer)], AdaScaleParams(layer.weight.detach(), bits, weight_axis(layer)), layer)
            layers = [m for m in in_block if id(m.weight) not in tied]
            if not layers:
                bar.update(per_block)
                continue
            float_block = dict(float_model.named_modules())[block_name]
            with _no_kv_cache(model), _no_kv_cache(float_model):
                inputs, targets = _block_data(model, block, float_model, float_block, batches, forward_fn, fp_input_mix)
            if inputs is None:
                log.warning("AdaScale: block %r takes no tensor or returns none; its layers keep round-to-nearest", block_name)
                for layer in layers:
                    result.round_to_nearest[f"{names[id(layer)]}.weight"] = "its block takes or returns no tensor"
                    _freeze(weight_quantizers[id(layer)], AdaScaleParams(layer.weight.detach(), bits, weight_axis(layer)), layer)
                bar.update(per_block)
                continue
            bar.set_description(f"AdaScale {block_name or '<root>'}")
            broken = [i for i, ((x, *_), y) in enumerate(zip(inputs, targets)) if not (torch.isfinite(x).all() and torch.isfinite(y).all())]
            if broken or not all(torch.isfinite(m.weight).all() for m in layers):
                raise FloatingPointError(
                    f"apply_adascale(): NaN or Inf in block {block_name or '<root>'!r} ({'its inputs or outputs for batches ' + str(broken) if broken else 'its weights'}); "
                    "no block from this one on was quantized. Check the calibration data and the model"
                )
            report = _train_block(block, layers, inputs, targets, bits, num_epochs, num_iterations, lr, scale_lr, bar)
            if not (math.isfinite(report["after"]) and all(torch.isfinite(p).all() for _, params in report["params"] for p in params.parameters())):
                raise FloatingPointError(
                    f"apply_adascale(): block {block_name or '<root>'!r} diverged (loss {report['before']:.4g} -> {report['after']:.4g}, "
                    f"NaN/Inf scales); its weights were not changed. Lower lr / scale_lr"
                )
            for layer, params in report.pop("params"):
                _freeze(weight_quantizers[id(layer)], params, layer)
                result.scales[f"{names[id(layer)]}.weight"] = weight_quantizers[id(layer)].step.detach().clone()
            result.blocks.append(BlockReport(block_name, [names[id(m)] for m in layers], report["before"], report["after"]))
    finally:
        bar.close()
        for module, training in modes.items():
            module.training = training
    result.coverage = _coverage(quantizer, result, bits)
    return result


def _coverage(quantizer: EMAFakeQuantizer, result: AdaScaleResult, bits: int) -> CoverageReport:
    report = CoverageReport("AdaScale", [r for r in quantizer.coverage.rows if r.kind != "activation"])
    trained = set(result.scales)
    for row in report.rows:
        if row.quantized:
            first = row.name.split(" = ")[0]
            how = "AdaScale" if first in trained else f"round-to-nearest: {result.round_to_nearest.get(first, 'not trained')}"
            row.format = f"int{bits} symmetric per channel ({how})"
    return report


def _strip_quantizers(model: nn.Module) -> None:
    """The float copy: its weight quantizers (copied with their hooks) switched off."""
    for module in model.modules():
        for name in [n for n in module._modules if n.endswith(WEIGHT_SUFFIX)]:
            module._modules[name].enabled = False


def _tied_weights(model: nn.Module) -> dict[int, str]:
    """``id(weight) -> its other names`` for parameters registered in more than one place."""
    return {key: " = ".join(names) for key, names in parameter_names(model).items() if len(names) > 1}


def _normal_tensors(batch: Any) -> Any:
    """Clone tensors made under inference mode (a Lightning eval loop) so autograd may use them."""
    return map_tensors(batch, lambda t: t.clone() if t.is_inference() else t)


def _in_execution_order(
    model: nn.Module, blocks: list[tuple[str, nn.Module]], batch: Any, forward_fn: Callable[[nn.Module, Any], Any]
) -> list[tuple[str, nn.Module]]:
    """Blocks sorted by when they run (one float forward); blocks that never run are dropped (warning)."""
    order: dict[str, int] = {}
    def seen(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            order.setdefault(name, len(order))

        return hook

    handles = [block.register_forward_pre_hook(seen(name)) for name, block in blocks]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            forward_fn(model, batch)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    unused = [name for name, _ in blocks if name not in order]
    if unused:
        log.warning("AdaScale: blocks %s did not run in a forward pass; their layers keep round-to-nearest", unused)
    return sorted((b for b in blocks if b[0] in order), key=lambda b: order[b[0]]) + [b for b in blocks if b[0] not in order]


def _layer_quantizers(model: nn.Module) -> dict[nn.Module, LearnedStepWeight]:
    return {m: m._modules["weight_fake_quant"] for m in model.modules() if isinstance(m._modules.get("weight_fake_quant"), LearnedStepWeight)}


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="AdaScale", unit="it", disable=not enabled, leave=False)


def _block_data(
    model: nn.Module, block: nn.Module, float_model: nn.Module, float_block: nn.Module,
    batches: list[Any], forward_fn: Callable[[nn.Module, Any], Any], mix: float,
) -> tuple[list[tuple[torch.Tensor, int | str, tuple, dict]] | None, list[torch.Tensor] | None]:  # fmt: skip
    """The block's input in the (partly quantized) model, with the other positional and keyword
    arguments it was called with (masks, position embeddings: replayed as they were), and the
    float block's output (its first tensor: Hugging Face layers return tuples)."""
    def capture(module: nn.Module, store: list, outputs: bool) -> Any:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, *rest: Any) -> None:
            where = _main_input(args, kwargs)
            y = _first_tensor(rest[-1]) if outputs else None
            ok = where is not None and (not outputs or y is not None)
            x = (args[where] if where == 0 else kwargs[where]) if ok else None
            store.append((x.detach() if ok else None, where, _replayable(args), _replayable(kwargs), y.detach() if ok and outputs else None))
            raise _StopForward

        if outputs:
            return module.register_forward_hook(hook, with_kwargs=True)
        return module.register_forward_pre_hook(hook, with_kwargs=True)

    quantized_in: list = []
    float_io: list = []
    with torch.no_grad():
        for batch in batches:
            for module, store, outputs, net in ((block, quantized_in, False, model), (float_block, float_io, True, float_model)):
                handle = capture(module, store, outputs)
                try:
                    forward_fn(net, batch)
                except _StopForward:
                    pass
                finally:
                    handle.remove()
    if any(x is None for x, *_ in quantized_in) or any(x is None for x, *_ in float_io) or len(quantized_in) != len(batches):
        return None, None
    inputs = []
    for (q, where, args, kwargs, _), (f, *_) in zip(quantized_in, float_io):
        x = q if mix == 0 else (1 - mix) * q + mix * f
        inputs.append((x, where, args, kwargs))
    return inputs, [y for *_, y in float_io]


INPUT_KEYWORDS = ("hidden_states", "src", "tgt", "x", "input")  # a block's activation passed by keyword


def _replayable(arguments: tuple | dict) -> tuple | dict:
    """A block's arguments as they can be passed again: tensors (also in tuples, such as rotary
    position embeddings) detached; a key/value cache (filled in place by every call) dropped."""
    def keep(value: Any) -> Any:
        return None if any(cls.__name__.endswith("Cache") for cls in type(value).__mro__) else value

    if isinstance(arguments, dict):
        arguments = {k: keep(v) for k, v in arguments.items()}
    else:
        arguments = tuple(keep(v) for v in arguments)
    return map_tensors(arguments, torch.Tensor.detach)


def _main_input(args: tuple, kwargs: dict) -> int | str | None:
    """Where a block's activation input is: 0 (its first positional argument) or the keyword
    (``hidden_states=``, ``src=``, ...); None when it takes no float tensor."""
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
        return 0
    return next((k for k in INPUT_KEYWORDS if isinstance(kwargs.get(k), torch.Tensor) and kwargs[k].is_floating_point()), None)


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    first = getattr(output, "last_hidden_state", None)
    return first if isinstance(first, torch.Tensor) else None


def _call_block(block: nn.Module, x: torch.Tensor, where: int | str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The block on input ``x`` (at ``where``) with the other arguments it was called with; its
    first output tensor."""
    out = block(x, *args[1:], **kwargs) if where == 0 else block(*args, **{**kwargs, where: x})
    return _first_tensor(out)


def _train_block(
    block: nn.Module, layers: list[nn.Module], inputs: list[tuple[torch.Tensor, int | str, tuple, dict]], targets: list[torch.Tensor],
    bits: int, num_epochs: int, num_iterations: int | None, lr: float, scale_lr: float, bar: Any,
) -> dict[str, Any]:  # fmt: skip
    params = {id(layer): AdaScaleParams(layer.weight.detach(), bits, weight_axis(layer)) for layer in layers}
    for layer in layers:
        layer._modules["weight_fake_quant"].enabled = False  # the float weight reaches the AdaScale swap
    swapper = WeightSwapper(lambda entry, module, current: params[id(module)](current))
    readers = direct_readers(block)
    for layer in layers:
        swapper.add(SwappedParam("weight", layer.weight, [Slot(layer, "weight", "weight", tuple(readers.get(id(layer), ())))]))
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)

    def loss_over_all() -> float:
        with torch.no_grad():
            return sum(_block_loss(_call_block(block, *xs), y).item() for xs, y in zip(inputs, targets)) / len(inputs)

    try:
        before = loss_over_all()
        first, second = [], []
        for p in params.values():
            a, b = p.groups()
            first += a
            second += b
        optimizer = torch.optim.Adam([{"params": first, "lr": lr}, {"params": second, "lr": scale_lr}])
        iterations = num_iterations or num_epochs * len(inputs)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations)
        for step in range(iterations):
            xs, y = inputs[step % len(inputs)], targets[step % len(inputs)]
            optimizer.zero_grad(set_to_none=True)
            loss = _block_loss(_call_block(block, *xs), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update(1)
            if step % max(1, iterations // 4) == 0:
                bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
        after = loss_over_all()
    finally:
        swapper.remove()
        for p in frozen:
            p.requires_grad_(True)
        for layer in layers:
            layer._modules["weight_fake_quant"].enabled = True
    return {"before": before, "after": after, "params": [(layer, params[id(layer)]) for layer in layers]}


def _block_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    wide = compute_dtype(output.dtype)
    difference = (target.to(wide) - output.to(wide)) ** 2  # float32: squares overflow float16
    return (difference.sum(1) if difference.dim() > 1 else difference).mean()


@torch.no_grad()
def _freeze(quantizer: LearnedStepWeight, params: AdaScaleParams, layer: nn.Module) -> None:
    """Fold ``W / divisor`` into the weight and freeze the scale as the layer's (untrainable) step."""
    layer.weight.copy_(params.folded(layer.weight))
    quantizer.step.copy_(params.scale().reshape(quantizer.step.shape))
    quantizer.zero.zero_()
    quantizer._mark_ready()
    quantizer.step.requires_grad_(False)


def frozen_weight_quantizer(model: nn.Module, bits: int, exclude: Sequence[str] = ()) -> EMAFakeQuantizer:
    """The weight quantizers AdaScale fills: a ``LearnedStepWeight`` (symmetric, per output channel)
    on every supported layer (see :func:`supported`) not matched by ``exclude``, nothing on other
    layer kinds, no activation quantizers."""
    quantizer = EMAFakeQuantizer(model, weight_bits=bits, weight_mode="symmetric", activations=False, learned_step=True, exclude=exclude)
    quantizer.weight_filter = lambda m: "" if supported(m) else "AdaScale trains Linear / Conv1d / Conv2d / Conv1D weights only"
    return quantizer.prepare()


def round_to_nearest(model: nn.Module, bits: int = 4, exclude: Sequence[str] = ()) -> EMAFakeQuantizer:
    """The baseline AdaScale starts from: per-channel symmetric round-to-nearest ``bits``-bit weights
    (``scale = 2·max|W| / (2^b - 1)``) for every supported layer not matched by ``exclude`` (module
    or parameter names; ``["*lm_head*"]`` keeps an LM head float), installed as frozen steps."""
    check_number("bits", bits, low=2, high=8, integer=True)
    quantizer = frozen_weight_quantizer(model, bits, check_patterns("exclude", exclude))
    for layer, q in _layer_quantizers(model).items():
        _freeze(q, AdaScaleParams(layer.weight.detach(), bits, weight_axis(layer)), layer)
    return quantizer


