"""What the quantizer modules share: the LSQ step floor and its NaN check, and state that keeps
float32 through dtype conversions of the model."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)
_MIN_STEP = 1e-8


def one_dimensional_step(state_dict: dict, prefix: str) -> None:
    """LSQ steps were 0-d before FSDP2 support made them 1-D (it shards no 0-d parameter): a
    checkpoint written before loads into the new shape."""
    step = state_dict.get(prefix + "step")
    if step is not None and step.dim() == 0:
        state_dict[prefix + "step"] = step.reshape(1)


@torch.compiler.disable
def read_flag(flag: torch.Tensor) -> bool:
    """A 0-dim flag buffer's value, read eagerly from inside a compiled forward (one graph break)."""
    return bool(flag.item())


def check_finite_step(step: torch.Tensor, label: str) -> None:
    """``FloatingPointError`` naming the quantizer when an LSQ step size is NaN / Inf (an update
    from a NaN loss or gradient); read through a numpy view on the CPU (no dispatch), skipped on
    other devices, where the Lightning callback checks every step instead (no sync per forward)."""
    if step.is_cpu and not np.isfinite(step.detach().numpy()).all():
        raise FloatingPointError(
            f"{label}: its LSQ step size is NaN or Inf (an optimizer step from a NaN loss or gradient). The model "
            "diverged: check the loss and the learning rates (Trainer(detect_anomaly=True) finds the first op)"
        )


def apply_keeping_float32(module: nn.Module, apply: Any, fn: Any, *args: Any, **kwargs: Any) -> None:
    """``module._apply`` through ``apply`` (the base class's), but the module's own float32
    parameters and buffers keep float32 and their exact values when ``fn`` changes dtypes
    (``model.half()``, ``.to(torch.bfloat16)``, ``.double()``, Lightning's ``precision="bf16-true"``):
    quantizer state (ranges, scales, step sizes) in half precision would put the grid off by a few
    percent, and Adam's updates of a step size would vanish below its ulp. Devices still follow."""
    before = {name: t.detach() for name, t in (*module._parameters.items(), *module._buffers.items())
              if t is not None and t.dtype == torch.float32}  # fmt: skip
    apply(fn, *args, **kwargs)
    for name, original in before.items():
        container = module._parameters if name in module._parameters else module._buffers
        now = container[name]
        if now is None or now.dtype == torch.float32:
            continue
        restored = original.to(device=now.device)
        if isinstance(now, nn.Parameter):
            now.data = restored
        else:
            container[name] = restored


