"""ModelOpt-style histogram calibration: histograms of ``|x|`` and three ways to pick ``amax``.

:class:`HistogramCalibrator` follows ModelOpt's ``HistogramCalibrator`` (and pytorch-quantization's
before it): ``collect`` histograms ``|x|`` over ``[0, max]`` with ``torch.histc`` on the input's
device; when a later batch goes past the last edge the bin width is kept and bins are appended.
``compute_amax`` picks the clipping value by ``"entropy"`` (KL divergence between the clipped
histogram and its ``2^(b-1+unsigned)``-level quantization), ``"mse"`` (quantization error of the
bin centres weighted by their counts) or ``"percentile"``. The reference loops in Python over up to
2048 candidates (scipy for the entropy); here each search is a few tensor ops over all candidates
at once (the entropy from per-group prefix sums). Results equal the reference's (tests compare them).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from .._validate import check_bool, check_choice, check_number

MAX_BINS = 2**16  # per histogram (ModelOpt uses 2048); more costs memory per channel, not accuracy
METHODS = ("entropy", "mse", "percentile")
_CHUNK_ELEMENTS = 1 << 22  # candidates x bins per chunk of the vectorised searches (32 MB in float64)


class HistogramCalibrator:
    """Collects histograms of ``|x|`` and computes a clipping value ``amax`` from them.

    Example::

        calib = HistogramCalibrator(num_bits=8, unsigned=True)
        for x in activations:
            calib.collect(x)
        amax = calib.compute_amax("entropy")

    Args:
        num_bits: bit width the clipping value is chosen for (2..16).
        axis: channel axis for one histogram per channel (e.g. 0 for weights), or None.
        unsigned: quantization to unsigned levels (one more bit of levels for ``entropy``/``mse``).
        num_bins: bins of the first histogram.
        grow_method: accepted for compatibility; deprecated in ModelOpt and ignored.
        skip_zeros: leave exact zeros out of the histogram.
        torch_hist: histogram with ``torch.histc`` on the input's device; False uses
            ``numpy.histogram`` on the CPU (per tensor only).
    """

    def __init__(
        self,
        num_bits: int = 8,
        axis: int | tuple[int] | None = None,
        unsigned: bool = False,
        num_bins: int = 2048,
        grow_method: str | None = None,
        skip_zeros: bool = False,
        torch_hist: bool = True,
    ) -> None:
        self.num_bits = check_number("num_bits", num_bits, low=2, high=16, integer=True)
        if isinstance(axis, (tuple, list)):
            if len(axis) != 1:
                raise ValueError(f"axis must be None, an int or a 1-tuple (one channel axis); got {axis!r}")
            axis = axis[0]
        if axis is not None:
            check_number("axis", axis, integer=True)
        self.axis = axis
        self.unsigned = check_bool("unsigned", unsigned)
        self.num_bins = check_number("num_bins", num_bins, low=2, high=MAX_BINS, integer=True)
        self.grow_method = check_choice("grow_method", grow_method, (None, "stretch", "append"))
        self.skip_zeros = check_bool("skip_zeros", skip_zeros)
        self.torch_hist = check_bool("torch_hist", torch_hist)
        if axis is not None and not torch_hist:
            raise ValueError("torch_hist=False (numpy.histogram) supports only per-tensor histograms (axis=None)")
        if axis is not None and skip_zeros:
            raise ValueError("skip_zeros=True is supported only for per-tensor histograms (axis=None)")
        self.reset()

    def reset(self) -> None:
        """Forget everything collected."""
        self.hist: torch.Tensor | None = None  # (bins,) or (channels, bins) counts
        self.edges: torch.Tensor | None = None  # (bins + 1,) or (channels, bins + 1), float32
        self.bins: torch.Tensor | None = None  # (channels,) bins in use per channel (per channel only)

    # ----------------------------------------------------------------------------- collect
    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        """Add ``|x|`` to the histogram (one per channel along ``axis``), growing it if needed.

        The first batch sets ``num_bins`` bins over ``[0, max|x|]`` (edges ``torch.linspace``);
        a later batch beyond the last edge appends bins of the same width.
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"collect() expects a floating-point tensor; got {type(x).__name__}")
        x = x.detach()
        if not torch.isfinite(x).all():  # histc would fail with its own message, numpy silently
            raise FloatingPointError(f"HistogramCalibrator.collect(): the tensor holds NaN or Inf ({x.numel()} entries, "
                                     f"{int((~torch.isfinite(x)).sum())} not finite); nothing was collected")  # fmt: skip
        if self.axis is not None:
            return self._collect_per_channel(x)
        x = x.abs().float().reshape(-1)
        if self.skip_zeros:
            x = x[x != 0]
        if x.numel() == 0:
            return
        if not self.torch_hist:
            return self._collect_numpy(x.cpu().numpy())
        x_max = x.max().item()
        if self.hist is None or self.edges[-1] == 0:  # first data (or only zeros so far): fresh bins
            previous = 0.0 if self.hist is None else self.hist.sum()
            self.edges = torch.linspace(0, x_max, self.num_bins + 1, dtype=torch.float32, device=x.device)
            if x_max == 0:  # histc would widen an empty range to [-1, 1]
                self.hist = torch.zeros(self.num_bins, dtype=torch.float32, device=x.device)
                self.hist[0] = x.numel()
            else:
                self.hist = torch.histc(x, bins=self.num_bins, min=0, max=x_max)
            self.hist[0] += previous
            return
        if x_max > self.edges[-1]:  # keep the width, append bins up to the new max
            width = self.edges[1] - self.edges[0]
            bins = math.ceil(x_max / width.item())
            self.edges = torch.arange(bins + 1, device=x.device, dtype=torch.float32) * width
        hist = torch.histc(x, bins=self.edges.numel() - 1, min=0, max=self.edges[-1].item())
        hist[: self.hist.numel()] += self.hist
        self.hist = hist

    def _collect_numpy(self, x: np.ndarray) -> None:
        x_max = x.max()
        if self.hist is None or self.edges[-1] == 0:
            previous = 0.0 if self.hist is None else self.hist.sum()
            if x_max == 0:  # numpy would widen an empty range to [-0.5, 0.5]
                counts, edges = np.zeros(self.num_bins), np.zeros(self.num_bins + 1)
                counts[0] = x.size
            else:
                counts, edges = np.histogram(x, bins=self.num_bins, range=(0, x_max))
            self.hist, self.edges = torch.from_numpy(counts).float(), torch.from_numpy(edges).float()
            self.hist[0] += previous
            return
        if x_max > self.edges[-1]:
            width = float(self.edges[1] - self.edges[0])
            self.edges = torch.arange(math.ceil(x_max / width) + 1, dtype=torch.float32) * width
        counts, _ = np.histogram(x, bins=self.edges.numel() - 1, range=(0, float(self.edges[-1])))
        hist = torch.from_numpy(counts).float()
        hist[: self.hist.numel()] += self.hist
        self.hist = hist

    def _collect_per_channel(self, x: torch.Tensor) -> None:
        axis = self.axis % x.dim()
        flat = x.abs().float().transpose(0, axis).reshape(x.shape[axis], -1)
        channels = flat.shape[0]
        x_max = flat.amax(1)
        if self.hist is None:
            self.bins = torch.full((channels,), self.num_bins, device=flat.device)
            self.edges = x_max[:, None] * torch.linspace(0, 1, self.num_bins + 1, dtype=torch.float32, device=flat.device)
            self.edges[:, -1] = x_max
        elif channels != self.hist.shape[0]:
            raise ValueError(f"collect() got {channels} channels along axis {self.axis}; earlier batches had {self.hist.shape[0]}")
        else:
            top = self.edges.gather(1, self.bins[:, None])[:, 0]
            grown = x_max > top
            if grown.any():
                width = self.edges[:, 1] - self.edges[:, 0]
                width = torch.where(width > 0, width, x_max / self.num_bins)  # only zeros so far: fresh bins
                self.bins = torch.where(grown, torch.ceil(x_max / width).long(), self.bins)
                widest = int(self.bins.max().item())
                steps = torch.arange(widest + 1, device=flat.device, dtype=torch.float32)
                old = self.edges
                self.edges = width[:, None] * steps
                keep = ~grown
                self.edges[keep, : old.shape[1]] = old[keep]  # channels that did not grow keep their edges
        top = self.edges.gather(1, self.bins[:, None])[:, 0]
        hist = _histc_rows(flat, self.bins, top, self.edges.shape[1] - 1)
        if self.hist is not None:
            hist[:, : self.hist.shape[1]] += self.hist
        self.hist = hist

    # ----------------------------------------------------------------------------- amax
    def compute_amax(
        self, method: str, *, stride: int = 1, start_bin: int = 128, percentile: float = 99.99
    ) -> torch.Tensor:
        """The clipping value (a scalar tensor, or one per channel) by ``method``:
        ``"entropy"``, ``"mse"``, ``"percentile"`` (or ``"max"``: the largest value seen)."""
        check_choice("method", method, (*METHODS, "max"))
        check_number("stride", stride, low=1, integer=True)
        check_number("start_bin", start_bin, low=0, integer=True)
        if not (isinstance(percentile, (int, float)) and 0 < percentile <= 100):
            raise ValueError(f"percentile must be a number in (0, 100]; got {percentile!r}")
        if self.hist is None:
            raise ValueError("compute_amax(): no data collected yet (empty calibration); call collect() first")
        if self.axis is None:
            return self._amax_1d(self.hist, self.edges, method, stride, start_bin, percentile)
        hist, edges = self.hist.cpu(), self.edges.cpu()
        rows = [
            self._amax_1d(hist[c, :n], edges[c, : n + 1], method, stride, start_bin, percentile)
            for c, n in enumerate(self.bins.tolist())
        ]
        return torch.stack(rows)

    def _amax_1d(
        self, hist: torch.Tensor, edges: torch.Tensor, method: str, stride: int, start_bin: int, percentile: float
    ) -> torch.Tensor:
        counts = hist.detach().cpu().to(torch.int64).numpy()  # the reference works on integer counts
        edges = edges.detach().cpu().numpy()
        if method == "max":
            nonzero = np.flatnonzero(counts)
            return torch.tensor(edges[nonzero[-1] + 1] if nonzero.size else 0.0, dtype=torch.float32)
        if method == "percentile":
            return torch.tensor(amax_percentile(counts, edges, percentile), dtype=torch.float32)
        if method == "mse":
            return torch.tensor(amax_mse(counts, edges, self.num_bits, self.unsigned, stride, start_bin), dtype=torch.float32)
        return torch.tensor(amax_entropy(counts, edges, self.num_bits, self.unsigned, stride, start_bin), dtype=torch.float32)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_bits={self.num_bits}, axis={self.axis}, unsigned={self.unsigned}, "
            f"num_bins={self.num_bins}, skip_zeros={self.skip_zeros}, torch_hist={self.torch_hist})"
        )


