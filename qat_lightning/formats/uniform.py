"""Uniform quantization with one min/max range per tensor and a bit width per group.

The arithmetic follows the reference DiffQ order of operations (normalise to [0, 1], divide by
the step, round) so that our quantized weights equal the reference's bit for bit.

Precision: the math runs in float32 whatever the tensor's dtype (float64 for float64 tensors) and
the dequantized value is rounded once into the tensor's dtype. In float16 / bfloat16 the levels
themselves would be wrong: ``(p - min) / span / unit`` overflows the grid at 15 bits (level 2048
of bfloat16 at 11 bits) and is 1 ulp off at 8.
"""
from __future__ import annotations

import math

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype quantization math runs in for tensors of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensor_range(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(min, max, max - min)`` of ``p`` as 0-d tensors, without a host sync.

    The span is computed in float64 and rounded once, like a Python-float subtraction would be.
    """
    mn, mx = torch.aminmax(p.detach())
    span = (mx.double() - mn.double()).to(p.dtype)
    return mn, mx, span


def uniform_quantize(p: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``p`` (shape ``(groups, group_size)``) over ``bits`` (shape ``(groups, 1)``, values 1..15).

    Returns ``(levels, min, max)``; levels are int16 in ``[0, 2**bits - 1]``, min and max 0-d tensors
    in :func:`compute_dtype` (exact: they are entries of ``p``). A constant tensor quantizes to
    level 0 everywhere instead of dividing by a zero range.
    """
    x = p.detach().to(compute_dtype(p.dtype))
    mn, mx = torch.aminmax(x)
    span = (mx.double() - mn.double()).to(x.dtype)
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    unit = 1 / (2 ** bits.to(x.dtype) - 1)
    levels = ((x - mn) / safe_span / unit).round()
    return levels.to(torch.int16), mn, mx


def uniform_dequantize(
    levels: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`uniform_quantize`: ``min + levels / (2**bits - 1) * (max - min)``, computed in
    :func:`compute_dtype` of ``dtype`` and rounded once into ``dtype``."""
    work = compute_dtype(dtype)
    span = (mx.double() - mn.double()).to(work)
    unit = 1 / (2 ** bits.to(work) - 1)
    return (levels.to(work) * unit * span + mn.to(work)).to(dtype)


# ------------------------------------------------------------------------------------------- grids
# DiffQ's grids beyond the reference's one range per tensor: a [min, max] per block of ``block``
# contiguous entries (a row of a weight: per channel; part of a row: per group), stored in
# ``scale_dtype``, and a bit width per group of ``group_size`` entries. One of the two partitions
# nests in the other, so every entry's step is ``unit[its group] * span[its block]``: the math works
# on "cells" of ``min(group_size, block)`` entries, the finer of the two.

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def range_block(shape: tuple[int, ...], scale: str, scale_group_size: int) -> tuple[int, str]:
    """Entries per range block of a tensor of ``shape`` on grid ``scale`` ('tensor', 'channel',
    'group'), and what the grid became there ('' when as asked): a 1-D tensor has one range; a
    row that ``scale_group_size`` does not divide has one range per row."""
    numel = math.prod(shape)
    if scale == "tensor" or numel == 0:
        return max(numel, 1), ""
    row = numel // shape[0] if len(shape) >= 2 else numel
    if scale == "channel":
        return (row, "") if len(shape) >= 2 else (numel, "one range (1-D)")
    if row % scale_group_size == 0:
        return scale_group_size, ""
    return row, f"one range per channel (group {scale_group_size} does not divide rows of {row})"


def cell_size(group_size: int, block: int) -> int:
    """Entries per cell: the finer of the two partitions, which must nest."""
    if block % group_size and group_size % block:
        raise ValueError(f"bit groups of {group_size} and range blocks of {block} entries do not nest")
    return min(group_size, block)


def per_cell(values: torch.Tensor, unit: int, cell: int) -> torch.Tensor:
    """``values`` (one per unit of ``unit`` entries) repeated for each cell of ``cell`` entries."""
    return values if unit == cell else values.repeat_interleave(unit // cell)


def block_range(
    p: torch.Tensor, block: int, scale_dtype: torch.dtype | None = None, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of each block of ``block`` contiguous entries of ``p`` (flattened), in
    :func:`compute_dtype`; with ``scale_dtype`` (where they are stored) the nearest values of that
    dtype outside them, so that the stored range still holds the whole block (rounding to nearest
    can swap the ends of a narrow block: bfloat16 keeps 8 bits). ``symmetric``: ``(-m, m)`` with
    ``m`` the block's largest magnitude (rounded up), one stored value per block."""
    mn, mx = torch.aminmax(p.detach().reshape(-1, block).to(compute_dtype(p.dtype)), dim=1)
    if symmetric:
        mx = torch.maximum(mx, -mn)
        if scale_dtype is not None:
            mx = _round_outward(mx, scale_dtype, down=False)
        return -mx, mx
    if scale_dtype is not None:
        mn, mx = _round_outward(mn, scale_dtype, down=True), _round_outward(mx, scale_dtype, down=False)
    return mn, mx


def range_ends(stored: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` per block from stored ranges: rows ``[min, max]``, or one row ``[m]`` of a
    symmetric grid (``[-m, m]``)."""
    return (-stored[0], stored[0]) if symmetric else (stored[0], stored[1])


def stored_ranges(mn: torch.Tensor, mx: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """The inverse of :func:`range_ends`: rows ``[min, max]``, or the one row ``[m]`` of ``[-m, m]``."""
    return mx.reshape(1, -1) if symmetric else torch.stack([mn.reshape(-1), mx.reshape(-1)])


def _round_outward(x: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """``x`` rounded to ``dtype`` towards -inf (``down``) or +inf, returned in ``x``'s dtype."""
    near = x.to(dtype)
    wrong = near.to(x.dtype) > x if down else near.to(x.dtype) < x  # no host sync: one where over the blocks
    return torch.where(wrong, torch.nextafter(near, torch.full_like(near, -math.inf if down else math.inf)), near).to(x.dtype)


def grid_quantize(
    p: torch.Tensor, bits: torch.Tensor, group_size: int, block: int, scale_dtype: torch.dtype | None = None,
    search: int = 0, ranges: tuple[torch.Tensor, torch.Tensor] | None = None, symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Quantize ``p`` with one width per group of ``group_size`` entries (``bits``: one per group)
    and one range per block of ``block`` entries. Returns int16 levels ``(groups, group_size)`` and
    the ranges ``(min, max)``, one per block.

    ``block == p.numel()`` without ``scale_dtype`` is the reference grid (:func:`uniform_quantize`,
    bit for bit). Otherwise the ranges are rounded outwards to ``scale_dtype`` first (they hold
    their block) and the levels clamped to the grid (against the division's last-ulp rounding).

    ``search`` > 0: each block's range is also tried shrunk about its centre by the ratios
    :func:`clip_ratios` (entries beyond it take the end levels), and the range of least squared
    error over the block is kept (ModelOpt's / AWQ's clipping search, at each group's own width).

    ``ranges``: given (learned) ``(min, max)`` per block instead, rounded to nearest in
    ``scale_dtype``; entries beyond them take the end levels.

    ``symmetric``: every range is ``[-m, m]`` (:func:`block_range`); the search shrinks ``m``."""
    numel = p.numel()
    groups = numel // group_size
    bits = bits.reshape(groups)
    if block == numel and scale_dtype is None and not search and ranges is None and not symmetric:
        levels, mn, mx = uniform_quantize(p.reshape(groups, group_size), bits[:, None])
        return levels, mn.reshape(1), mx.reshape(1)
    cell = cell_size(group_size, block)
    x = p.detach().to(compute_dtype(p.dtype)).reshape(-1, cell)
    top = per_cell(2 ** bits.to(x.dtype) - 1, group_size, cell)[:, None]
    if ranges is not None:
        mn, mx = given_ranges(ranges, scale_dtype, x.dtype)
        return _levels(x, mn, mx, top, block, cell).to(torch.int16).reshape(groups, group_size), mn, mx
    mn, mx = block_range(p, block, scale_dtype, symmetric)
    levels = _levels(x, mn, mx, top, block, cell)
    if search:
        error = _block_error(x, levels, mn, mx, top, block, cell)
        exact_mn, exact_mx = block_range(p, block, symmetric=symmetric) if scale_dtype is not None else (mn, mx)
        centre, half = (exact_mn + exact_mx) / 2, (exact_mx - exact_mn) / 2  # shrunk from the block's own ends (centre 0: symmetric)
        for ratio in clip_ratios(search)[1:]:
            lo, hi = centre - ratio * half, centre + ratio * half
            if scale_dtype is not None:
                lo, hi = _round_outward(lo, scale_dtype, down=True), _round_outward(hi, scale_dtype, down=False)
            trial = _levels(x, lo, hi, top, block, cell)
            trial_error = _block_error(x, trial, lo, hi, top, block, cell)
            better = trial_error < error
            error = torch.where(better, trial_error, error)
            mn, mx = torch.where(better, lo, mn), torch.where(better, hi, mx)
            levels = torch.where(per_cell(better, block, cell)[:, None], trial, levels)
    return levels.to(torch.int16).reshape(groups, group_size), mn, mx


def given_ranges(
    ranges: tuple[torch.Tensor, torch.Tensor], scale_dtype: torch.dtype | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Given (learned) ``(min, max)`` per block as :func:`grid_quantize` uses them: detached, in
    ``dtype``, rounded to nearest in ``scale_dtype`` when there is one."""
    mn, mx = (r.detach().to(dtype) for r in ranges)
    if scale_dtype is not None:
        mn, mx = mn.to(scale_dtype).to(dtype), mx.to(scale_dtype).to(dtype)
    return mn, mx


def clip_ratios(search: int) -> list[float]:
    """The range ratios a clipping search of ``search`` candidates tries: 1 (the min / max range)
    down to 0.5, evenly spaced."""
    return [1.0 - 0.5 * i / search for i in range(search + 1)]


def _levels(x: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, top: torch.Tensor, block: int, cell: int) -> torch.Tensor:
    """Float levels (rounded, clamped to ``[0, top]``) of the cells ``x`` over the block ranges."""
    span = mx - mn
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    levels = ((x - per_cell(mn, block, cell)[:, None]) / per_cell(safe_span, block, cell)[:, None] * top).round()
    return torch.minimum(levels.clamp_(min=0), top)


def _block_error(x: torch.Tensor, levels: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, top: torch.Tensor,
                 block: int, cell: int) -> torch.Tensor:  # fmt: skip
    """Squared error of each block's dequantized levels against ``x`` (as :func:`grid_dequantize` forms them)."""
    step = (1 / top) * per_cell(mx - mn, block, cell)[:, None]
    value = levels * step + per_cell(mn, block, cell)[:, None]
    return (value - x).square_().reshape(-1, block).sum(1)


def grid_dequantize(
    levels: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, bits: torch.Tensor, block: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`grid_quantize`, flattened: ``min + level / (2**bits - 1) * (max - min)``
    per entry, computed in :func:`compute_dtype` of ``dtype`` and rounded once into ``dtype``."""
    groups, group_size = levels.shape
    numel = groups * group_size
    if block == numel and mn.numel() == 1:
        return uniform_dequantize(levels, mn.reshape(()), mx.reshape(()), bits.reshape(groups, 1), dtype=dtype).reshape(-1)
    work = compute_dtype(dtype)
    cell = cell_size(group_size, block)
    span = (mx.double() - mn.double()).to(work)
    unit = 1 / (2 ** bits.reshape(groups).to(work) - 1)
    step = per_cell(unit, group_size, cell) * per_cell(span, block, cell)
    values = levels.reshape(-1, cell).to(work) * step[:, None] + per_cell(mn.to(work), block, cell)[:, None]
    return values.to(dtype).reshape(-1)


def learned_grid_fake_quantize(
    p: torch.Tensor, bits: torch.Tensor, group_size: int, block: int, mn: torch.Tensor, mx: torch.Tensor,
    scale_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # fmt: skip
    """The values :func:`grid_quantize` with ``ranges=(mn, mx)`` and :func:`grid_dequantize` give,
    differentiable in ``p``, ``mn`` and ``mx`` as LSQ is: entries are clipped to the grid's ends
    (an entry beyond its range moves the range, not itself), then rounded with the gradient passed
    straight through; the ranges' rounding to ``scale_dtype`` is straight-through too."""
    work = compute_dtype(p.dtype)
    cell = cell_size(group_size, block)
    if scale_dtype is not None:
        mn = mn + (mn.detach().to(scale_dtype).to(mn.dtype) - mn.detach())
        mx = mx + (mx.detach().to(scale_dtype).to(mx.dtype) - mx.detach())
    mn, mx = mn.to(work), mx.to(work)
    top = per_cell(torch.exp2(bits.reshape(-1).to(work)) - 1, group_size, cell)  # exact at integer widths, half pow's time
    return _LearnedGridSTE.apply(p.to(work), mn, mx - mn, top, block, cell).to(p.dtype)


def plain_learned_grid_fake_quantize(
    p: torch.Tensor, bits: torch.Tensor, group_size: int, block: int, mn: torch.Tensor, mx: torch.Tensor
) -> torch.Tensor:
    """:func:`learned_grid_fake_quantize` (without ``scale_dtype``) written as plain differentiable
    ops for autograd to differentiate: the clip by ``where``, the rounding by ``t + (round(t) -
    t).detach()``. Slower; the independent route the fused op's gradients are tested and
    benchmarked against (``benchmarks/grid_ops.py``)."""
    cell = cell_size(group_size, block)
    top = per_cell(2 ** bits.reshape(-1) - 1, group_size, cell)[:, None]
    span = mx - mn
    width = torch.where(span.detach() > 0, span, torch.ones_like(span))
    low = per_cell(mn, block, cell)[:, None]
    t = (p.reshape(-1, cell) - low) / per_cell(width, block, cell)[:, None] * top
    t = torch.where(t > top, top, torch.where(t < 0, torch.zeros_like(t), t))
    t = t + (t.detach().round() - t.detach())
    return (t * ((1 / top) * per_cell(span, block, cell)[:, None]) + low).view_as(p)


class _LearnedGridSTE(torch.autograd.Function):
    """The fake quantization of :func:`learned_grid_fake_quantize`: ``x`` with one ``low`` and
    ``span`` per block of ``block`` entries and one ``top`` (``2**bits - 1``) per cell of ``cell``,
    its gradients in closed form (one saved tensor, a dozen element-wise passes where autograd
    takes two dozen; most broadcast once per block, not once per cell of 8).

    ``u = (x - low) / w`` (``w = span``, or 1 where ``span <= 0``), level ``n = round(clip(u, 0, 1)
    top)`` (the same values as clipping ``u top`` to ``[0, top]``), ``q = n step + low`` with ``step =
    (1 / top) span`` as :func:`grid_dequantize` forms it; the rounding and the clip's inside passed
    straight through. With ``r = span / w`` (1 where the span is positive) and ``inside = 0 <= u <=
    1``: ``dq/dx = inside r``, ``dq/dlow = 1 - inside r``, ``dq/dspan = n / top - inside u [span >
    0]``. ``top`` (the frozen bits) gets a zero gradient: it stays in the graph for DDP."""

    @staticmethod
    def forward(ctx, x, low, span, top, block, cell):  # type: ignore[override]  # noqa: ANN001, ANN205
        positive = span > 0
        width = torch.where(positive, span, torch.ones_like(span))
        u = (x.reshape(-1, block) - low[:, None]).div_(width[:, None])
        step = (1 / top) * per_cell(span, block, cell)
        levels = u.clamp(0, 1).view(-1, cell).mul_(top[:, None]).round_()
        ctx.save_for_backward(u, span / width, top, positive)
        ctx.shape, ctx.block, ctx.cell = x.shape, block, cell
        return levels.mul_(step[:, None]).view(-1, block).add_(low[:, None]).view(x.shape)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]  # noqa: ANN001, ANN205
        u, ratio, top, positive = ctx.saved_tensors
        block, cell = ctx.block, ctx.cell
        grad = grad.reshape(-1, block)
        passed = _inside_unit(grad, u)
        grad_x = passed.mul(ratio[:, None]).view(ctx.shape) if ctx.needs_input_grad[0] else None
        grad_low = grad_span = None
        if ctx.needs_input_grad[1]:
            grad_low = grad.sum(1) - passed.sum(1) * ratio
        if ctx.needs_input_grad[2]:
            levels = u.clamp(0, 1).view(-1, cell).mul_(top[:, None]).round_()
            per_level = levels.mul_(grad.reshape(-1, cell)).sum(1).div_(top).view(-1, block // cell).sum(1)
            grad_span = per_level - passed.mul(u).sum(1) * positive
        grad_top = torch.zeros_like(top) if ctx.needs_input_grad[3] else None
        return grad_x, grad_low, grad_span, grad_top, None, None


def grid_rounding_offset(
    p: torch.Tensor, bits: torch.Tensor, group_size: int, block: int, mn: torch.Tensor, mx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each entry of ``p`` lies between its grid's levels: ``t - round(t)`` with ``t = (p - min)
    / (max - min) (2**bits - 1)``, as the grid rounds it (in ``[-0.5, 0.5]``; 0 for an entry beyond
    its range, which the grid clips, and in a block of no span), and the step ``(max - min) / (2**bits
    - 1)`` of its cell, both shaped as ``p`` in :func:`compute_dtype`. The oscillation dampening of
    Nagel et al. (2022) pulls each entry towards its level by ``offset / step`` (:func:`grid_rounding_pull`)."""
    offset, top, width, positive = _rounding_cells(p, bits, group_size, block, mn, mx)
    step = width / top
    return offset.mul_(positive[:, None]).view_as(p), step[:, None].expand_as(offset).reshape(p.shape)


def grid_rounding_pull(
    p: torch.Tensor, bits: torch.Tensor, group_size: int, block: int, mn: torch.Tensor, mx: torch.Tensor
) -> torch.Tensor:
    """``offset / step`` of :func:`grid_rounding_offset`, shaped as ``p`` in :func:`compute_dtype`:
    half the gradient of ``offset**2`` in each entry (one multiply per cell by ``(2**bits - 1) / span``)."""
    offset, top, width, positive = _rounding_cells(p, bits, group_size, block, mn, mx)
    return offset.mul_((top / width * positive)[:, None]).view_as(p)


def _rounding_cells(
    p: torch.Tensor, bits: torch.Tensor, group_size: int, block: int, mn: torch.Tensor, mx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The offsets ``(cells, cell)`` of :func:`grid_rounding_offset` (not yet zeroed in blocks of no
    span), and per cell ``2**bits - 1``, the span (1 where it is not positive) and whether it is
    positive. ``u = (p - min) / span``
    is formed per block, as :func:`grid_quantize` does; ``inside = 0 <= u <= 1`` by one pass."""
    work = compute_dtype(p.dtype)
    cell = cell_size(group_size, block)
    top = per_cell(torch.exp2(bits.reshape(-1).to(work)) - 1, group_size, cell)
    mn = mn.to(work)
    span = mx.to(work) - mn
    positive = span > 0
    width = torch.where(positive, span, torch.ones_like(span))
    u = (p.detach().to(work).reshape(-1, block) - mn[:, None]).div_(width[:, None])
    t = u.view(-1, cell).mul(top[:, None])
    offset = _inside_unit(t.sub_(t.round()), u.view(-1, cell))
    return offset, top, per_cell(width, block, cell), per_cell(positive, block, cell)


def _inside_unit(values: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``values`` where ``0 <= u <= 1``, else 0: one pass (``hardtanh_backward``'s bounds are strict,
    so they sit one representable value outside the unit interval)."""
    finfo = torch.finfo(u.dtype)
    return torch.ops.aten.hardtanh_backward(values, u, -finfo.smallest_normal * finfo.eps, 1 + finfo.eps)
