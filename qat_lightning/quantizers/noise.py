"""Noise injection as one fused autograd op.

``inject_noise(p, logit, std, log_slope, noise)`` turns ``noise`` (a tensor shaped like ``p``
holding unit noise, overwritten) into ``p + std[c] * noise`` for equal contiguous cells ``c`` of
``p`` (each logit group ``g`` made of one or more cells) and returns it; ``std`` is a function
of ``logit`` whose logarithmic derivative ``log_slope = (d std / d logit) / std`` the caller
computes in closed form. Autograd records a
single node: the backward is the identity for ``p`` (no copy) and one multiply-reduce per group
for the logit, the minimum work the DiffQ gradient needs.

Memory: nothing but the noisy weight is kept for the backward (the layer that uses it saves it
anyway), and the backward computes in its memory. The unit noise is recovered there as
``(noisy - p) / std``, so the logit gradient is ``log_slope * sum(grad * (noisy - p))``. For float32 that recovery is exact up to the rounding of
``p + noise``, a relative error below ``2**(bits - 23)`` per entry (3e-5 at 8 bits); for float16 and
bfloat16 weights it is not, and the unit noise is saved instead.

The tensor range inside ``std`` is a constant: the reference also differentiates through
``max(p) - min(p)``, which only ever touches the two extreme entries of a tensor and costs two
full-tensor comparisons per step.
"""
from __future__ import annotations

import torch

RECONSTRUCTED_DTYPES = (torch.float32, torch.float64)


