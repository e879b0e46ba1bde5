"""Bit-packed quantized checkpoints in safetensors: the size DiffQ promises, on disk, without pickle.

Layout of a file written by :func:`save_quantized`:

* tensors (safetensors, no code): for every quantized parameter ``<name>::levels`` (uint8, the
  integer levels bit-packed per width: all groups of width 1 first, then 2, ..., least
  significant bit first), ``<name>::bits`` (uint8, each group's width minus the smallest width,
  packed at ``ceil(log2(1 + max - min))`` bits) and ``<name>::range`` (float32 ``[min, max]``);
  every other parameter and buffer as itself (fp16 where the quantizer keeps it in fp16).
* metadata (the safetensors JSON header): ``format``, ``version``, ``layout`` (JSON: per name its
  kind, shape, dtype, group size, widths, aliases of tied parameters) and ``sha256`` over every
  tensor's bytes, so a tampered or corrupted file is refused.

:func:`load_quantized` rebuilds the float weights (``min + level / (2^b - 1) * (max - min)``, the
quantizer's own arithmetic, so the round trip is bit-exact) into a plain model: no quantizer, no
callback, nothing unpickled.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .diffq import DiffQuantizer, KeptParam
from .uniform import uniform_dequantize, uniform_quantize

FORMAT = "qat_lightning.packed"
VERSION = 1
MAX_BITS = 15


# ------------------------------------------------------------------------------------------- bits
def pack_uint(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative integers ``< 2**width`` into bytes, ``width`` bits each, LSB first."""
    if width == 0 or values.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8)
    flat = values.reshape(-1).to(torch.int64).cpu()
    bits = (flat[:, None] >> torch.arange(width)) & 1  # (n, width)
    stream = bits.reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    return (stream.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_uint(data: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_uint`: ``count`` integers of ``width`` bits (int64)."""
    if width == 0 or count == 0:
        return torch.zeros(count, dtype=torch.int64)
    stream = ((data.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)[: count * width]
    return (stream.view(count, width) << torch.arange(width)).sum(1)


def packed_bytes(width: int, count: int) -> int:
    return math.ceil(width * count / 8)


def pack_levels(levels: torch.Tensor, group_bits: torch.Tensor) -> torch.Tensor:
    """Levels of shape ``(groups, group_size)`` at each group's width, widths in increasing order."""
    chunks = [pack_uint(levels[group_bits == w], w) for w in torch.unique(group_bits).tolist()]
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)


def unpack_levels(data: torch.Tensor, group_bits: torch.Tensor, group_size: int) -> torch.Tensor:
    levels = torch.empty(group_bits.numel(), group_size, dtype=torch.int64)
    offset = 0
    for w in torch.unique(group_bits).tolist():
        rows = group_bits == w
        count = int(rows.sum()) * group_size
        size = packed_bytes(w, count)
        if offset + size > data.numel():
            raise ValueError("packed levels are shorter than their layout says")
        levels[rows] = unpack_uint(data[offset : offset + size], w, count).view(-1, group_size)
        offset += size
    if offset != data.numel():
        raise ValueError("packed levels are longer than their layout says")
    return levels


# ------------------------------------------------------------------------------------------- model
@dataclass
class QuantizedTensor:
    """One quantized tensor: integer levels per group, each group's width, one min/max per tensor."""

    levels: torch.Tensor  # (groups, group_size), int
    group_bits: torch.Tensor  # (groups,), int 1..15
    min: torch.Tensor
    max: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    aliases: list[str] = field(default_factory=list)

    def dequantize(self) -> torch.Tensor:
        bits = self.group_bits[:, None].to(self.dtype)
        return uniform_dequantize(self.levels, self.min, self.max, bits, dtype=self.dtype).view(self.shape)


def quantized_tensors(quantizer: DiffQuantizer) -> dict[str, QuantizedTensor]:
    """The true quantization of every parameter ``quantizer`` quantizes, by state-dict name."""
    result = {}
    for qp in quantizer.quantized_params():
        p = qp.param.detach()
        bits = quantizer._true_bits(qp).to(torch.int64)
        levels, mn, mx = uniform_quantize(p.reshape(qp.num_groups, qp.group_size), bits[:, None].to(p.dtype))
        names = [slot.qualified_name for slot in qp.slots]
        result[names[0]] = QuantizedTensor(levels.cpu(), bits.cpu(), mn.cpu(), mx.cpu(), tuple(p.shape), p.dtype, names[1:])
    return result


def _state(source: nn.Module | DiffQuantizer) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor], set[str]]:
    """(float tensors, quantized tensors, fp16-kept names) of a model or of a quantizer's model."""
    if isinstance(source, DiffQuantizer):
        model, quantized = source.model, quantized_tensors(source)
        half = {slot.qualified_name for k in source._kept if isinstance(k, KeptParam) and k.half for slot in k.slots}
        suffix = source.suffix
    elif isinstance(source, nn.Module):
        model, quantized, half, suffix = source, {}, set(), None
    else:
        raise ValueError(f"save_quantized needs an nn.Module or a DiffQuantizer; got {type(source).__name__}")
    covered = set(quantized) | {a for q in quantized.values() for a in q.aliases}
    floats = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        if name in covered or (suffix and name.endswith(suffix)):
            continue
        floats[name] = tensor.detach().cpu()
    return floats, quantized, half


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_quantized(source: nn.Module | DiffQuantizer, path: str | Path, *, metadata: dict[str, str] | None = None) -> int:
    """Write the bit-packed quantized model of ``source`` (a :class:`DiffQuantizer`, or a plain
    module, stored as float) to ``path`` (safetensors). Returns the file size in bytes."""
    floats, quantized, half = _state(source)
    return write_packed(path, floats, quantized, half, metadata=metadata)


def write_packed(
    path: str | Path, floats: dict[str, torch.Tensor], quantized: dict[str, QuantizedTensor], half: set[str] = frozenset(),
    *, metadata: dict[str, str] | None = None,
) -> int:  # fmt: skip
    """Write float tensors (``half``: stored fp16) and quantized tensors in the packed format."""
    from safetensors.torch import save_file

    broken = [name for name, q in quantized.items() if not (torch.isfinite(q.min).all() and torch.isfinite(q.max).all())]
    broken += [name for name, t in floats.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise FloatingPointError(f"not writing {path}: NaN or Inf in {broken} (the model diverged; nothing was written)")
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    for name, q in quantized.items():
        low = int(q.group_bits.min())
        bits_bits = math.ceil(math.log2(1 + int(q.group_bits.max()) - low))
        tensors[f"{name}::levels"] = pack_levels(q.levels, q.group_bits)
        tensors[f"{name}::bits"] = pack_uint(q.group_bits - low, bits_bits)
        tensors[f"{name}::range"] = torch.stack([q.min, q.max]).float()
        layout[name] = {"kind": "quantized", "shape": list(q.shape), "dtype": str(q.dtype).removeprefix("torch."),
                        "groups": q.group_bits.numel(), "group_size": q.levels.shape[1], "min_bits": low,
                        "bits_bits": bits_bits, "aliases": q.aliases}  # fmt: skip
    for name, t in floats.items():
        stored = t.half() if name in half and t.is_floating_point() else t
        tensors[name] = stored.contiguous()
        layout[name] = {"kind": "tensor", "dtype": str(t.dtype).removeprefix("torch.")}
    header = {"format": FORMAT, "version": str(VERSION), "layout": json.dumps(layout, separators=(",", ":")),
              "sha256": _digest(tensors), **(metadata or {})}  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path.stat().st_size


def read_quantized(path: str | Path) -> dict[str, torch.Tensor]:
    """The float state dict stored in a packed file (quantized tensors dequantized), verified."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path} is not a readable qat_lightning packed file (truncated or not safetensors): {error}") from error
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a qat_lightning packed file (format {header.get('format')!r})")
    if header.get("version") != str(VERSION):
        raise ValueError(f"{path} has format version {header.get('version')!r}; this qat_lightning reads version {VERSION}")
    if header.get("sha256") != _digest(tensors):
        raise ValueError(f"{path}: contents do not match the checksum in its header (tampered or corrupted)")
    try:
        layout = json.loads(header["layout"])
        return _rebuild(layout, tensors)
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: malformed layout in the header: {error!r}") from error


def _rebuild(layout: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, entry in layout.items():
        dtype = getattr(torch, entry["dtype"])
        if entry["kind"] == "tensor":
            state[name] = tensors[name].to(dtype)
            continue
        groups, group_size = entry["groups"], entry["group_size"]
        shape = tuple(entry["shape"])
        if groups * group_size != math.prod(shape):
            raise ValueError(f"layout of {name!r}: {groups} groups of {group_size} do not make shape {shape}")
        if tensors[f"{name}::bits"].numel() != packed_bytes(entry["bits_bits"], groups):
            raise ValueError(f"packed widths of {name!r} do not match its layout")
        group_bits = unpack_uint(tensors[f"{name}::bits"], entry["bits_bits"], groups) + entry["min_bits"]
        if group_bits.min() < 1 or group_bits.max() > MAX_BITS:
            raise ValueError(f"widths of {name!r} outside 1..{MAX_BITS}")
        levels = unpack_levels(tensors[f"{name}::levels"], group_bits, group_size)
        low, high = tensors[f"{name}::range"].to(dtype)
        q = QuantizedTensor(levels, group_bits, low, high, shape, dtype)
        state[name] = q.dequantize()
        for alias in entry.get("aliases", []):
            state[alias] = state[name]
    return state


def load_quantized(path: str | Path, model: nn.Module, strict: bool = True) -> nn.Module:
    """Load a packed file into ``model`` (a plain model: no quantizer needed); returns ``model``.

    Names and shapes are checked first, so a file for another model gives a clear error."""
    state = read_quantized(path)
    expected = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}" for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    missing = sorted(set(expected) - set(state)) if strict else []
    unexpected = sorted(set(state) - set(expected)) if strict else []
    if wrong or missing or unexpected:
        raise ValueError(f"{path} does not fit this model: shapes {wrong[:5]}, missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        model.load_state_dict(state, strict=strict)
    return model


def quantize_state_dict(quantizer: DiffQuantizer) -> dict[str, torch.Tensor]:
    """The state dict :func:`load_quantized` produces, computed directly (for tests and comparisons)."""
    floats, quantized, half = _state(quantizer)
    state = {k: (v.half().to(v.dtype) if k in half and v.is_floating_point() else v) for k, v in floats.items()}
    for name, q in quantized.items():
        state[name] = q.dequantize()
        for alias in q.aliases:
            state[alias] = state[name]
    return state


def quantized_from_checkpoint(state: dict[str, torch.Tensor], config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor], set[str]]:
    """Rebuild DiffQ's quantization from a state dict holding the bits logits (``<name><suffix>``)
    and the :class:`DiffQConfig` options, without the model's code: (floats, quantized, fp16 names).

    Parameters sharing storage with a quantized one (tied) become its aliases. With
    ``float16=True`` every other floating tensor of at most ``min_size`` is stored in fp16."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        formulas = DiffQuantizer(nn.Module(), **config)  # only its bits formula is used
    suffix = formulas.suffix
    quantized: dict[str, QuantizedTensor] = {}
    owners: dict[int, str] = {}
    for key, logit in state.items():
        if not key.endswith(suffix) or key[: -len(suffix)] not in state:
            continue
        name = key[: -len(suffix)]
        p = state[name].detach().cpu()
        group_size = p.numel() // logit.numel()
        bits = (formulas.extra_bits + formulas.get_bits(logit.float())).round().clamp(1, MAX_BITS).to(torch.int64)
        levels, mn, mx = uniform_quantize(p.reshape(logit.numel(), group_size), bits[:, None].to(p.dtype))
        quantized[name] = QuantizedTensor(levels, bits, mn, mx, tuple(p.shape), p.dtype)
        owners[p.untyped_storage().data_ptr()] = name
    floats, half = {}, set()
    threshold = formulas.min_size * 2**20 / 4
    for key, tensor in state.items():
        if key in quantized or key.endswith(suffix):
            continue
        owner = owners.get(tensor.untyped_storage().data_ptr()) if tensor.numel() else None
        if owner is not None and state[owner].shape == tensor.shape:
            quantized[owner].aliases.append(key)
            continue
        floats[key] = tensor.detach().cpu()
        if formulas.float16 and tensor.is_floating_point() and tensor.numel() <= threshold:
            half.add(key)
    return floats, quantized, half

