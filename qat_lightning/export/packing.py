"""Bit-packed quantized checkpoints in safetensors: the size DiffQ promises, on disk, without pickle.

Layout of a file written by :func:`save_quantized`:

* tensors (safetensors, no code): for every quantized parameter ``<name>::levels`` (uint8, the
  integer levels bit-packed per width: all groups of width 1 first, then 2, ..., least
  significant bit first), ``<name>::bits`` (uint8, each group's width minus the smallest width,
  packed at ``ceil(log2(1 + max - min))`` bits) and ``<name>::range`` (``[[min...], [max...]]``,
  one column per range block of ``range_block`` contiguous entries: one for the reference grid, in
  float32 (float64 for float64 parameters); per channel or group in the quantizer's
  ``scale_dtype``; ``[[m...]]`` where the layout says ``symmetric``: ranges ``[-m, m]``); every
  other parameter and buffer as itself (fp16 where the quantizer keeps it in fp16).
* metadata (the safetensors JSON header): ``format``, ``version``, ``layout`` (JSON: per name its
  kind, shape, dtype, stored dtype, group size, widths, range block, dtype and symmetry, aliases of
  tied parameters; a version-3 file without ``symmetric`` has a min and a max), any extra
  metadata, and ``sha256`` over all of that and every tensor's name, dtype, shape and bytes, so a
  tampered or corrupted file is refused.

Reading trusts nothing: the checksum is checked first, then every field of the layout is
validated (types, ranges, the byte counts it implies against the stored tensors, finite ranges
with ``min <= max``) before anything it implies is allocated; a malformed file raises one
``ValueError`` that names the field. :func:`load_quantized` rebuilds the float weights
(``min + level / (2^b - 1) * (max - min)``, the quantizer's own arithmetic, so the round trip is
bit-exact for float16, bfloat16, float32 and float64) into a plain model: no quantizer, no
callback, nothing unpickled.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..quantizers.diffq import DiffQuantizer, ranges_started
from ..quantizers.diffq_records import KeptParam
from ..quantizers.swap import full_tensor
from ..formats.uniform import SCALE_DTYPES, compute_dtype, grid_dequantize, grid_quantize, range_block, range_ends, stored_ranges

FORMAT = "qat_lightning.packed"
VERSION = 3  # 3: a range per block (channel / group grids); version 2 files (one range per tensor) still read
READABLE_VERSIONS = ("2", "3")
MAX_BITS = 15
QUANTIZED_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
TENSOR_DTYPES = {
    **QUANTIZED_DTYPES, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "bool": torch.bool,
}  # fmt: skip
MAX_NUMEL = 2**40  # far above any real tensor; keeps the header's arithmetic in exact integers


# ------------------------------------------------------------------------------------------- bits
_CHUNK = 1 << 20  # values per chunk (a multiple of 8: every chunk but the last fills whole bytes)


def pack_uint(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative integers ``< 2**width`` into bytes, ``width`` bits each, LSB first.

    Chunked, so the temporaries stay a few MB whatever the tensor's size."""
    if width == 0 or values.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8)
    flat = values.reshape(-1).cpu()
    shifts = torch.arange(width, dtype=torch.int32)
    byte_weights = 1 << torch.arange(8, dtype=torch.int32)
    chunks = []
    for start in range(0, flat.numel(), _CHUNK):
        bits = ((flat[start : start + _CHUNK].to(torch.int32)[:, None] >> shifts) & 1).reshape(-1)
        bits = torch.nn.functional.pad(bits, (0, (-bits.numel()) % 8))
        chunks.append((bits.view(-1, 8) * byte_weights).sum(1).to(torch.uint8))
    return torch.cat(chunks)


