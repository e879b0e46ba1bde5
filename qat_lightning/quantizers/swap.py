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
    """Installs the hooks that substitute ``substitute(entry, module)`` for each entry's parameter."""

    def __init__(self, substitute: Callable[[SwappedParam, nn.Module], torch.Tensor | None]) -> None:
        self._substitute = substitute
        # hooked module -> (module whose _parameters hold it, attribute, entry)
        self._by_module: dict[nn.Module, list[tuple[nn.Module, str, SwappedParam]]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def add(self, entry: SwappedParam) -> None:
        for slot in entry.slots:
            for hooked in (slot.module, *slot.readers):
                if hooked not in self._by_module:
                    self._by_module[hooked] = []
                    self._handles.append(hooked.register_forward_pre_hook(self._pre_hook))
                    self._handles.append(hooked.register_forward_hook(self._post_hook, always_call=True))
                self._by_module[hooked].append((slot.module, slot.attr, entry))

    def entries(self) -> list[SwappedParam]:
        """Every entry added, once."""
        unique = {id(e): e for slots in self._by_module.values() for _, _, e in slots}
        return list(unique.values())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._by_module.clear()

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        swapped = False
        for owner, attr, entry in self._by_module[module]:
            tensor = self._substitute(entry, owner)
            if tensor is not None:
                owner._parameters[attr] = tensor  # bypasses the leaf check of __setattr__ on purpose
                swapped = True
        if swapped:
            refresh_rnn(module)

    def _post_hook(self, module: nn.Module, args: tuple, output: object) -> None:
        swapped = False
        for owner, attr, entry in self._by_module[module]:
            if owner._parameters[attr] is not entry.param:
                owner._parameters[attr] = entry.param
                swapped = True
        if swapped:
            refresh_rnn(module)


def refresh_rnn(module: nn.Module) -> None:
    """RNN modules cache their weights in ``_flat_weights``; rebuild it after a swap."""
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()
