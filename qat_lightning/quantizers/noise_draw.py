"""How DiffQ's training noise is drawn: torch's samplers, or 16-bit draws four to a random word.

On the CPU torch spends about 3.5 ns per number on ``normal_`` / ``uniform_``, whatever the dtype:
its Mersenne Twister and Box-Muller run element by element. Drawing *64* random bits per element
(``random_`` over the full int64 range) costs the same per element, so one such draw gives four
16-bit values for the price of one float:

- ``uniform``: the 16-bit value ``k`` read as signed, ``k / 2**16``, is uniform on ``[-0.5, 0.5)``
  (``rand - 0.5`` with 16 instead of 24 bits of resolution);
- ``gaussian``: ``k`` read as unsigned indexes a table of the standard normal's quantiles at
  ``(k + 0.5) / 2**16``, rescaled to variance exactly 1: an exact draw from a 65 536-point
  equiprobable approximation of ``N(0, 1)``, within ``+-4.33`` (``randn`` in float32 rarely goes
  past ``+-5.5``).

Noise injection models the rounding error of a quantized weight, itself a discrete quantity:
16 bits of resolution in the noise are far below anything the weights can resolve. The table
draw costs ~0.5 ns of random bits plus a gather per weight (about half of ``normal_``'s time on a
CPU; measured in ``benchmarks/step_overhead.py``). On GPUs torch's samplers are single fused
Philox kernels already, and ``"auto"`` keeps them there.
"""
from __future__ import annotations

from functools import lru_cache
from statistics import NormalDist

import torch

TABLE_BITS = 16
TABLE_SIZE = 2**TABLE_BITS
CHUNK = 2**18  # entries drawn per call: the scratch stays small (1.5 MB) and in cache
SAMPLERS = ("auto", "table", "torch")


@lru_cache(maxsize=1)
def gaussian_table() -> torch.Tensor:
    """``N(0, 1)``'s quantiles at ``(k + 0.5) / 2**16`` for ``k = 0 .. 2**16 - 1``, scaled to
    variance 1, in float64 (mean exactly 0: the table is antisymmetric). Cached: do not modify."""
    inv_cdf = NormalDist().inv_cdf
    half = [inv_cdf((k + 0.5) / TABLE_SIZE) for k in range(TABLE_SIZE // 2, TABLE_SIZE)]
    upper = torch.tensor(half, dtype=torch.float64)
    table = torch.cat([-upper.flip(0), upper])
    return table / table.square().mean().sqrt()


class NoiseSampler:
    """Unit noise of one kind (``"gaussian"``: ``randn``, ``"uniform"``: ``rand - 0.5``) drawn into a
    tensor, by ``sampler``: ``"torch"`` (``normal_`` / ``uniform_``), ``"table"`` (16-bit draws, see
    the module) or ``"auto"`` (the table on the CPU, torch's elsewhere)."""

    def __init__(self, kind: str, sampler: str = "auto") -> None:
        self.kind, self.sampler = kind, sampler
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._scratch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def uses_table(self, device: torch.device) -> bool:
        return self.sampler == "table" or (self.sampler == "auto" and device.type == "cpu")

    def draw(self, out: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
        """Fill ``out`` (contiguous) with unit noise; return it and the factor that makes it the
        reference's source: ``randn / 2`` is ``out * 0.5``, ``rand - 0.5`` is ``out * factor``."""
        if not self.uses_table(out.device):
            if self.kind == "gaussian":
                return out.normal_(generator=generator), 0.5
            return out.uniform_(-0.5, 0.5, generator=generator), 1.0
        flat = out.view(-1)
        words, index = self._scratch_for(out.device)
        table = self._table(out.device, out.dtype) if self.kind == "gaussian" else None
        for start in range(0, flat.numel(), CHUNK):
            part = flat[start:start + CHUNK]
            n = part.numel()
            draws = words[: -(-n // 4)].random_(-(2**63), None, generator=generator)  # 64 random bits each
            if table is None:  # signed 16-bit k: k / 2**16 is uniform on [-0.5, 0.5)
                part.copy_(draws.view(torch.int16)[:n])
            else:
                torch.index_select(table, 0, index[:n].copy_(draws.view(torch.uint16)[:n]), out=part)
        return out, (0.5 if table is not None else 2.0**-TABLE_BITS)

    def _table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = gaussian_table().to(device=device, dtype=dtype)
        return table

    def _scratch_for(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        scratch = self._scratch.get(device)
        if scratch is None:
            scratch = self._scratch[device] = (
                torch.empty(CHUNK // 4, dtype=torch.int64, device=device),
                torch.empty(CHUNK, dtype=torch.int32, device=device),
            )
        return scratch
