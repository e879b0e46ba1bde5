"""The registry of number formats: spec strings (for Hydra, LightningCLI, the command line) to format
objects. Adding a format is one module with a :class:`~qat_lightning.formats.base.NumberFormat`
subclass and one :func:`register_format` call.

Registered spec patterns (``B`` bits, ``N`` a group size):

==========================================  ==================================================
``int{B}``, ``int{B}_asym``                 per tensor, symmetric / asymmetric (2 <= B <= 8)
``int{B}[_asym]_per_channel``               per slice of dim 0 (a weight's output channel)
``int{B}[_asym]_per_row``                   per vector of the last dimension
``int{B}_per_token``                        per token, asymmetric (dynamic activations)
``int{B}[_asym]_g{N}``                      per group of N along the last dimension
``fp8_e4m3``, ``fp8_e5m2`` [``_per_row``]   FP8 with a float32 scale per tensor (row)
``mxfp8``, ``mxfp8_e5m2``, ``mxfp6_e2m3``,  OCP MX, blocks of 32, E8M0 scales
``mxfp6_e3m2``, ``mxfp4`` [``_floor``]
``nvfp4``                                   E2M1, blocks of 16, E4M3 scales, a tensor scale
``distiller{B}_{mode}[_per_channel]``       Distiller's grids over the current range (weights)
``distiller{B}_{mode}_ema``, ``..._lsq``    EMA-tracked / learned ranges (activations, weights)
==========================================  ==================================================
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from .base import NumberFormat


@dataclass(frozen=True)
class _Entry:
    pattern: re.Pattern[str]
    build: Callable[[str, re.Match[str]], NumberFormat]
    example: str
    doc: str


_REGISTRY: list[_Entry] = []


def register_format(pattern: str, build: Callable[[str, re.Match[str]], NumberFormat], *, example: str, doc: str) -> None:
    """Register a family of formats: specs matching the regular expression ``pattern`` (whole
    string) are built by ``build(spec, match)``. ``example`` is a valid spec (tested), ``doc``
    one line for error messages and docs."""
    compiled = re.compile(pattern)
    if not compiled.fullmatch(example):
        raise ValueError(f"register_format: example {example!r} does not match pattern {pattern!r}")
    _REGISTRY.append(_Entry(compiled, build, example, doc))
    _parse.cache_clear()


def parse_format(spec: str | NumberFormat) -> NumberFormat:
    """The format a spec string names (case and surrounding spaces do not matter; a format object
    passes through). ``ValueError`` names the spec and lists the registered patterns."""
    if isinstance(spec, NumberFormat):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a number format is a spec string such as 'int4_g32' or 'mxfp4'; got {spec!r}")
    fmt = _parse(spec.strip().lower())
    if fmt is None:
        raise ValueError(f"unknown number format {spec!r}; registered formats:\n" + describe_formats())
    return fmt


@lru_cache(maxsize=256)
def _parse(text: str) -> NumberFormat | None:
    for entry in _REGISTRY:
        match = entry.pattern.fullmatch(text)
        if match:
            return entry.build(text, match)
    return None


def describe_formats() -> str:
    """One line per registered family: an example spec and what it means."""
    return "\n".join(f"  {entry.example:<28} {entry.doc}" for entry in _REGISTRY)


def format_examples() -> list[str]:
    """An example spec of every registered family (the property tests run each)."""
    return [entry.example for entry in _REGISTRY]