def _histc_rows(flat: torch.Tensor, bins: torch.Tensor, top: torch.Tensor, width: int) -> torch.Tensor:
    """``torch.histc(row, bins[c], 0, top[c])`` for every row at once: one ``bincount``."""
    channels = flat.shape[0]
    scaled = flat * bins[:, None].to(flat.dtype) / top[:, None].clamp(min=torch.finfo(flat.dtype).tiny)
    index = scaled.long()  # truncation, as histc
    index = torch.minimum(index, (bins - 1)[:, None])  # the maximum itself goes into the last bin
    inside = flat <= top[:, None]
    index = index + (torch.arange(channels, device=flat.device) * width)[:, None]
    counts = torch.bincount(index[inside], minlength=channels * width)
    return counts.reshape(channels, width).float()


# ------------------------------------------------------------------------------------------- searches
def amax_percentile(counts: np.ndarray, edges: np.ndarray, percentile: float) -> float:
    """The edge where the cumulative share of counts first reaches ``percentile`` %."""
    cdf = np.cumsum(counts / counts.sum())
    index = min(int(np.searchsorted(cdf, percentile / 100)), counts.size)
    return float(edges[index])


def _chunks(candidates: np.ndarray, bins: int) -> Iterable[np.ndarray]:
    size = max(1, _CHUNK_ELEMENTS // max(bins, 1))
    for start in range(0, candidates.size, size):
        yield candidates[start : start + size]


def amax_mse(counts: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool, stride: int = 1, start_bin: int = 128) -> float:
    """The bin centre that, used as ``amax``, minimises ``Σ counts·(q(centre) - centre)²`` (first minimum).

    Same float32 arithmetic as the reference's ``fake_tensor_quant`` on the centres, for all
    candidates at once."""
    edges_t = torch.from_numpy(np.asarray(edges)).float()  # the reference: float32 edges and centres
    centers = (edges_t[1:] + edges_t[:-1]) / 2
    weights = torch.from_numpy(counts).float()
    candidates = np.arange(start_bin, centers.numel(), stride)
    if candidates.size == 0:
        raise ValueError(f"start_bin={start_bin} leaves no candidate in a histogram of {centers.numel()} bins")
    max_bound = 2.0 ** (num_bits - 1 + int(unsigned)) - 1.0
    min_bound = 0.0 if unsigned else -max_bound
    errors = []
    for chunk in _chunks(candidates, centers.numel()):
        amax = centers[torch.from_numpy(chunk)][:, None]
        scale = torch.where(amax <= 1.0 / (1 << 24), torch.ones_like(amax), max_bound / amax)
        quantized = torch.clamp((centers * scale).round_(), min_bound, max_bound) / scale
        errors.append(((quantized - centers) ** 2 * weights).mean(1))
    best = int(torch.argmin(torch.cat(errors)))  # first minimum, as np.argmin
    return float(centers[candidates[best]])


def amax_entropy(counts: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool, stride: int = 1, start_bin: int = 128) -> float:
    """The edge minimising KL(P‖Q) (last minimum) over candidates ``i``: P is the first ``i`` bins with
    the tail mass added to the last one, Q those bins merged into ``L = 2^(b-1+unsigned)`` groups,
    each group's mass spread evenly over its non-empty bins.

    The reference builds P and Q bin by bin for every candidate. Here the divergence of a candidate
    is assembled from prefix sums per group instead: with ``p_j = b_j / T`` and ``q_j = G_g / (n_g S)``
    on the non-empty bins of group ``g`` (``G_g`` its mass, ``n_g`` its non-empty bins, ``S`` the mass
    of the ``i`` kept bins), ``Σ p log p`` comes from a prefix sum of ``b log b`` and ``Σ p log q``
    from one term per group: O(L) per candidate instead of O(i), all candidates at once.
    """
    bins = torch.from_numpy(counts.astype(np.float64))
    if bins.numel() > 1:
        bins[0] = bins[1]  # the reference ignores the zero bin's spike
    levels = 1 << (num_bits - 1 + int(unsigned))
    candidates = np.arange(start_bin, bins.numel() + 1, stride)
    candidates = candidates[candidates > 0]
    if candidates.size == 0:
        raise ValueError(f"start_bin={start_bin} leaves no candidate in a histogram of {bins.numel()} bins")
    f64 = torch.float64
    zero = torch.zeros(1, dtype=f64)
    mass_before = torch.cat([zero, torch.cumsum(bins, 0)])  # Σ b[:j]
    nonzero_before = torch.cat([zero, torch.cumsum((bins > 0).to(f64), 0)])
    entropy_before = torch.cat([zero, torch.cumsum(torch.where(bins > 0, bins * torch.log(bins.clamp(min=1)), 0.0), 0)])
    total = mass_before[-1]
    kept = torch.from_numpy(candidates)  # i
    # group g holds the bins j with floor(j L / i) = g, i.e. j in [ceil(g i / L), ceil((g + 1) i / L))
    starts = (torch.arange(levels + 1)[None, :] * kept[:, None] + levels - 1) // levels  # (K, L + 1)
    group_mass = mass_before[starts[:, 1:]] - mass_before[starts[:, :-1]]
    group_nonzero = nonzero_before[starts[:, 1:]] - nonzero_before[starts[:, :-1]]
    kept_mass = mass_before[kept]
    log_q = torch.log(group_mass / group_nonzero.clamp(min=1)) - torch.log(kept_mass)[:, None]
    log_q = torch.where(group_nonzero > 0, log_q, 0.0)
    last = kept - 1
    last_bin, tail = bins[last], total - kept_mass
    last_group = (last * levels) // kept
    # bins before the last one: p_j = b_j / T
    mass_without_last = group_mass.scatter_add(1, last_group[:, None], -last_bin[:, None])
    divergence = (entropy_before[last] - torch.log(total) * mass_before[last] - (mass_without_last * log_q).sum(1)) / total
    # the last kept bin carries the tail: p = (b + tail) / T; q = 0 there if the bin itself is empty
    p_last = (last_bin + tail) / total
    log_q_last = log_q.gather(1, last_group[:, None])[:, 0]
    last_term = torch.where(p_last > 0, p_last * (torch.log(p_last.clamp(min=1e-300)) - log_q_last), 0.0)
    last_term = torch.where((last_bin == 0) & (tail > 0), float("inf"), last_term)
    divergence = (divergence + last_term).numpy()
    last_best = divergence.size - 1 - int(np.argmin(divergence[::-1]))
    return float(edges[candidates[last_best]])
