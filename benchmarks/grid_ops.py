"""DiffQ's straight-through ops on one weight, fused against the plain formulation, side by side.

Times, interleaved in one process (one thread, median over ``--repeats``):

- the learned-grid fake quantization forward + backward (``learned_grid_fake_quantize``, one
  autograd Function with closed-form gradients) against the same formula written as plain
  differentiable ops for autograd (the clip by ``where``, the rounding by ``t + (round(t) - t).detach()``);
- the oscillation-dampening pull (``grid_rounding_pull``) against the route it replaced: the
  levels of ``grid_quantize`` at the given ranges, then the offset over an expanded per-entry step.

    python benchmarks/grid_ops.py [--rows 512] [--cols 512] [--group 8] [--bits 4] [--repeats 50]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from qat_lightning.formats.uniform import (cell_size, grid_quantize, grid_rounding_pull, learned_grid_fake_quantize, per_cell,
                                          plain_learned_grid_fake_quantize)


def plain_rounding_pull(p: torch.Tensor, bits: torch.Tensor, group_size: int, block: int, mn: torch.Tensor,
                        mx: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The pull by the route before: ``grid_quantize``'s levels at the ranges (unused but computed),
    then ``t - round(t)`` over a per-entry step expanded to the weight's shape."""
    grid_quantize(p, bits, group_size, block, ranges=(mn, mx))
    cell = cell_size(group_size, block)
    top = per_cell(2 ** bits.reshape(-1) - 1, group_size, cell)[:, None]
    span = mx - mn
    step = per_cell(torch.where(span > 0, span, torch.ones_like(span)), block, cell)[:, None] / top
    t = (p.reshape(-1, cell) - per_cell(mn, block, cell)[:, None]) / step
    inside = (t >= 0) & (t <= top) & per_cell(span > 0, block, cell)[:, None]
    offset = torch.where(inside, t - t.round(), torch.zeros_like(t))
    return offset.view_as(p) / step.expand_as(offset).reshape(p.shape)


def median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, the functions interleaved (one call each per round)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    p = torch.randn(args.rows, args.cols, requires_grad=True)
    bits = torch.full((p.numel() // args.group,), float(args.bits))
    mn = (p.detach().amin(1) * 0.9).requires_grad_(True)  # one learned range per row, slightly clipped
    mx = (p.detach().amax(1) * 0.9).requires_grad_(True)
    grad = torch.randn_like(p)

    def train_step(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            fn(p, bits, args.group, args.cols, mn, mx).backward(grad)
            p.grad = mn.grad = mx.grad = None
        return run

    detached = (p.detach(), bits, args.group, args.cols, mn.detach(), mx.detach())
    with torch.no_grad():  # the two forms of t differ in the last bit: near a rounding point they can pick other levels
        differ = (~torch.isclose(grid_rounding_pull(*detached), plain_rounding_pull(*detached), rtol=1e-3, atol=1e-3)).float().mean().item()
    quantize = median_ms({"fused": train_step(learned_grid_fake_quantize), "plain": train_step(plain_learned_grid_fake_quantize)}, args.repeats)
    pull = median_ms({"fused": lambda: grid_rounding_pull(*detached), "plain": lambda: plain_rounding_pull(*detached)}, args.repeats)
    print(f"weight {args.rows} x {args.cols}, groups of {args.group} at {args.bits} bits, one range per row, {args.threads} thread(s)")
    for label, result in (("learned grid, forward + backward", quantize), ("dampening pull", pull)):
        print(f"  {label:34s} fused {result['fused']:7.3f} ms   plain {result['plain']:7.3f} ms   "
              f"ratio {result['plain'] / result['fused']:.2f}x")  # fmt: skip
    print(f"  pulls that differ between the two (a t on the other side of a rounding point): {differ:.2e}")


if __name__ == "__main__":
    main()