def unpack_uint(data: torch.Tensor, width: int, count: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack_uint`: ``count`` integers of ``width`` bits (as ``dtype``)."""
    if width == 0 or count == 0:
        return torch.zeros(count, dtype=dtype)
    if packed_bytes(width, count) > data.numel():
        raise ValueError(f"{count} values of {width} bits need {packed_bytes(width, count)} bytes; got {data.numel()}")
    shifts = torch.arange(8, dtype=torch.int32)
    value_weights = 1 << torch.arange(width, dtype=torch.int32)
    out = torch.empty(count, dtype=dtype)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        raw = data[start * width // 8 : start * width // 8 + packed_bytes(width, n)].to(torch.int32)
        bits = ((raw[:, None] >> shifts) & 1).reshape(-1)[: n * width]
        out[start : start + n] = (bits.view(n, width) * value_weights).sum(1).to(dtype)
    return out


def packed_bytes(width: int, count: int) -> int:
    return -(-width * count // 8)  # exact integer ceil, whatever the size


def pack_levels(levels: torch.Tensor, group_bits: torch.Tensor) -> torch.Tensor:
    """Levels of shape ``(groups, group_size)`` at each group's width, widths in increasing order."""
    chunks = [pack_uint(levels[group_bits == w], w) for w in torch.unique(group_bits).tolist()]
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)


def unpack_levels(data: torch.Tensor, group_bits: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_levels`: int16 levels of shape ``(groups, group_size)``."""
    levels = torch.empty(group_bits.numel(), group_size, dtype=torch.int16)
    offset = 0
    for w in torch.unique(group_bits).tolist():
        rows = group_bits == w
        count = int(rows.sum()) * group_size
        size = packed_bytes(w, count)
        if offset + size > data.numel():
            raise ValueError("packed levels are shorter than their layout says")
        levels[rows] = unpack_uint(data[offset : offset + size], w, count, dtype=torch.int16).view(-1, group_size)
        offset += size
    if offset != data.numel():
        raise ValueError("packed levels are longer than their layout says")
    return levels


# ------------------------------------------------------------------------------------------- model
@dataclass
class QuantizedTensor:
    """One quantized tensor: integer levels per group, each group's width, a min / max per range
    block of ``range_block`` entries (in :func:`~qat_lightning.formats.uniform.compute_dtype` of
    ``dtype``, holding values of ``scale_dtype`` where given: that is how they are stored)."""

    levels: torch.Tensor  # (groups, group_size), int
    group_bits: torch.Tensor  # (groups,), int 1..15
    min: torch.Tensor  # (blocks,)
    max: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    aliases: list[str] = field(default_factory=list)
    range_block: int = 0  # entries per range; 0: the whole tensor
    scale_dtype: torch.dtype | None = None  # None: stored in compute_dtype(dtype), the reference grid
    symmetric: bool = False  # every range is [-m, m]: only m is stored

    @property
    def block(self) -> int:
        return self.range_block or self.levels.numel()

    def dequantize(self) -> torch.Tensor:
        return grid_dequantize(self.levels, self.min.reshape(-1), self.max.reshape(-1), self.group_bits, self.block, dtype=self.dtype).view(self.shape)


def _packed(p: torch.Tensor, bits: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor, torch.Tensor], aliases: list[str],
            block: int, scale_dtype: torch.dtype | None, symmetric: bool = False) -> QuantizedTensor:  # fmt: skip
    """A :class:`QuantizedTensor` on the CPU from ``grid = (levels, min, max)`` of ``p``."""
    levels, mn, mx = grid
    return QuantizedTensor(levels.cpu(), bits.cpu(), mn.cpu(), mx.cpu(), tuple(p.shape), p.dtype, aliases, block, scale_dtype, symmetric)


def quantized_tensors(quantizer: DiffQuantizer) -> dict[str, QuantizedTensor]:
    """The true quantization of every parameter ``quantizer`` quantizes, by state-dict name."""
    result = {}
    for qp in quantizer.quantized_params():
        names = [slot.qualified_name for slot in qp.slots]
        bits = quantizer.true_bits(qp).to(torch.int64)
        p = qp.param.detach()
        result[names[0]] = _packed(p, bits, quantizer.grid_levels(qp, p, bits), names[1:], qp.range_block, qp.scale_dtype,
                                    qp.symmetric)
    return result


def packed_state(source: nn.Module | DiffQuantizer) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor], set[str]]:
    """(float tensors, quantized tensors, fp16-kept names) of a model or of a quantizer's model:
    what :func:`write_packed` writes. Under FSDP2 the whole tensors, gathered from the shards: a
    collective, every rank must call it."""
    if isinstance(source, DiffQuantizer):
        with source.gathered():
            try:
                source.check_finite()  # names the tensor (or its bits) before anything is quantized
            except FloatingPointError as error:
                raise FloatingPointError(f"not writing the packed file: {error} (nothing was written)") from None
            quantized = quantized_tensors(source)
        model = source.model
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
        floats[name] = full_tensor(tensor).detach().cpu()  # FSDP2: the whole tensor (every rank calls this)
    return floats, quantized, half


def _digest(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every metadata entry but ``sha256`` itself (format, version, layout, extras) and
    every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    fields = {k: v for k, v in metadata.items() if k != "sha256"}
    h.update(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d tensors too
    return h.hexdigest()


def save_quantized(source: nn.Module | DiffQuantizer, path: str | Path, *, metadata: dict[str, str] | None = None) -> int:
    """Write the bit-packed quantized model of ``source`` (a :class:`DiffQuantizer`, or a plain
    module, stored as float) to ``path`` (safetensors). Returns the file size in bytes."""
    floats, quantized, half = packed_state(source)
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
    reserved = {"format", "version", "layout", "sha256"} & set(metadata or {})
    if reserved:
        raise ValueError(f"metadata must not set the reserved keys {sorted(reserved)}")
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    for name, q in quantized.items():
        if q.dtype not in QUANTIZED_DTYPES.values():
            raise ValueError(f"not writing {path}: quantized tensor {name!r} has dtype {q.dtype}; allowed: {sorted(QUANTIZED_DTYPES)}")
        low = int(q.group_bits.min())
        bits_bits = math.ceil(math.log2(1 + int(q.group_bits.max()) - low))
        tensors[f"{name}::levels"] = pack_levels(q.levels, q.group_bits)
        tensors[f"{name}::bits"] = pack_uint(q.group_bits - low, bits_bits)
        range_dtype = q.scale_dtype or compute_dtype(q.dtype)
        if q.symmetric and not torch.equal(q.min.reshape(-1), -q.max.reshape(-1)):
            raise ValueError(f"not writing {path}: quantized tensor {name!r} is marked symmetric but its ranges are not [-m, m]")
        tensors[f"{name}::range"] = stored_ranges(q.min, q.max, q.symmetric).to(range_dtype)
        layout[name] = {"kind": "quantized", "shape": list(q.shape), "dtype": _dtype_name(q.dtype),
                        "groups": q.group_bits.numel(), "group_size": q.levels.shape[1], "min_bits": low,
                        "bits_bits": bits_bits, "range_block": q.block, "range_dtype": _dtype_name(range_dtype),
                        "symmetric": q.symmetric, "aliases": list(q.aliases)}  # fmt: skip
    for name, t in floats.items():
        stored = t.half() if name in half and t.is_floating_point() else t
        tensors[name] = stored.contiguous()
        layout[name] = {"kind": "tensor", "shape": list(t.shape), "dtype": _dtype_name(t.dtype), "stored": _dtype_name(stored.dtype)}
    header = {**(metadata or {}), "format": FORMAT, "version": str(VERSION), "layout": json.dumps(layout, separators=(",", ":"))}
    header["sha256"] = _digest(header, tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path.stat().st_size


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_quantized(path: str | Path) -> dict[str, torch.Tensor]:
    """The float state dict stored in a packed file (quantized tensors dequantized), verified.

    Raises ``ValueError`` for anything but an intact file of this format: unreadable, another
    format or version, a checksum that does not match, or a layout whose fields are malformed or
    disagree with the stored tensors (the message names the field)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as error:
        raise ValueError(f"{path} is not a readable qat_lightning packed file (truncated or not safetensors): {error}") from error
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a qat_lightning packed file (format {header.get('format')!r})")
    if header.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path} has format version {header.get('version')!r}; this qat_lightning reads versions {', '.join(READABLE_VERSIONS)}")
    if header.get("sha256") != _digest(header, tensors):
        raise ValueError(f"{path}: contents do not match the checksum in its header (tampered or corrupted)")
    try:
        layout = json.loads(header.get("layout", ""))
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"{path}: layout: not valid JSON ({error})") from error
    try:
        return _rebuild(layout, tensors, int(header["version"]))
    except _LayoutError as error:
        raise ValueError(f"{path}: {error}") from None


