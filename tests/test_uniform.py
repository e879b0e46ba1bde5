import pytest
import torch
from torch.testing import assert_close

from qat_lightning.formats.uniform import uniform_dequantize, uniform_quantize


def test_hand_computed_two_bits() -> None:
    p = torch.tensor([[0.0, 0.25, 0.5, 1.0]])
    levels, mn, mx = uniform_quantize(p, torch.tensor([[2.0]]))
    # (p - 0) / 1 * 3 = [0, 0.75, 1.5, 3] -> round half to even -> [0, 1, 2, 3]
    assert levels.tolist() == [[0, 1, 2, 3]]
    assert (mn.item(), mx.item()) == (0.0, 1.0)
    assert_close(uniform_dequantize(levels, mn, mx, torch.tensor([[2.0]])), torch.tensor([[0.0, 1 / 3, 2 / 3, 1.0]]))


def test_per_group_bits_share_one_range() -> None:
    p = torch.tensor([[-1.0, 1.0], [0.1, 0.2]])
    levels, mn, mx = uniform_quantize(p, torch.tensor([[1.0], [3.0]]))
    assert (mn.item(), mx.item()) == (-1.0, 1.0)
    # group 0 over 1 bit: levels {0, 1}; group 1 over 3 bits: (0.1 + 1) / 2 * 7 = 3.85 -> 4, 4.2 -> 4
    assert levels.tolist() == [[0, 1], [4, 4]]


@pytest.mark.parametrize("bits", range(1, 16))
def test_levels_round_trip_exactly(bits: int) -> None:
    """Dequantized values quantize back to the very same levels, for every width."""
    torch.manual_seed(bits)
    p = torch.randn(64, 8)
    b = torch.full((64, 1), float(bits))
    levels, mn, mx = uniform_quantize(p, b)
    assert levels.min() >= 0 and levels.max() <= 2**bits - 1
    again, _, _ = uniform_quantize(uniform_dequantize(levels, mn, mx, b), b)
    assert torch.equal(again, levels)
    step = (mx - mn) / (2**bits - 1)
    assert (uniform_dequantize(levels, mn, mx, b) - p).abs().max() <= step / 2 * (1 + 1e-5)


def test_constant_tensor_has_no_nan() -> None:
    p = torch.full((2, 4), 0.3)
    levels, mn, mx = uniform_quantize(p, torch.full((2, 1), 4.0))
    assert torch.equal(levels, torch.zeros_like(levels))
    assert torch.equal(uniform_dequantize(levels, mn, mx, torch.full((2, 1), 4.0)), p)
