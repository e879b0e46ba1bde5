"""Coverage reports: every weight tensor and every activation point of a model, quantized with which
format, or float and why. Every callback builds one at setup (``callback.coverage``), logs it and
warns, naming the largest leftovers, when more than 5 % of the weight entries stay float.

A *weight* is a parameter of a registered layer kind (:mod:`qat_lightning.layers`) or any other
parameter with two or more dimensions (an unregistered layer's matrix is a weight left float, and
says so); biases, norm scales and other vectors are listed as ``vector`` rows, outside the share.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

from torch import nn

from .layers import layer_kind, layer_weights

log = logging.getLogger(__name__)
FLOAT_WARNING_SHARE = 0.05


@dataclass
class CoverageRow:
    """One tensor or activation point: ``format`` is the spec it is quantized in, or None (float)
    with the ``reason``."""

    name: str
    kind: str  # "weight" | "vector" | "activation"
    layer: str
    numel: int | None
    format: str | None
    reason: str = ""

    @property
    def quantized(self) -> bool:
        return self.format is not None


@dataclass
class CoverageReport:
    """What one callback quantizes in one model."""

    callback: str
    rows: list[CoverageRow] = field(default_factory=list)

    def weights(self) -> list[CoverageRow]:
        return [r for r in self.rows if r.kind == "weight"]

    def activations(self) -> list[CoverageRow]:
        return [r for r in self.rows if r.kind == "activation"]

    def weight_share(self) -> float:
        """Share of weight entries quantized (1.0 for a model without weights)."""
        total = sum(r.numel or 0 for r in self.weights())
        return sum(r.numel or 0 for r in self.weights() if r.quantized) / total if total else 1.0

    def float_weights(self) -> list[CoverageRow]:
        """Weights left float, largest first."""
        return sorted((r for r in self.weights() if not r.quantized), key=lambda r: -(r.numel or 0))

    def float_activations(self) -> list[CoverageRow]:
        return [r for r in self.activations() if not r.quantized]

    def as_dict(self) -> dict[str, float]:
        """Numbers for a logger: ``coverage/<callback>/weight_share`` and the float counts."""
        acts, prefix = self.activations(), f"coverage/{self.callback}"
        return {
            f"{prefix}/weight_share": self.weight_share(),
            f"{prefix}/float_weight_tensors": float(len(self.float_weights())),
            f"{prefix}/activation_points": float(len(acts)),
            f"{prefix}/float_activation_points": float(len(self.float_activations())),
        }

    def warning(self, threshold: float = FLOAT_WARNING_SHARE) -> str | None:
        """The warning to give when more than ``threshold`` of the weight entries stay float."""
        if 1.0 - self.weight_share() <= threshold:
            return None
        largest = ", ".join(f"{r.name} ({r.numel} entries: {r.reason})" for r in self.float_weights()[:5])
        return (f"{self.callback}: {1 - self.weight_share():.1%} of the weight entries stay float; the largest: {largest}. "
                "See callback.coverage.table(); include / exclude choose, qat_lightning.register_layer adds a layer kind")  # fmt: skip

    def table(self, kinds: tuple[str, ...] = ("weight", "activation", "vector")) -> str:
        """A plain-text table, one row per tensor / activation point."""
        rows = [r for r in self.rows if r.kind in kinds]
        header = ("tensor / point", "kind", "layer", "entries", "quantized as / float because")
        body = [(r.name, r.kind, r.layer, "" if r.numel is None else str(r.numel), r.format if r.quantized else f"float: {r.reason}") for r in rows]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        title = (f"{self.callback} coverage: {self.weight_share():.1%} of weight entries quantized, "
                 f"{len(self.activations()) - len(self.float_activations())}/{len(self.activations())} activation points")  # fmt: skip
        return "\n".join([title, line(header), *(line(b) for b in body)])

    def warn(self, threshold: float = FLOAT_WARNING_SHARE, stacklevel: int = 3) -> None:
        """Log the table; warn naming the largest float weights when more than ``threshold`` of the
        weight entries stay float."""
        log.info("%s", self.table())
        message = self.warning(threshold)
        if message is not None:
            warnings.warn(message, stacklevel=stacklevel)


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """``id(param) -> every qualified name`` (tied tensors have several)."""
    names: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                qualified = f"{module_name}.{attr}" if module_name else attr
                if qualified not in names.setdefault(id(param), []):
                    names[id(param)].append(qualified)
    return names


def weight_rows(
    model: nn.Module, quantized: dict[int, str], reasons: dict[int, str], skip: set[int] = frozenset(), default_vector: str = "",
) -> list[CoverageRow]:  # fmt: skip
    """One row per parameter of ``model`` (tied tensors once, all names joined): quantized in
    ``quantized[id]``, else float with ``reasons[id]`` or the default reason; ``skip`` are the
    quantizers' own parameters (ranges, steps, bit logits), not listed."""
    owners: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None and id(param) not in owners:
                owners[id(param)] = (module, attr)
    rows = []
    seen: set[int] = set()
    names = parameter_names(model)
    params = {id(p): p for m in model.modules() for p in m._parameters.values() if p is not None}
    for key, param in params.items():
        if key in seen or key in skip:
            continue
        seen.add(key)
        module, attr = owners[key]
        is_weight = attr in layer_weights(module) or param.dim() >= 2
        kind = layer_kind(module)
        label = kind.name if kind is not None else type(module).__name__
        name = " = ".join(names.get(key, [attr]))
        if key in quantized:
            rows.append(CoverageRow(name, "weight" if is_weight else "vector", label, param.numel(), quantized[key]))
            continue
        if key in reasons:
            reason = reasons[key]
        elif not is_weight:
            reason = default_vector or "a bias / norm / vector parameter"
        elif kind is None:
            reason = f"{type(module).__name__} is not a registered layer kind (qat_lightning.register_layer)"
        else:
            reason = f"not a weight of {kind.name}"
        rows.append(CoverageRow(name, "weight" if is_weight else "vector", label, param.numel(), None, reason))
    return rows


__all__ = ["CoverageReport", "CoverageRow", "parameter_names", "weight_rows"]
