"""Argument checks shared by every public constructor.

Each helper raises ``ValueError`` that names the argument and what is allowed, so a bad
config fails at construction instead of deep inside a training step.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r}")
    return value


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> Any:
    """Check that ``value`` is a finite number (an int if ``integer``) within the given bounds."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise ValueError(f"{name} must be {kind}{_bounds(low, high, low_open, high_open)}; got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be {kind}{_bounds(low, high, low_open, high_open)}; got {value!r}")
    return value


def check_forward_fn(value: Any) -> Any:
    """``forward_fn`` of the calibration-style callbacks: a callable ``(module, batch) -> output`` or None."""
    if value is not None and not callable(value):
        raise ValueError(f"forward_fn must be a callable (module, batch) -> output or None; got {value!r}")
    return value


def check_module_types(name: str, value: Any, allow_none: bool = True) -> tuple[type, ...] | None:
    """A list of ``nn.Module`` subclasses (or None); a bare class is refused with the fix."""
    from torch import nn

    if value is None and allow_none:
        return None
    if isinstance(value, type):
        raise ValueError(f"{name} must be a list of nn.Module subclasses{' or None' if allow_none else ''}; got the single type "
                         f"{value.__name__}: write [{value.__name__}]")  # fmt: skip
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list of nn.Module subclasses{' or None' if allow_none else ''}; got {value!r}")
    types = tuple(value)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise ValueError(f"{name} must be a non-empty list of nn.Module subclasses{' or None' if allow_none else ''}; got {value!r}")
    return types


def check_patterns(name: str, value: Any) -> list[str]:
    """A list of fnmatch patterns; a bare string is refused because it would iterate per character."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list of fnmatch patterns such as ['*.bias']; got {value!r}")
    patterns = list(value)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{name} must contain only strings; got {pattern!r}")
    return patterns


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return f" {' and '.join(parts)}" if parts else ""
