"""DiffQ's size accounting: the differentiable model-size estimate used as a penalty, the exact
size of the quantized model (what :func:`~qat_lightning.save_quantized` writes), its gradient in
closed form and per-tensor statistics.

Size of one quantized tensor with ``G`` groups of ``g`` weights at ``b_i`` bits::

    sum_i g * b_i  +  G * ceil(log2(max_i b_i - min_bits + 1))  +  R * 2 * s  +  8

(payload, each group's width stored in as few bits as the widest needs, a min and a max of ``s``
bits for each of the ``R`` range blocks, and one byte of header: on the reference grid one fp32
min / max per tensor, 72 bits in all); tensors left float count 32 bits per entry (16 with
``float16``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .diffq_bits import BitsParameterization
from .diffq_records import KeptParam, QuantizedParam

MEGABYTE_BITS = 8 * 2**20
MAX_QUANT_BITS = 15
HEADER_BITS = 8  # one byte of header per quantized tensor, besides its ranges


def fixed_bits(qp: QuantizedParam) -> int:
    """Bits of ``qp`` that do not depend on its widths: its ranges (a min and a max per block, or the
    one ``m`` of a symmetric ``[-m, m]``) and header."""
    return qp.num_ranges * qp.range_ends * qp.scale_bits + HEADER_BITS


BUDGET_ITERATIONS = 30  # bisection steps of fit_budget: the shift to 2**-30 of the logits' spread
FILL_MARGIN = 1e-3  # bits past a rounding edge that fit_budget's fill sets a group to (round() then gives the level above)


@dataclass
class _Layout:
    lengths: torch.Tensor  # groups per quantized tensor
    lengths_float: torch.Tensor
    group_sizes: torch.Tensor  # entries per group, one value per group


class DiffQSize:
    """Sizes of the parameters a :class:`~qat_lightning.quantizers.DiffQuantizer` holds.

    ``quantized`` and ``kept`` are the quantizer's own lists (read at every call, so the records
    it adds or clears are seen); ``extra_bits`` and ``min_bits`` as in :class:`DiffQConfig`.
    """

    def __init__(
        self,
        quantized: Sequence[QuantizedParam],
        kept: Sequence[KeptParam],
        bits: BitsParameterization,
        extra_bits: float,
    ) -> None:
        self.quantized = quantized
        self.kept = kept
        self.bits = bits
        self.extra_bits = extra_bits
        self._layout: _Layout | None = None

    def true_bits(self, qp: QuantizedParam) -> torch.Tensor:
        """The stored width of each group of ``qp``: ``round(extra_bits + bits)`` within 1..15."""
        return self.true_bits_of(qp.logit.detach())

    def true_bits_of(self, logit: torch.Tensor) -> torch.Tensor:
        """:meth:`true_bits` of a logit tensor."""
        return (self.extra_bits + self.bits.bits(logit)).round().clamp(1, MAX_QUANT_BITS)

    def all_bits(self, exact: bool, detach: bool = False) -> torch.Tensor:
        """Every group's bits, concatenated in model order: rounded when ``exact``."""
        logits = torch.cat([qp.logit.detach() if detach else qp.logit for qp in self.quantized])
        bits = self.extra_bits + self.bits.bits(logits)
        return bits.round().clamp(1, MAX_QUANT_BITS) if exact else bits

    def _numel(self) -> int:
        """Entries of the quantized tensors (each tied tensor once)."""
        return sum(qp.param.numel() for qp in self.quantized)

    def layout(self) -> _Layout:
        """Groups per tensor and weights per group, on the logits' device (cached)."""
        device = self.quantized[0].logit.device
        if self._layout is None or self._layout.lengths.device != device:
            lengths = torch.tensor([qp.num_groups for qp in self.quantized], device=device)
            group_sizes = torch.cat([
                torch.full((qp.num_groups,), float(qp.group_size), dtype=torch.float32, device=device) for qp in self.quantized
            ])
            self._layout = _Layout(lengths, lengths.float(), group_sizes)
        return self._layout

    def _kept_bits(self) -> int:
        return sum((16 if e.half else 32) * e.param.numel() for e in self.kept)

    def model_size(self, exact: bool = False) -> torch.Tensor:
        """Size in MB: differentiable w.r.t. the bits logits unless ``exact``."""
        kept_bits = self._kept_bits()
        if not self.quantized:
            return torch.tensor(kept_bits / MEGABYTE_BITS, dtype=torch.float32)
        return (self._quantized_bits(self.all_bits(exact)) + kept_bits) / MEGABYTE_BITS

    def _quantized_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """Bits the quantized tensors take with ``bits`` per group (model order): payload, each
        tensor's widths, ranges and header; differentiable w.r.t. ``bits``."""
        layout = self.layout()
        payload = torch.dot(bits, layout.group_sizes)
        with torch.no_grad():  # bits needed to store each group's number of bits: a constant for the gradient
            max_bits = torch.segment_reduce(bits.detach(), "max", lengths=layout.lengths)
            bits_bits = torch.ceil(torch.log2((max_bits.round() - self.bits.min_bits + 1).clamp(min=1)))
            header = torch.dot(bits_bits, layout.lengths_float) + sum(fixed_bits(qp) for qp in self.quantized)
        return payload + header

    @torch.no_grad()
    def size_gradient(self) -> list[torch.Tensor]:
        """``d model_size() / d logit`` per quantized tensor: ``group_size * d bits / d logit / 2**23``
        (the size is linear in each group's bits; the bits-of-bits term is a constant)."""
        return [self.bits.derivative(qp.logit) * (qp.group_size / MEGABYTE_BITS) for qp in self.quantized]

    def float_model_size(self) -> float:
        """Size in MB of the same parameters in fp32, each tied parameter once."""
        unique = {id(e.param): e.param.numel() for e in [*self.quantized, *self.kept]}
        return 32 * sum(unique.values()) / MEGABYTE_BITS

    @torch.no_grad()
    def average_bits(self, exact: bool = False) -> torch.Tensor:
        """Mean bits per quantized weight (``extra_bits`` included, the stored widths and ranges not:
        :meth:`stored_bits` counts them); NaN when nothing is quantized."""
        if not self.quantized:
            return torch.tensor(float("nan"), dtype=torch.float32)
        numel = self._numel()
        return torch.dot(self.all_bits(exact, detach=True), self.layout().group_sizes) / numel

    @torch.no_grad()
    def stored_bits(self) -> float:
        """Bits per quantized weight as stored: payload, widths, ranges and headers (what
        :func:`~qat_lightning.save_quantized` writes for them, before byte padding); NaN when
        nothing is quantized."""
        if not self.quantized:
            return float("nan")
        numel = self._numel()
        kept = self._kept_bits()
        return (self.model_size(exact=True).item() * MEGABYTE_BITS - kept) / numel

    @torch.no_grad()
    def stored_bits_if(self, width: int) -> float:
        """:meth:`stored_bits` if every group were stored with ``width`` bits (``min_bits``: the
        smallest this grid can store, its ranges and headers included); NaN when nothing is quantized."""
        if not self.quantized:
            return float("nan")
        layout = self.layout()
        numel = self._numel()
        return self._quantized_bits(torch.full_like(layout.group_sizes, float(width))).item() / numel

    @torch.no_grad()
    def fit_budget(self, target_bits: float, iterations: int = BUDGET_ITERATIONS) -> float:
        """Move every bits logit by one common amount, up or down, the largest (to ``2**-iterations``
        of the search interval) that keeps :meth:`stored_bits` at most ``target_bits``: the model is
        brought to its size budget, the logits keep their order and spacing (the bits are increasing
        in the logit); then the remainder is filled (:meth:`_fill_budget`). Returns the amount
        (negative: the bits came down)."""
        if not self.quantized:
            return 0.0
        logits = [qp.logit for qp in self.quantized]
        flat = torch.cat([logit.detach() for logit in logits])
        numel = self._numel()

        def stored_at(shift: float) -> float:
            return self._quantized_bits(self.true_bits_of(flat + shift)).item() / numel

        reach = float(flat.max() - flat.min()) + 64.0  # past it every group is at min_bits (down) or max_bits (up)
        if stored_at(-reach) > target_bits:
            raise ValueError(f"target_bits={target_bits} is below the smallest size this grid stores ({stored_at(-reach):.3f} "
                             "bits per weight at min_bits)")  # fmt: skip
        if stored_at(0.0) <= target_bits:  # within: go up, to the largest shift that stays within
            low, high = 0.0, reach
            if stored_at(high) <= target_bits:  # even max_bits everywhere fits
                low = high
        else:
            low, high = -reach, 0.0
        for _ in range(iterations if low < high else 0):  # stored_at(low) <= target < stored_at(high)
            middle = (low + high) / 2
            low, high = (middle, high) if stored_at(middle) <= target_bits else (low, middle)
        flat += low
        self._fill_budget(flat, target_bits * numel)
        offset = 0
        for logit in logits:  # the shift (and the fill) written back
            logit.copy_(flat[offset : offset + logit.numel()].view_as(logit))
            offset += logit.numel()
        return low

    def _fill_budget(self, flat: torch.Tensor, budget: float) -> None:
        """After the common shift, the budget's remainder (less than one step of the size, which
        jumps where a tensor's widest group gains a level: every width then takes a bit more) goes
        to the groups nearest to their next width, one level each, nearest first, each within its
        tensor's widest (so no width grows): their logits are set just past the rounding edge."""
        layout = self.layout()
        bits = self.extra_bits + self.bits.bits(flat)
        rounded = bits.round().clamp(1, MAX_QUANT_BITS)
        slack = budget - self._quantized_bits(rounded).item()
        widest = torch.repeat_interleave(torch.segment_reduce(rounded, "max", lengths=layout.lengths), layout.lengths)
        edge = rounded + 0.5 + FILL_MARGIN  # bits just past it round to one level more
        candidate = (rounded < widest) & (edge - self.extra_bits < self.bits.max_bits)
        if slack <= 0 or not candidate.any():
            return
        index = torch.nonzero(candidate).squeeze(1)
        order = index[torch.argsort(edge[index] - bits[index], stable=True)]  # nearest to the edge first
        taken = order[torch.cumsum(layout.group_sizes[order], 0) <= slack]
        flat[taken] = self.bits.logit_of(edge[taken] - self.extra_bits)

    @torch.no_grad()
    def layer_stats(self) -> list[dict[str, Any]]:
        """Per tensor, in model order: name, shape, entries, true bits per group (mean, std, min,
        max), size in MB (their sum is the exact :meth:`model_size`) and share of the total.
        Tensors left float report 32 or 16 bits."""
        stats = []
        for qp in self.quantized:
            bits = self.true_bits(qp)
            bits_bits = math.ceil(math.log2(max(bits.max().item() - self.bits.min_bits + 1, 1)))
            size_bits = (bits.sum().item() * qp.group_size) + bits_bits * qp.num_groups + fixed_bits(qp)
            stats.append(dict(name=qp.name, shape=tuple(qp.param.shape), numel=qp.param.numel(), quantized=True,
                              group_size=qp.group_size, bits_mean=bits.mean().item(),
                              bits_std=bits.std(unbiased=False).item(), bits_min=bits.min().item(),
                              bits_max=bits.max().item(), size_mb=size_bits / MEGABYTE_BITS))  # fmt: skip
        for entry in self.kept:
            width = 16 if entry.half else 32
            stats.append(dict(name=entry.name, shape=tuple(entry.param.shape), numel=entry.param.numel(), quantized=False,
                              group_size=0, bits_mean=width, bits_std=0.0, bits_min=width, bits_max=width,
                              size_mb=width * entry.param.numel() / MEGABYTE_BITS))  # fmt: skip
        total = sum(s["size_mb"] for s in stats) or 1.0
        for s in stats:
            s["share"] = s["size_mb"] / total
        return stats
