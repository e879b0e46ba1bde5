"""LSQ (learned step size quantization): the op with a trainable step size and its gradient scale."""
from __future__ import annotations

import math

import torch

from .distiller import LinearQuantMode, _broadcast_shape, f32

def lsq_range(num_bits: int, mode: str) -> tuple[int, int]:
    """Integer levels of the learned-step mode: a true ``num_bits`` grid for each mode."""
    if mode == LinearQuantMode.SYMMETRIC_RESTRICTED:
        return -(2 ** (num_bits - 1) - 1), 2 ** (num_bits - 1) - 1
    if mode == LinearQuantMode.ASYMMETRIC_UNSIGNED:
        return 0, 2**num_bits - 1
    return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1


class _LearnedStepSTE(torch.autograd.Function):
    """LSQ quantize-dequantize ``(clamp(round(x / s + z), q_min, q_max) - z) * s`` on the CPU.

    Gradients: ``x`` straight through inside the grid, 0 outside; the step size ``s`` gets LSQ's
    ``(q - z) - x / s`` inside and ``q_min - z`` / ``q_max - z`` outside, summed per step entry and
    multiplied by ``grad_factor``; ``z`` is a constant. Same math as torch's
    ``_fake_quantize_learnable_per_{tensor,channel}_affine`` (whose CPU kernels are scalar loops).
    """

    @staticmethod
    def forward(ctx, x, step, zero, q_min, q_max, grad_factor, axis):  # type: ignore[override]  # noqa: ANN001, ANN205
        if axis is None and not torch.compiler.is_compiling():  # per tensor: host scalars, the fastest CPU kernels
            s, z = step.item(), zero.item()
            inv = f32(1.0 / s)
        else:
            shape = _broadcast_shape(x, axis)
            s, z = step.detach().reshape(shape).to(x.dtype), zero.reshape(shape).to(x.dtype)
            inv = 1 / s
        y = torch.mul(x, inv).add_(z).round_().clamp_(q_min, q_max).sub_(z).mul_(s)
        ctx.save_for_backward(x)
        ctx.constants = (s, z, inv, q_min, q_max, grad_factor, axis, step.shape)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        s, z, inv, q_min, q_max, grad_factor, axis, step_shape = ctx.constants
        levels = torch.mul(x, inv).add_(z).round_()
        grad_x = torch.ops.aten.hardtanh_backward(grad, levels, q_min - 0.5, q_max + 0.5)  # levels are integers
        if not ctx.needs_input_grad[1]:  # a frozen step size
            return grad_x, None, None, None, None, None, None
        levels.clamp_(q_min, q_max).sub_(z)  # q - z
        if axis is None:
            grad = grad.contiguous()
            total = torch.dot(grad.reshape(-1), levels.reshape(-1)) - inv * torch.dot(grad_x.reshape(-1), x.reshape(-1))
            grad_step = (total * grad_factor).reshape(step_shape)
        else:
            dims = [d for d in range(x.dim()) if d != axis]
            per_element = levels.mul_(grad).sub_(grad_x * x * inv)
            grad_step = (per_element.sum(dims) * grad_factor).reshape(step_shape)
        return grad_x, grad_step, None, None, None, None, None


def learned_step_quantize(
    x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, q_min: int, q_max: int,
    grad_factor: float, axis: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """LSQ fake quantization with a trainable step size ``step`` (per tensor, or per channel along ``axis``).

    ``zero`` is the integer offset in torch's convention (``q = round(x / step + zero)``), held fixed;
    ``grad_factor`` scales the step's gradient (LSQ: ``1 / sqrt(numel * q_max)``). CUDA runs torch's
    fused ``_fake_quantize_learnable_*`` kernels, the CPU a vectorised equivalent.
    """
    if x.is_cuda:
        if axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, step.reshape(1), zero.reshape(1).float(), q_min, q_max, grad_factor
            )
        return torch._fake_quantize_learnable_per_channel_affine(x, step, zero.float(), axis, q_min, q_max, grad_factor)
    return _LearnedStepSTE.apply(x, step, zero, q_min, q_max, grad_factor, axis)


def lsq_grad_factor(numel: int, q_max: int) -> float:
    """LSQ's step-size gradient scale ``1 / sqrt(numel * q_max)``."""
    return 1.0 / math.sqrt(max(numel * q_max, 1))


