"""Per-module weight swapping: the mechanism every weight quantizer here builds on.

A quantizer decides, for each parameter it owns, what tensor a module's forward should see
(noisy weights in training, true quantized weights in eval). ``WeightSwapper`` installs a
forward pre-hook and an always-called forward hook on each module that owns such a parameter:
the pre-hook puts the substitute into ``module._parameters`` and the hook puts the real
``nn.Parameter`` back. Hooks sit on the owning modules, not on the root, so calling a submodule
directly is quantized too; outside a forward the model always holds its float parameters, so
``state_dict()``, optimizers and checkpoints never see a substitute.

Why not ``torch.nn.utils.parametrize``: it renames state-dict keys (checkpoints would no longer
load into a plain model), recomputes on every attribute access, and does not cooperate with the
flattened weights of ``nn.LSTM``/``nn.GRU``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(eq=False)
class Slot:
    """One place a parameter is registered: ``module._parameters[attr]``; ``readers`` are parents
    whose forward reads it directly without calling ``module`` (``nn.MultiheadAttention`` and its
    ``out_proj``): the swap hooks sit on them too."""

    module: nn.Module
    attr: str
    qualified_name: str
    readers: tuple[nn.Module, ...] = ()


@dataclass(eq=False)
class SwappedParam:
    """A parameter and every slot that holds it (several when it is tied)."""

    name: str
    param: nn.Parameter
    slots: list[Slot] = field(default_factory=list)


class WeightSwapper:
    """Installs the hooks that substitute ``substitute(entry, module, current)`` for each entry's
    parameter; ``current`` is what the slot holds when the forward starts: the entry's parameter,
    or the full parameter that FSDP2 (``fully_shard``) gathered for this forward in place of its
    shard. The hook after the forward puts ``current`` back."""

    def __init__(self, substitute: Callable[[SwappedParam, nn.Module, torch.Tensor], torch.Tensor | None]) -> None:
        self._substitute = substitute
        # hooked module -> (module whose _parameters hold it, attribute, entry, the slot's key in _held)
        self._by_module: dict[nn.Module, list[tuple[nn.Module, str, SwappedParam, tuple[int, str]]]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # (id(owner), attr) -> (hooked module, what the slot held before the swap, the substitute) while swapped
        self._held: dict[tuple[int, str], tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}

    def add(self, entry: SwappedParam) -> None:
        for slot in entry.slots:
            for hooked in (slot.module, *slot.readers):
                if hooked not in self._by_module:
                    self._by_module[hooked] = []
                    self._handles.append(hooked.register_forward_pre_hook(self._pre_hook))
                    self._handles.append(hooked.register_forward_hook(self._post_hook, always_call=True))
                self._by_module[hooked].append((slot.module, slot.attr, entry, (id(slot.module), slot.attr)))

    def entries(self) -> list[SwappedParam]:
        """Every entry added, once."""
        unique = {id(e): e for slots in self._by_module.values() for _, _, e, _ in slots}
        return list(unique.values())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._by_module.clear()

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        swapped = False
        held = self._held
        for owner, attr, entry, key in self._by_module[module]:
            swap = held.get(key)
            if swap is not None:
                if owner._parameters[attr] is swap[2]:
                    continue  # swapped already by an enclosing reader's hook (it puts it back)
                del held[key]  # left by a forward that never reached its hook after (a failed trace)
            current = owner._parameters[attr]
            tensor = self._substitute(entry, owner, current)
            if tensor is not None:
                held[key] = (module, current, tensor)
                owner._parameters[attr] = tensor  # bypasses the leaf check of __setattr__ on purpose
                swapped = True
        if swapped and isinstance(module, nn.RNNBase):
            module._init_flat_weights()  # RNN modules cache their weights in _flat_weights

    def _post_hook(self, module: nn.Module, args: tuple, output: object) -> None:
        swapped = False
        held = self._held
        for owner, attr, _, key in self._by_module[module]:
            swap = held.get(key)
            if swap is not None and swap[0] is module:
                if owner._parameters[attr] is swap[2]:
                    owner._parameters[attr] = swap[1]
                    swapped = True
                del held[key]
        if swapped and isinstance(module, nn.RNNBase):
            module._init_flat_weights()  # RNN modules cache their weights in _flat_weights


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an FSDP2 shard (``torch.distributed.tensor.DTensor``), by name: no
    import of torch.distributed where it is not built."""
    return type(tensor).__name__ == "DTensor"


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """An FSDP2 shard gathered into the whole tensor (a collective: every rank must call); any
    other tensor as it is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def rebind(entries: list[SwappedParam]) -> None:
    """Point each entry at the parameter its first slot now holds: FSDP2's ``fully_shard`` replaces
    a module's parameters with sharded ``DTensor`` ones after the quantizer was attached."""
    for entry in entries:
        slot = entry.slots[0]
        entry.param = slot.module._parameters[slot.attr]


def refresh_rnn(module: nn.Module) -> None:
    """RNN modules cache their weights in ``_flat_weights``; rebuild it after a swap."""
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()
