"""DiffQ's noise samplers: the 16-bit table draws against their specification and the normal law."""
import math
from statistics import NormalDist

import pytest
import torch
from torch import nn

from qat_lightning import DiffQuantizer
from qat_lightning.quantizers.noise_draw import CHUNK, NoiseSampler, gaussian_table

from .helpers import noise_source


def test_gaussian_table_entries_are_normal_quantiles_at_unit_variance() -> None:
    table = gaussian_table()
    assert table.shape == (65536,) and table.dtype == torch.float64
    inv_cdf = NormalDist().inv_cdf
    rms = math.sqrt(math.fsum(inv_cdf((k + 0.5) / 65536) ** 2 for k in range(65536)) / 65536)
    assert 0.999 < rms < 1  # the tails past +-4.33 are cut: a little under 1, rescaled away
    for k in (0, 1, 12345, 32767, 32768, 65534, 65535):
        assert table[k].item() == pytest.approx(inv_cdf((k + 0.5) / 65536) / rms, rel=1e-12, abs=1e-15)
    assert torch.equal(table, -table.flip(0))  # antisymmetric: mean exactly 0
    assert table.square().mean().item() == pytest.approx(1.0, abs=1e-13)
    assert (table.diff() > 0).all()
    assert table[-1].item() == pytest.approx(4.3250, abs=1e-4)


@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
@pytest.mark.parametrize("n", [7, 4096, CHUNK + 5])
def test_table_draws_follow_their_specification(noise: str, n: int) -> None:
    """Word by word from the generator, across the chunk boundary and a length not a multiple of 4."""
    out = torch.empty(n)
    drawn, factor = NoiseSampler(noise, "table").draw(out, torch.Generator().manual_seed(11))
    assert drawn is out
    expected = noise_source(noise, "table", (n,), torch.Generator().manual_seed(11))
    assert torch.equal(out * factor, expected)


def test_uniform_table_draws_cover_the_reference_interval() -> None:
    out = torch.empty(2**20)
    _, factor = NoiseSampler("uniform", "table").draw(out, torch.Generator().manual_seed(0))
    assert factor == 2.0**-16
    values = out * factor
    assert values.min().item() == -0.5 and values.max().item() == 0.5 - 2**-16  # rand - 0.5 is in [-0.5, 0.5)
    assert torch.equal(out, out.round())  # whole 16-bit steps
    assert values.double().var().item() == pytest.approx(1 / 12, rel=0.01)
    assert abs(values.double().mean().item()) < 2e-3


def test_gaussian_table_draws_are_standard_normal() -> None:
    """A million draws: moments and the largest distance of their CDF from the normal's (KS)."""
    out = torch.empty(2**20)
    _, factor = NoiseSampler("gaussian", "table").draw(out, torch.Generator().manual_seed(1))
    assert factor == 0.5  # randn / 2, as torch's sampler
    x = out.double()
    assert abs(x.mean().item()) < 5e-3
    assert x.var().item() == pytest.approx(1, abs=5e-3)
    assert x.pow(4).mean().item() == pytest.approx(3, abs=0.03)  # normal kurtosis (uniform's would be 1.8)
    grid = torch.linspace(-3, 3, 61, dtype=torch.float64)
    empirical = (x[None, :] <= grid[:, None]).double().mean(1)
    normal = torch.tensor([NormalDist().cdf(g) for g in grid.tolist()], dtype=torch.float64)
    assert (empirical - normal).abs().max().item() < 2e-3
    assert x.abs().max().item() <= 4.3251
    assert x.unique().numel() > 60000  # all 16 bits reach the table


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_table_draws_in_the_weights_dtype(dtype: torch.dtype) -> None:
    out = torch.empty(1000, dtype=dtype)
    NoiseSampler("gaussian", "table").draw(out, torch.Generator().manual_seed(2))
    assert torch.equal(out, gaussian_table().to(dtype)[_words(1000, 2)])  # the table rounded once into the dtype


def _words(n: int, seed: int) -> torch.Tensor:
    words = torch.empty(-(-n // 4), dtype=torch.int64).random_(-(2**63), None, generator=torch.Generator().manual_seed(seed))
    return words.view(torch.uint16)[:n].long()


def test_auto_is_the_table_on_cpu_and_torch_is_normal() -> None:
    auto, table, plain = (NoiseSampler("gaussian", s) for s in ("auto", "table", "torch"))
    a, b, c = (torch.empty(512) for _ in range(3))
    auto.draw(a, torch.Generator().manual_seed(5))
    table.draw(b, torch.Generator().manual_seed(5))
    plain.draw(c, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(c, torch.randn(512, generator=torch.Generator().manual_seed(5)))
    assert auto.uses_table(torch.device("cpu")) and not auto.uses_table(torch.device("cuda"))
    assert not plain.uses_table(torch.device("cpu")) and table.uses_table(torch.device("cuda"))


@pytest.mark.parametrize("sampler", ["table", "torch"])
def test_quantizer_noise_is_the_samplers(sampler: str) -> None:
    """The noisy weight of a training forward is ``w + span / (2**bits - 1) * source``."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32, bias=False)
    q = DiffQuantizer(layer, min_size=0, group_size=8, noise_sampler=sampler)
    q.seed_noise(9)
    seen = []
    layer.register_forward_pre_hook(lambda m, i: seen.append(m.weight.detach().clone()))
    layer(torch.randn(2, 64))
    w = layer.weight.detach()
    unit = 1 / (2 ** q.get_bits(q.parameters()[0].detach()) - 1)
    std = ((w.max() - w.min()) * unit).repeat_interleave(8).view(32, 64)
    source = noise_source("gaussian", sampler, (32, 64), torch.Generator().manual_seed(9))
    torch.testing.assert_close(seen[0], w + std * source, rtol=0, atol=1e-7)


def test_noise_sampler_is_validated() -> None:
    with pytest.raises(ValueError, match="noise_sampler.*'auto', 'table', 'torch'"):
        DiffQuantizer(nn.Linear(64, 64), min_size=0, noise_sampler="philox")


def test_consecutive_table_draws_continue_one_stream() -> None:
    """Each draw takes exactly the words it needs: two draws of 4096 are one draw of 8192."""
    generator, sampler = torch.Generator().manual_seed(4), NoiseSampler("gaussian", "table")
    first, second = torch.empty(4096), torch.empty(4096)
    sampler.draw(first, generator)
    sampler.draw(second, generator)
    expected = noise_source("gaussian", "table", (8192,), torch.Generator().manual_seed(4)) * 2
    assert torch.equal(torch.cat([first, second]), expected)