class _LayoutError(Exception):
    """A malformed layout field: raised inside :func:`_rebuild`, turned into one ValueError."""


def _field(entry: Mapping[str, Any], name: str, key: str, kind: type | tuple[type, ...], low: int | None = None, high: int | None = None) -> Any:
    """``entry[key]``, checked: present, of ``kind`` (bool is not an int), within ``[low, high]``."""
    if key not in entry:
        raise _LayoutError(f"layout of {name!r}: field {key!r} is missing")
    value = entry[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _LayoutError(f"layout of {name!r}: field {key!r} must be {_kind_name(kind)}; got {value!r}")
    if not isinstance(value, kind):
        raise _LayoutError(f"layout of {name!r}: field {key!r} must be {_kind_name(kind)}; got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise _LayoutError(f"layout of {name!r}: field {key!r} must be in [{low}, {high}]; got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", str: "a string", list: "a list", dict: "an object"}.get(k, k.__name__) for k in kinds)


def _shape(entry: Mapping[str, Any], name: str) -> tuple[int, ...]:
    shape = _field(entry, name, "shape", list)
    if len(shape) > 16 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_NUMEL for d in shape):
        raise _LayoutError(f"layout of {name!r}: field 'shape' must list at most 16 sizes in [0, {MAX_NUMEL}]; got {shape!r}")
    if math.prod(shape) > MAX_NUMEL:
        raise _LayoutError(f"layout of {name!r}: field 'shape' {shape} has more than {MAX_NUMEL} entries")
    return tuple(shape)


def _dtype(entry: Mapping[str, Any], name: str, key: str, allowed: Mapping[str, torch.dtype]) -> torch.dtype:
    value = _field(entry, name, key, str)
    if value not in allowed:
        raise _LayoutError(f"layout of {name!r}: field {key!r} must be one of {sorted(allowed)}; got {value!r}")
    return allowed[value]


def _stored(
    tensors: Mapping[str, torch.Tensor], name: str, key: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None,
    implied_by: str = "the format",
) -> torch.Tensor:  # fmt: skip
    """The stored tensor ``key`` of layout entry ``name``, with the dtype (and shape) that
    ``implied_by`` (the fields named in errors) imply."""
    if key not in tensors:
        raise _LayoutError(f"layout of {name!r}: tensor {key!r} is missing from the file")
    t = tensors[key]
    verb = "imply" if implied_by.startswith("fields") else "implies"
    if t.dtype != dtype:
        raise _LayoutError(f"layout of {name!r}: tensor {key!r} is {t.dtype}, {implied_by} {verb} {dtype}")
    expected = (t.numel(),) if shape is None else shape
    if tuple(t.shape) != expected:
        raise _LayoutError(f"layout of {name!r}: tensor {key!r} has shape {tuple(t.shape)}, {implied_by} {verb} {expected}")
    return t


def _rebuild(layout: Any, tensors: Mapping[str, torch.Tensor], version: int = VERSION) -> dict[str, torch.Tensor]:
    """Validate every field of ``layout`` against the stored tensors, then dequantize.

    Nothing is allocated from a header value before it is checked against stored byte counts:
    the number of groups is bounded by the levels' bytes, the widths' bytes by the groups."""
    if not isinstance(layout, dict):
        raise _LayoutError(f"layout must be a JSON object of tensor entries; got a {type(layout).__name__}")
    names: set[str] = set()
    used: set[str] = set()
    plans: list[tuple[str, dict[str, Any]]] = []
    for name, entry in layout.items():
        if not isinstance(entry, dict):
            raise _LayoutError(f"layout of {name!r}: must be an object; got {entry!r}")
        kind = _field(entry, name, "kind", str)
        if kind == "tensor":
            plans.append((name, _plan_tensor(name, entry, tensors)))
            used.add(name)
            new_names = [name]
        elif kind == "quantized":
            plan = _plan_quantized(name, entry, tensors, version)
            plans.append((name, plan))
            used.update(f"{name}::{part}" for part in ("levels", "bits", "range"))
            new_names = [name, *plan["aliases"]]
        else:
            raise _LayoutError(f"layout of {name!r}: field 'kind' must be 'quantized' or 'tensor'; got {kind!r}")
        for new in new_names:
            if new in names:
                raise _LayoutError(f"layout of {name!r}: name {new!r} appears twice (as an entry or an alias)")
            names.add(new)
    extra = sorted(set(tensors) - used)
    if extra:
        raise _LayoutError(f"layout: the file holds tensors no entry describes: {extra[:5]}")
    state: dict[str, torch.Tensor] = {}
    for name, plan in plans:
        if plan["kind"] == "tensor":
            state[name] = plan["tensor"].to(plan["dtype"])
            continue
        state[name] = _dequantize_plan(name, plan)
        for alias in plan["aliases"]:
            state[alias] = state[name]
    return state


def _plan_tensor(name: str, entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    dtype = _dtype(entry, name, "dtype", TENSOR_DTYPES)
    stored = _dtype(entry, name, "stored", TENSOR_DTYPES)
    if stored != dtype and not (stored == torch.float16 and dtype.is_floating_point):
        raise _LayoutError(f"layout of {name!r}: field 'stored' is {stored}, which is no storage for {dtype} (only float16 stands in for a float)")
    tensor = _stored(tensors, name, name, stored, _shape(entry, name), implied_by="fields 'stored' and 'shape'")
    return {"kind": "tensor", "dtype": dtype, "tensor": tensor}


def _plan_quantized(name: str, entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], version: int = VERSION) -> dict[str, Any]:
    shape = _shape(entry, name)
    dtype = _dtype(entry, name, "dtype", QUANTIZED_DTYPES)
    groups = _field(entry, name, "groups", int, 1, MAX_NUMEL)
    group_size = _field(entry, name, "group_size", int, 1, MAX_NUMEL)
    if groups * group_size != math.prod(shape):
        raise _LayoutError(f"layout of {name!r}: fields 'groups' x 'group_size' = {groups} x {group_size} do not make field 'shape' {list(shape)}")
    min_bits = _field(entry, name, "min_bits", int, 1, MAX_BITS)
    bits_bits = _field(entry, name, "bits_bits", int, 0, 4)
    aliases = _field(entry, name, "aliases", list)
    if not all(isinstance(a, str) and a and "::" not in a for a in aliases) or len(set(aliases)) != len(aliases):
        raise _LayoutError(f"layout of {name!r}: field 'aliases' must list distinct tensor names; got {aliases!r}")
    levels = _stored(tensors, name, f"{name}::levels", torch.uint8)
    numel = groups * group_size
    if not packed_bytes(min_bits, numel) <= levels.numel() <= packed_bytes(MAX_BITS, numel) + MAX_BITS:
        raise _LayoutError(
            f"layout of {name!r}: fields 'groups', 'group_size' and 'min_bits' imply {packed_bytes(min_bits, numel)} to "
            f"{packed_bytes(MAX_BITS, numel) + MAX_BITS} bytes of levels; tensor '{name}::levels' holds {levels.numel()}"
        )
    bits = _stored(tensors, name, f"{name}::bits", torch.uint8)
    if bits.numel() != packed_bytes(bits_bits, groups):
        raise _LayoutError(f"layout of {name!r}: fields 'groups' and 'bits_bits' imply {packed_bytes(bits_bits, groups)} bytes of widths; "
                           f"tensor '{name}::bits' holds {bits.numel()}")  # fmt: skip
    if version == 2:  # one range per tensor, in the compute dtype
        block, range_dtype = numel, compute_dtype(dtype)
        value_range = _stored(tensors, name, f"{name}::range", range_dtype, (2,), implied_by="field 'dtype'")[:, None]
    else:
        block = _field(entry, name, "range_block", int, 1, numel)
        if numel % block or (block % group_size and group_size % block):
            raise _LayoutError(f"layout of {name!r}: field 'range_block' {block} must divide the {numel} entries and nest with "
                               f"field 'group_size' {group_size} (one divides the other)")  # fmt: skip
        range_dtype = _dtype(entry, name, "range_dtype", {**SCALE_DTYPES, "float64": torch.float64})
        symmetric = entry.get("symmetric", False)  # absent in the first version-3 files: a min and a max
        if not isinstance(symmetric, bool):
            raise _LayoutError(f"layout of {name!r}: field 'symmetric' must be true or false; got {symmetric!r}")
        value_range = _stored(tensors, name, f"{name}::range", range_dtype, (1 if symmetric else 2, numel // block),
                              implied_by="fields 'range_dtype', 'range_block', 'symmetric' and 'shape'")  # fmt: skip
        if symmetric:
            if not torch.isfinite(value_range).all() or (value_range < 0).any():
                raise _LayoutError(f"layout of {name!r}: tensor '{name}::range' of a symmetric grid must hold finite m >= 0 "
                                   f"(ranges [-m, m]); got {value_range[:, :4].tolist()}")  # fmt: skip
            value_range = torch.stack(range_ends(value_range, symmetric=True))
    if not torch.isfinite(value_range).all() or (value_range[0] > value_range[1]).any():
        raise _LayoutError(f"layout of {name!r}: tensor '{name}::range' must hold finite [min, max] pairs with min <= max; "
                           f"got {value_range[:, :4].tolist()}")  # fmt: skip
    return {"kind": "quantized", "shape": shape, "dtype": dtype, "groups": groups, "group_size": group_size, "min_bits": min_bits,
            "bits_bits": bits_bits, "aliases": aliases, "levels": levels, "bits": bits, "range": value_range,
            "range_block": block}  # fmt: skip


def _dequantize_plan(name: str, plan: dict[str, Any]) -> torch.Tensor:
    group_bits = unpack_uint(plan["bits"], plan["bits_bits"], plan["groups"]) + plan["min_bits"]
    if int(group_bits.max()) > MAX_BITS:
        raise _LayoutError(f"layout of {name!r}: tensor '{name}::bits' holds widths above {MAX_BITS} (fields 'min_bits', 'bits_bits')")
    counts = torch.bincount(group_bits, minlength=MAX_BITS + 1)
    expected = sum(packed_bytes(w, int(counts[w]) * plan["group_size"]) for w in range(1, MAX_BITS + 1))
    if expected != plan["levels"].numel():
        raise _LayoutError(f"layout of {name!r}: the widths (tensor '{name}::bits', fields 'min_bits', 'bits_bits', 'group_size') "
                           f"imply {expected} bytes of levels; tensor '{name}::levels' holds {plan['levels'].numel()}")  # fmt: skip
    levels = unpack_levels(plan["levels"], group_bits, plan["group_size"])
    work = compute_dtype(plan["dtype"])
    low, high = plan["range"].to(work)
    return QuantizedTensor(levels, group_bits, low, high, plan["shape"], plan["dtype"], range_block=plan["range_block"]).dequantize()


def load_quantized(path: str | Path, model: nn.Module, strict: bool = True, prefix: str = "") -> nn.Module:
    """Load a packed file into ``model`` (a plain model: no quantizer needed); returns ``model``.

    ``prefix``: load only the file's entries under it, without it: a file saved from a
    LightningModule whose network is ``self.net`` loads into the bare network with
    ``prefix="net."``. Names and shapes are checked first, so a file for another model gives a
    clear error."""
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a string such as 'net.' (or ''); got {prefix!r}")
    state = read_quantized(path)
    if prefix:
        inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not inner:
            heads = sorted({k.split(".", 1)[0] + "." for k in state})[:5]
            raise ValueError(f"{path} has no entry under prefix={prefix!r}; its names start with {heads}")
        state = inner
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
    floats, quantized, half = packed_state(quantizer)
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
        if not key.endswith(suffix) or key[: -len(suffix)] not in state or key.endswith("_range" + suffix):
            continue
        name = key[: -len(suffix)]
        p = state[name].detach().cpu()
        group_size = p.numel() // logit.numel()
        bits = (formulas.extra_bits + formulas.get_bits(logit.float())).round().clamp(1, MAX_BITS).to(torch.int64)
        block, _ = range_block(tuple(p.shape), formulas.scale, formulas.scale_group_size)
        scale_dtype = None if formulas.scale == "tensor" else SCALE_DTYPES[formulas.scale_dtype]
        ranges = state.get(name + "_range" + suffix)  # learned ranges (learn_ranges), zeros until started
        learned = None if ranges is None or not ranges_started(ranges) else ranges.detach().cpu().float()
        symmetric = formulas.symmetric_ranges
        grid = grid_quantize(p, bits, group_size, block, scale_dtype, formulas.range_search,
                             ranges=None if learned is None else range_ends(learned, symmetric), symmetric=symmetric)  # fmt: skip
        quantized[name] = _packed(p, bits, grid, [], block, scale_dtype, symmetric)
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

