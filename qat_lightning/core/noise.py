"""Noise injection as one fused autograd op.

``inject_noise(p, std, source)`` returns ``p + std[g] * source`` for groups ``g`` of ``p``. Its
backward is the identity for ``p`` (no copy) and one multiply-reduce per group for ``std``, the
minimum work the DiffQ gradient needs. The tensor range inside ``std`` is treated as a constant:
the reference also differentiates through ``max(p) - min(p)``, which only ever touches the two
extreme entries of a tensor and costs two full-tensor comparisons per step.
"""
from __future__ import annotations

import torch


class _InjectNoise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: torch.Tensor, std: torch.Tensor, source: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        groups = std.shape[0]
        ctx.save_for_backward(source)
        ctx.groups = groups
        return torch.addcmul(p.reshape(groups, -1), source.reshape(groups, -1), std[:, None]).view_as(p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (source,) = ctx.saved_tensors
        grad_std = None
        if ctx.needs_input_grad[1]:
            grad_std = (grad.reshape(ctx.groups, -1) * source.reshape(ctx.groups, -1)).sum(1)
        return grad, grad_std, None


def inject_noise(p: torch.Tensor, std: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``p + std[:, None] * source`` over ``std.numel()`` equal groups of ``p``, differentiable in ``p`` and ``std``."""
    return _InjectNoise.apply(p, std, source)
