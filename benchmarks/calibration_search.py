"""Histogram calibration: our vectorised amax searches vs straightforward loops (the reference's way).

The loop versions below follow the reference implementation step by step (a Python loop over the
candidates; scipy's ``entropy`` for the KL divergence); the tests use them as the oracle. This
script times both on the same histograms and prints the speed-up.

    python benchmarks/calibration_search.py [--bins 2048] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import torch


def loop_percentile(counts: np.ndarray, edges: np.ndarray, percentile: float) -> float:
    total = counts.sum()
    cdf = np.cumsum(counts / total)
    idx = np.searchsorted(cdf, percentile / 100)
    return float(edges[idx])


def loop_mse(counts: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool, stride: int = 1, start_bin: int = 128) -> float:
    counts_t = torch.from_numpy(counts[:]).float()
    edges_t = torch.from_numpy(edges[:]).float()
    centers = (edges_t[1:] + edges_t[:-1]) / 2
    max_bound = 2.0 ** (num_bits - 1 + int(unsigned)) - 1.0
    min_bound = 0.0 if unsigned else -max_bound
    mses, arguments = [], []
    for i in range(start_bin, len(centers), stride):
        amax = centers[i]
        scale = max_bound / amax if amax > 1.0 / (1 << 24) else torch.tensor(1.0)
        quant = torch.clamp((centers * scale).round_(), min_bound, max_bound) / scale
        mses.append(((quant - centers) ** 2 * counts_t).mean())
        arguments.append(i)
    return float(centers[arguments[int(np.argmin(mses))]])


def loop_entropy(counts: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool, stride: int = 1, start_bin: int = 128) -> float:
    from scipy.stats import entropy

    bins = counts[:].copy()
    bins[0] = bins[1]
    total_data = np.sum(bins)
    divergences, arguments = [], []
    nbins = 1 << (num_bits - 1 + int(unsigned))
    new_density_counts = np.zeros(nbins, dtype=np.float64)
    for i in range(start_bin, len(bins) + 1, stride):
        new_density_counts.fill(0)
        space = np.linspace(0, i, num=nbins + 1)
        digitized_space = np.digitize(range(i), space) - 1
        digitized_space[bins[:i] == 0] = -1
        for idx, digitized in enumerate(digitized_space):
            if digitized != -1:
                new_density_counts[digitized] += bins[idx]
        counter = Counter(digitized_space)
        for key, val in counter.items():
            if key != -1:
                new_density_counts[key] = new_density_counts[key] / val
        new_density = np.zeros(i, dtype=np.float64)
        for idx, digitized in enumerate(digitized_space):
            if digitized != -1:
                new_density[idx] = new_density_counts[digitized]
        reference_density = np.array(bins[: len(digitized_space)], dtype=np.float64)
        reference_density[-1] += np.sum(bins[i:])
        assert round(np.sum(reference_density)) == total_data
        new_density /= np.sum(new_density)
        reference_density /= np.sum(reference_density)
        divergences.append(entropy(reference_density, new_density))
        arguments.append(i)
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - np.argmin(divergences[::-1])
    return float(edges[last_argmin * stride + start_bin])


def sample_histogram(bins: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of |x| for a heavy-tailed sample, as collected from activations."""
    rng = np.random.default_rng(seed)
    x = np.abs(np.concatenate([rng.standard_t(3, 200_000), rng.normal(0, 8, 200)]))
    counts, edges = np.histogram(x, bins=bins, range=(0, x.max()))
    return counts, edges.astype(np.float32)


def main() -> None:
    from qat_lightning.calibration.histogram import amax_entropy, amax_mse, amax_percentile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bins", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts, edges = sample_histogram(args.bins)
    cases = [
        ("percentile 99.99", lambda: loop_percentile(counts, edges, 99.99), lambda: amax_percentile(counts, edges, 99.99)),
        ("mse, 8 bits", lambda: loop_mse(counts, edges, 8, False), lambda: amax_mse(counts, edges, 8, False)),
        ("entropy, 8 bits", lambda: loop_entropy(counts, edges, 8, False), lambda: amax_entropy(counts, edges, 8, False)),
    ]
    print(f"histogram of {args.bins} bins, {args.threads} thread(s); median of {args.repeats}")
    for name, loop, ours in cases:
        times = {}
        for label, fn in (("loop", loop), ("ours", ours)):
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                value = fn()
                runs.append(time.perf_counter() - start)
            times[label] = (sorted(runs)[len(runs) // 2], value)
        (t_loop, a_loop), (t_ours, a_ours) = times["loop"], times["ours"]
        print(f"  {name:18s} loop {t_loop * 1e3:9.1f} ms   ours {t_ours * 1e3:7.1f} ms   "
              f"speed-up {t_loop / t_ours:6.1f}x   amax {a_ours:.6g} ({'same' if a_ours == a_loop else f'loop {a_loop:.6g}'})")


if __name__ == "__main__":
    main()
