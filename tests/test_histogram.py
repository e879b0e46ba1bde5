"""Histogram calibration against the reference algorithm (loop versions in benchmarks/) and by hand."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qat_lightning.calibration.histogram import HistogramCalibrator, amax_entropy, amax_mse, amax_percentile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from calibration_search import loop_entropy, loop_mse, loop_percentile  # noqa: E402


def _histogram(seed: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.abs(np.concatenate([rng.standard_t(2 + seed, 20_000), rng.normal(0, 5, 50)]))
    if seed % 2:
        x = x[(x < 1) | (x > 1.5)]  # a gap: empty bins inside the range
    counts, edges = np.histogram(x, bins=bins, range=(0, x.max()))
    return counts, edges.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("num_bits", "unsigned", "stride", "start_bin"), [(8, False, 1, 128), (4, True, 3, 16), (6, False, 2, 40)])
def test_entropy_and_mse_equal_the_reference_loops(seed: int, num_bits: int, unsigned: bool, stride: int, start_bin: int) -> None:
    counts, edges = _histogram(seed, 256)
    args = (num_bits, unsigned, stride, start_bin)
    assert amax_entropy(counts, edges, *args) == loop_entropy(counts, edges, *args)
    assert amax_mse(counts, edges, *args) == loop_mse(counts, edges, *args)


@pytest.mark.parametrize("percentile", [50, 99, 99.99, 100])
def test_percentile_equals_the_reference(percentile: float) -> None:
    counts, edges = _histogram(0, 512)
    assert amax_percentile(counts, edges, percentile) == loop_percentile(counts, edges, percentile)


def test_searches_by_hand() -> None:
    counts, edges = np.array([1, 1, 1, 1]), np.arange(5, dtype=np.float32)
    assert amax_percentile(counts, edges, 50) == 1.0  # cdf [.25, .5, ...]: first >= .5 at index 1
    assert amax_percentile(counts, edges, 60) == 2.0
    # mse with 2 bits unsigned (levels 0..3): amax = centre 3.5 puts every centre on a level
    counts, edges = np.array([5, 0, 0, 0, 0, 0, 0, 5]), np.arange(9, dtype=np.float32)
    assert amax_mse(counts, edges, 2, True, start_bin=0) == 7.5
    # entropy: all mass in the first 4 of 8 bins; with 4 levels, keeping 4 bins is lossless (KL 0)
    counts = np.array([3, 3, 2, 2, 0, 0, 0, 0])
    divergence_free = amax_entropy(counts, edges, 2, True, start_bin=1)
    assert divergence_free == 8.0  # last minimum: all candidates >= 4 bins have KL 0


def test_unsigned_means_one_more_bit_of_levels() -> None:
    counts, edges = _histogram(2, 256)
    assert amax_entropy(counts, edges, 7, True, 1, 64) == amax_entropy(counts, edges, 8, False, 1, 64)
    assert amax_mse(counts, edges, 7, True, 1, 64) == amax_mse(counts, edges, 8, False, 1, 64)


# ----------------------------------------------------------------------------- collecting
def test_collect_matches_histc_and_grows_with_the_same_width() -> None:
    calib = HistogramCalibrator(num_bins=10)
    first = torch.linspace(-1, 1, 101)
    calib.collect(first)
    assert torch.equal(calib.hist, torch.histc(first.abs(), bins=10, min=0, max=1))
    assert torch.equal(calib.edges, torch.linspace(0, 1, 11))
    calib.collect(torch.tensor([2.05, 0.05]))
    assert calib.hist.numel() == 21  # ceil(2.05 / 0.1)
    assert torch.allclose(calib.edges[1:] - calib.edges[:-1], torch.full((21,), 0.1))
    assert calib.hist.sum() == 103 and calib.hist[-1] == 1 and calib.hist[0] == 1 + torch.histc(first.abs(), 10, 0, 1)[0]


def test_skip_zeros_and_numpy_path() -> None:
    x = torch.tensor([0.0, 0.0, 0.5, 1.0, -0.25])
    skip = HistogramCalibrator(num_bins=4, skip_zeros=True)
    skip.collect(x)
    assert skip.hist.sum() == 3
    numpy_calib = HistogramCalibrator(num_bins=4, torch_hist=False)
    numpy_calib.collect(x)
    counts, edges = np.histogram(x.abs().numpy(), bins=4, range=(0, 1))
    assert numpy_calib.hist.tolist() == counts.tolist() and numpy_calib.edges.tolist() == edges.tolist()


def test_zeros_first_then_data() -> None:
    calib = HistogramCalibrator(num_bins=4)
    calib.collect(torch.zeros(6))
    assert calib.hist.tolist() == [6, 0, 0, 0]
    calib.collect(torch.tensor([1.0, 0.3]))
    assert calib.hist.tolist() == [6, 1, 0, 1] and calib.edges[-1] == 1.0


def test_per_channel_rows_equal_per_tensor_calibrators() -> None:
    w = torch.randn(5, 300) * torch.logspace(-1, 1, 5)[:, None]
    w[3] = 0  # a dead channel
    later = torch.randn(5, 300) * torch.tensor([0.1, 30.0, 1.0, 2.0, 0.5])[:, None]
    per_channel = HistogramCalibrator(num_bins=64, axis=0)
    rows = [HistogramCalibrator(num_bins=64) for _ in range(5)]
    for batch in (w, later):
        per_channel.collect(batch)
        for c, calib in enumerate(rows):
            calib.collect(batch[c])
    for c, calib in enumerate(rows):
        n = int(per_channel.bins[c])
        assert n == calib.hist.numel()
        assert torch.equal(per_channel.hist[c, :n], calib.hist), c
        assert torch.allclose(per_channel.edges[c, : n + 1], calib.edges, rtol=1e-6, atol=0)
    for method in ("percentile", "mse", "max"):
        amax = per_channel.compute_amax(method, start_bin=8)
        expected = torch.stack([calib.compute_amax(method, start_bin=8) for calib in rows])
        assert torch.allclose(amax, expected, rtol=1e-6, atol=0), method


def test_transposed_axis_and_reset() -> None:
    calib = HistogramCalibrator(num_bins=16, axis=(1,))
    calib.collect(torch.randn(3, 4, 5))
    assert calib.hist.shape == (4, 16) and calib.compute_amax("max").shape == (4,)
    calib.reset()
    assert calib.hist is None


@pytest.mark.parametrize(
    ("kwargs", "call", "match"),
    [
        ({}, {"method": "kl"}, "method must be one of 'entropy', 'mse', 'percentile', 'max'"),
        ({}, {"method": "percentile", "percentile": 0}, r"percentile must be a number in \(0, 100\]"),
        ({}, {"method": "percentile", "percentile": 100.5}, r"percentile must be a number in \(0, 100\]"),
        ({}, {"method": "mse"}, "no data collected yet"),
    ],
)
def test_compute_amax_errors(kwargs: dict, call: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HistogramCalibrator(**kwargs).compute_amax(call.pop("method"), **call)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_bits": 1}, "num_bits must be an integer >= 2"),
        ({"axis": (0, 1)}, "axis must be None, an int or a 1-tuple"),
        ({"num_bins": 1}, "num_bins must be an integer >= 2"),
        ({"axis": 0, "torch_hist": False}, "supports only per-tensor histograms"),
        ({"unsigned": "no"}, "unsigned must be True or False"),
    ],
)
def test_constructor_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HistogramCalibrator(**kwargs)


def test_start_bin_beyond_the_histogram_is_an_error() -> None:
    calib = HistogramCalibrator(num_bins=32)
    calib.collect(torch.randn(100))
    with pytest.raises(ValueError, match="start_bin=128 leaves no candidate"):
        calib.compute_amax("mse")
