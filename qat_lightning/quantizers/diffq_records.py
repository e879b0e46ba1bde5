"""What a :class:`~qat_lightning.quantizers.DiffQuantizer` keeps per parameter: a quantized one
(its bits logits, group size and noise buffer) or one left float."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .swap import SwappedParam


@dataclass(eq=False)
class QuantizedParam(SwappedParam):
    """A quantized parameter: one bits logit per group of ``group_size`` entries."""

    logit: nn.Parameter | None = None
    group_size: int = 0
    range_block: int = 0  # entries per [min, max] range block (the whole tensor on the reference grid)
    scale_dtype: torch.dtype | None = None  # where the ranges are stored; None: the reference's exact fp32
    range_search: int = 0  # clipping candidates tried per range block at true quantization
    symmetric: bool = False  # ranges [-m, m]: one stored value per block
    ranges: nn.Parameter | None = None  # learned [min, max] (symmetric: [m]) per block (learn_ranges), zeros until started
    _ranges_ready: bool | None = None  # whether ranges are started; None: read them (at first use, after a load)
    _noisy: tuple[torch.Tensor, int, int, int] | None = None  # noisy weight, param, logit and own versions
    _eval: tuple[torch.Tensor, int, int] | None = None
    _buffer: torch.Tensor | None = None  # the last noisy weight, refilled in place once free
    _buffer_free: bool = False

    @property
    def num_groups(self) -> int:
        return self.param.numel() // self.group_size

    @property
    def num_ranges(self) -> int:
        return self.param.numel() // self.range_block

    @property
    def range_ends(self) -> int:
        """Values stored per range block: ``m`` of a symmetric ``[-m, m]``, else min and max."""
        return 1 if self.symmetric else 2

    @property
    def scale_bits(self) -> int:
        """Bits of one stored range end (min or max)."""
        return 32 if self.scale_dtype is None else torch.finfo(self.scale_dtype).bits

    def drop_noise(self) -> None:
        self._noisy = None

    def backward_done(self) -> None:
        """The backward through the last noisy weight has run: its noise buffer can be refilled."""
        self._noisy = None
        self._buffer_free = True

    def noise_buffer(self) -> torch.Tensor:
        """A tensor to draw this step's noise into (it becomes the noisy weight): last step's once
        its backward has run (a fresh 1 MB tensor costs half as much in page faults as drawing its
        random numbers), else a new one, so a graph still waiting for its backward keeps its own."""
        buffer, param = self._buffer, self.param
        if buffer is None or not self._buffer_free or (buffer.shape, buffer.dtype, buffer.device) != (
            param.shape, param.dtype, param.device
        ):
            self._buffer = torch.empty_like(param, memory_format=torch.contiguous_format)
        self._buffer_free = False
        return self._buffer.detach()  # an alias without last step's graph (same storage and version counter)


@dataclass(eq=False)
class KeptParam(SwappedParam):
    """A parameter left unquantized (too small or excluded): fp32, or fp16 when ``float16``."""

    half: bool = False
    _eval: tuple[torch.Tensor, int, int] | None = None
