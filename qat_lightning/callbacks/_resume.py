"""What every callback checks when it meets a model or a checkpoint: the module it is attached
to (a second ``fit`` on a new model re-attaches), and the options a checkpoint was written with
(options that define the quantized structure or grid must match, others may change)."""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def attached_elsewhere(callback: Any, pl_module: pl.LightningModule) -> bool:
    """Whether ``callback`` was attached to another LightningModule before this ``setup`` (and
    remember this one). The callback then drops its quantizer and state and attaches anew: a
    second ``fit`` of the same callback on a new model must not leave that model float."""
    previous = getattr(callback, "_attached_module", None)
    elsewhere = previous is not None and previous() is not pl_module
    callback._attached_module = weakref.ref(pl_module)
    if elsewhere:
        rank_zero_info(
            f"{type(callback).__name__}: attached to a new {type(pl_module).__name__}; the previous module keeps what "
            "was installed on it, this callback now drives the new one"
        )
    return elsewhere


def _same(a: Any, b: Any) -> bool:
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 - YAML lists, Python tuples
    return norm(a) == norm(b)


def check_resumed_options(callback: str, saved: Mapping[str, Any], current: Mapping[str, Any], structural: Iterable[str]) -> None:
    """``ValueError`` naming every option of ``structural`` that differs between the checkpoint
    (``saved``) and this run (``current``), with both values: the checkpoint's tensors follow
    from them, so evaluating or training them under other options would be wrong without a
    word. Other differing options (learning rates, schedules) are reported as a warning."""
    structural = list(structural)
    changed = [k for k in structural if k in saved and not _same(saved[k], current.get(k))]
    if changed:
        details = "; ".join(f"{k}: checkpoint {saved[k]!r}, asked {current.get(k)!r}" for k in changed)
        raise ValueError(
            f"{callback}: the checkpoint was written with other quantization options ({details}). Its tensors (bits, "
            f"ranges, step sizes, structure) follow from them: resume or evaluate with the checkpoint's options, or "
            f"start a new run"
        )
    other = [k for k in saved if k not in structural and k in current and not _same(saved[k], current[k])]
    if other:
        details = "; ".join(f"{k}: checkpoint {saved[k]!r}, now {current[k]!r}" for k in other)
        rank_zero_warn(f"{callback}: resuming with training options that differ from the checkpoint's ({details})")


def guard_checkpoint(
    trainer: pl.Trainer, pl_module: pl.LightningModule, callback: Any, check: Callable[[Mapping[str, Any]], None],
    owns_key: Callable[[str], bool],
) -> None:
    """Check a checkpoint's options before Lightning loads its weights into ``pl_module``.

    Lightning restores the model's state dict before the callbacks' states, so a changed option
    would first surface as torch's raw "Error(s) in loading state_dict" (or load without a word).
    A load pre-hook on the LightningModule reads the callback's saved state from the checkpoint
    being restored and runs ``check`` on it first; a checkpoint with no state of this callback
    while the model holds its tensors (``owns_key``) gets a clear error too."""
    handle = getattr(callback, "_checkpoint_guard", None)
    if handle is not None:
        handle.remove()
    name = type(callback).__name__

    def hook(module: Any, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        connector = getattr(trainer, "_checkpoint_connector", None)
        checkpoint = getattr(connector, "_loaded_checkpoint", None)
        if prefix or not checkpoint or checkpoint.get("state_dict") is None:
            return  # not a Lightning restore: a plain load_state_dict is the caller's business
        state = checkpoint.get("callbacks", {}).get(callback.state_key)
        if state is not None:
            check(state)
            return
        ours = [k for k in module.state_dict() if owns_key(k)]
        if ours and not any(owns_key(k) for k in state_dict):
            raise ValueError(
                f"{name}: the checkpoint holds no {name} state and none of its tensors ({ours[0]!r}, ...): it was written "
                f"without {name}. ckpt_path resumes a run with the same callbacks; to quantize a float checkpoint, load its "
                "'state_dict' into the model (load_state_dict(..., strict=False)) and fit without ckpt_path"
            )

    callback._checkpoint_guard = pl_module.register_load_state_dict_pre_hook(hook)