class _InjectNoise(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        p: torch.Tensor,
        logit: torch.Tensor,
        std: torch.Tensor,
        log_slope: torch.Tensor,
        noise: torch.Tensor,
        penalty_grad: torch.Tensor | None,
    ) -> torch.Tensor:
        cells = std.shape[0]
        ctx.groups, ctx.cells = log_slope.shape[0], cells
        ctx.penalty_grad = penalty_grad
        ctx.reconstruct = p.dtype in RECONSTRUCTED_DTYPES
        if ctx.reconstruct:
            rows = noise.view(cells, -1)
            torch.addcmul(p.reshape(cells, -1), rows, std[:, None], out=rows)
            ctx.mark_dirty(noise)
            ctx.save_for_backward(p, noise, log_slope)
            return noise
        # d std / d logit per cell: a group's cells share its logit (and its log slope)
        ctx.save_for_backward(noise, (std.view(ctx.groups, -1) * log_slope[:, None]).view(-1))
        return torch.addcmul(p.reshape(cells, -1), noise.view(cells, -1), std[:, None]).view_as(p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        # Linear layers hand back the weight gradient transposed; AccumulateGrad would copy it into
        # the parameter's layout anyway, so do it first and read it contiguously below.
        grad = grad.contiguous()
        grad_logit = None
        if ctx.needs_input_grad[1]:
            # This node produced the noisy weight, so every use of it has run its backward already:
            # its memory is free for the product (no scratch tensor, no allocation). A retained
            # graph that needs it again fails autograd's version check, loudly.
            if ctx.reconstruct:
                p, noisy, slope = ctx.saved_tensors  # slope: d log(std) / d logit
                product = noisy.sub_(p).mul_(grad).view(ctx.groups, -1)  # (std * unit noise) * grad
                grad_std = torch.mv(product, product.new_ones(product.shape[1])).to(slope.dtype)  # faster than .sum(1)
                penalty = ctx.penalty_grad
                grad_logit = grad_std.mul_(slope) if penalty is None else torch.addcmul(penalty, grad_std, slope)
            else:
                noise, cell_slope = ctx.saved_tensors  # unit noise, d std / d logit per cell
                product = noise.mul_(grad).view(ctx.cells, -1)
                grad_logit = torch.mv(product, product.new_ones(product.shape[1])).to(cell_slope.dtype).mul_(cell_slope)
                if ctx.cells != ctx.groups:  # a group's cells add up
                    grad_logit = grad_logit.view(ctx.groups, -1).sum(1)
                if ctx.penalty_grad is not None:
                    grad_logit = grad_logit.add_(ctx.penalty_grad)
        return grad, grad_logit, None, None, None, None


def inject_noise(
    p: torch.Tensor,
    logit: torch.Tensor,
    std: torch.Tensor,
    log_slope: torch.Tensor,
    noise: torch.Tensor,
    penalty_grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """``p + std[:, None] * noise`` over ``std.numel()`` equal cells of ``p``; differentiable in
    ``p`` and ``logit`` (through ``log_slope = (d std / d logit) / std``, one per logit group of
    ``p``, each group one or more whole cells), not in ``std`` itself.

    ``noise`` (contiguous, shaped like ``p``, not requiring grad) holds the unit noise; for float32
    and float64 weights it is overwritten with the result, which is returned; the backward reuses
    its memory once every use of the result has run its backward.
    ``penalty_grad``: added to the logit's gradient in each backward (a size penalty's gradient).
    """
    return _InjectNoise.apply(p, logit, std, log_slope, noise, penalty_grad)


class _InjectNoiseMany(torch.autograd.Function):
    """:func:`inject_noise` of ``k`` float32 tensors in one node (see :func:`inject_noise_many`)."""

    @staticmethod
    def forward(ctx, group_size: int, counts: list[int], flat: torch.Tensor, std: torch.Tensor,  # type: ignore[override]
                log_slope: torch.Tensor, penalty_grad: torch.Tensor | None, noise: torch.Tensor,
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k = len(tensors) // 2
        params = tensors[:k]
        noisy = torch.addcmul(flat.view(-1, group_size), noise.view(-1, group_size), std[:, None]).view(-1)
        outs = tuple(part.view_as(p) for part, p in zip(noisy.split([p.numel() for p in params]), params))
        ctx.group_size, ctx.counts, ctx.penalty_grad, ctx.log_slope = group_size, counts, penalty_grad, log_slope
        ctx.set_materialize_grads(False)  # an output no loss used: None, not zeros (no gradient, as for a weight drawn alone)
        ctx.save_for_backward(flat, noisy)
        return outs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        k = len(grads)
        grad_params = [g if ctx.needs_input_grad[7 + i] else None for i, g in enumerate(grads)]
        grad_logits: list[torch.Tensor | None] = [None] * k
        used = [g is not None and ctx.needs_input_grad[7 + k + i] for i, g in enumerate(grads)]  # unused outputs: no gradient
        if any(used):
            flat, noisy = ctx.saved_tensors
            counts, group_size = ctx.counts, ctx.group_size
            grad = torch.cat([g.reshape(-1) if u else noisy.new_zeros(n * group_size) for g, u, n in zip(grads, used, counts)])
            # out of place (small tensors): a retained graph's second backward still finds its own noisy weights
            product = torch.sub(noisy, flat).mul_(grad).view(-1, group_size)  # (std * unit noise) * grad
            grad_std = torch.mv(product, product.new_ones(group_size)).to(ctx.log_slope.dtype)
            penalty = ctx.penalty_grad
            grad_logit = grad_std.mul_(ctx.log_slope) if penalty is None else torch.addcmul(penalty, grad_std, ctx.log_slope)
            grad_logits = [part if u else None for part, u in zip(grad_logit.split(counts), used)]
        return (None,) * 7 + (*grad_params, *grad_logits)


def inject_noise_many(
    params: list[torch.Tensor],
    logits: list[torch.Tensor],
    group_size: int,
    std: torch.Tensor,
    log_slope: torch.Tensor,
    noise: torch.Tensor,
    penalty_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """:func:`inject_noise` of several float32 tensors at once, one autograd node and a few ops
    for all of them rather than a dozen each (for models of many small weights the per-op
    dispatch, not the arithmetic, is the cost). Each ``params[i]`` (contiguous) has
    ``logits[i].numel()`` groups of ``group_size`` entries, each group one cell; ``std``,
    ``log_slope`` and ``penalty_grad`` hold one value per group, tensor after tensor, and
    ``noise`` the unit noise of every entry, tensor after tensor (read, not kept). The values are
    bit for bit those of :func:`inject_noise` on each tensor; the outputs are views of one new
    tensor (nothing reused from step to step, nothing modified in place: a retained graph stays
    valid); the backward runs once every used output has its gradient (an output no loss used
    gives its tensors no gradient)."""
    counts = [logit.numel() for logit in logits]
    with torch.no_grad():
        flat = torch.cat([p.view(-1) for p in params])  # kept for the backward's noisy - p
    return _InjectNoiseMany.apply(group_size, counts, flat, std, log_slope, penalty_grad, noise, *params, *logits)
