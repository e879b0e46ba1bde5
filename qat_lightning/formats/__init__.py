"""Number formats: grids, scales, straight-through fake quantization and storage sizes, named by
spec strings. ``fake_quantize(tensor, "int4_g32")`` is the entry point; :func:`parse_format` gives
the format object; :func:`register_format` adds a family (see :mod:`.registry` for the table)."""
from __future__ import annotations

import torch

from .base import NumberFormat
from .distiller import MODES, DistillerFormat
from .float8 import Float8Format
from .integer import IntFormat
from .microscaling import MX_SPECS, MXFormat
from .nvfp4 import NVFP4Format
from .registry import describe_formats, format_examples, parse_format, register_format

_GRANULARITY = {None: "tensor", "per_channel": "channel", "per_row": "row", "per_token": "row"}


def _int(spec: str, m) -> IntFormat:  # noqa: ANN001
    granularity = "group" if m["group"] else _GRANULARITY[m["granularity"]]
    if m["granularity"] == "per_token" and m["asym"]:
        raise ValueError(f"{spec}: per-token formats are asymmetric already; write {spec.replace('_asym', '')!r}")
    symmetric = not m["asym"] and m["granularity"] != "per_token"
    return IntFormat(spec, int(m["bits"]), granularity, int(m["group"] or 0), symmetric)


register_format(r"int(?P<bits>\d+)(?P<asym>_asym)?(?:_(?P<granularity>per_channel|per_row|per_token)|_g(?P<group>\d+))?", _int,
                example="int4_g32", doc="signed integers per tensor / _per_channel / _per_row / _per_token / _g{N}, symmetric or _asym")  # fmt: skip
register_format(r"fp8_(?P<element>e4m3|e5m2)(?P<row>_per_row)?", lambda s, m: Float8Format(s, m["element"], bool(m["row"])),
                example="fp8_e4m3", doc="FP8 with a float32 scale per tensor, or _per_row")  # fmt: skip
register_format(r"(?P<name>" + "|".join(MX_SPECS) + r")(?P<floor>_floor)?",
                lambda s, m: MXFormat(s, MX_SPECS[m["name"]], "floor" if m["floor"] else "rceil"),
                example="mxfp4", doc="OCP MX: blocks of 32 with E8M0 scales (rceil; _floor: the OCP rule)")  # fmt: skip
register_format(r"nvfp4", lambda s, m: NVFP4Format(s), example="nvfp4", doc="E2M1 in blocks of 16, E4M3 scales, a float32 tensor scale")
register_format(r"distiller(?P<bits>\d+)_(?P<mode>" + "|".join(MODES) + r")(?P<channel>_per_channel)?(?:_(?P<range>ema|lsq))?",
                lambda s, m: DistillerFormat(s, int(m["bits"]), m["mode"], bool(m["channel"]), m["range"] or "current"),
                example="distiller8_asymmetric_unsigned_ema", doc="Distiller's grids: current range, _ema-tracked or _lsq-learned")  # fmt: skip


def fake_quantize(tensor: torch.Tensor, spec: str | NumberFormat) -> torch.Tensor:
    """``tensor`` quantized to the format ``spec`` names and dequantized (scales chosen from the
    tensor itself), with the straight-through gradient inside the representable range::

        y = fake_quantize(w, "int4_g32")      # torchao's int4 per-group-32 QAT numerics
        y = fake_quantize(x, "mxfp4")         # OCP MX FP4, blocks of 32
    """
    return parse_format(spec).fake_quantize(tensor)


__all__ = [
    "DistillerFormat", "Float8Format", "IntFormat", "MXFormat", "NVFP4Format", "NumberFormat", "describe_formats",
    "fake_quantize", "format_examples", "parse_format", "register_format",
]  # fmt: skip
