"""Reported sizes are the bytes a deployed model needs, counted by hand for every mode."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from qat_lightning import DiffQuantizer, EMAFakeQuantizer
from qat_lightning.export.packing import save_quantized

MB_BITS = 8 * 2**20
MODES = list(itertools.product([True, False], ["symmetric", "asymmetric_unsigned"], [False, True], [False, True]))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))  # weights 512 + 256, biases 32 + 8


@pytest.mark.parametrize(("per_channel", "weight_mode", "learned_step", "quantize_bias"), MODES)
@pytest.mark.parametrize("activation_mode", ["symmetric", "asymmetric_unsigned"])
def test_ema_size_counts_each_stored_number_once(
    per_channel: bool, weight_mode: str, learned_step: bool, quantize_bias: bool, activation_mode: str
) -> None:
    quantizer = EMAFakeQuantizer(_model(), weight_bits=4, activation_bits=6, weight_mode=weight_mode, activation_mode=activation_mode,
                                 per_channel=per_channel, learned_step=learned_step, quantize_bias=quantize_bias).prepare()  # fmt: skip
    scales = 32 + 8 if per_channel else 2  # one per output channel, or one per tensor
    zero_points = 4 if weight_mode.startswith("asymmetric") else 0
    weights = 4 * (512 + 256) + scales * (32 + zero_points)
    biases = 32 * 40 + (2 * 32 if quantize_bias else 0)  # int32 entries and a float32 scale each, or float32
    activations = 3 * (32 + (6 if activation_mode.startswith("asymmetric") else 0))  # outputs of 0, 1 and 2
    assert quantizer.model_size() * MB_BITS == weights + biases + activations


def test_ema_size_counts_tied_weights_once_and_float_leftovers_at_their_width() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.norm = nn.LayerNorm(8)
            self.out = nn.Linear(8, 50, bias=False)
            self.out.weight = self.embed.weight

    model = Tied()
    quantizer = EMAFakeQuantizer(model, weight_bits=8, activations=False).prepare()
    # one 400-entry weight at 8 bits with 50 channel scales; LayerNorm's 16 floats at 32 bits
    assert quantizer.model_size() * MB_BITS == 8 * 400 + 32 * 50 + 32 * 16
    model.half()
    assert quantizer.model_size() * MB_BITS == 8 * 400 + 32 * 50 + 16 * 16


def test_diffq_true_size_is_the_packed_payload(tmp_path: Path) -> None:
    """The file stores exactly what ``true_model_size`` counts, but for the byte padding of each
    width's bit stream and of the widths, and the reference's 8 bits per tensor (its min width is
    in the file's header): nothing else, nothing counted twice."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 16))
    quantizer = DiffQuantizer(model, min_size=0, group_size=8, exclude=["*.bias"])
    with torch.no_grad():
        for qp in quantizer.quantized_params():
            qp.logit.uniform_(-3, 3)
    save_quantized(quantizer, tmp_path / "m.safetensors")
    tensors = load_file(str(tmp_path / "m.safetensors"))
    stats = {s["name"]: s for s in quantizer.layer_stats()}
    total_bits = 0
    for qp in quantizer.quantized_params():
        bits = quantizer.true_bits(qp).to(torch.int64)
        widths = torch.bincount(bits, minlength=16)
        padding = sum(math.ceil(w * int(n) * qp.group_size / 8) * 8 - w * int(n) * qp.group_size for w, n in enumerate(widths.tolist()))
        bits_bits = math.ceil(math.log2(int(bits.max()) - int(bits.min()) + 1))
        padding += math.ceil(bits_bits * qp.num_groups / 8) * 8 - bits_bits * qp.num_groups
        stored = 8 * sum(tensors[f"{qp.name}::{part}"].numel() * tensors[f"{qp.name}::{part}"].element_size() for part in ("levels", "bits", "range"))
        counted = stats[qp.name]["size_mb"] * MB_BITS
        assert stored == counted - 8 + padding, qp.name
        total_bits += counted
    kept = sum(32 * p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    assert quantizer.true_model_size() * MB_BITS == pytest.approx(total_bits + kept, abs=1e-6)


@pytest.mark.parametrize("widest", [1, 2, 4, 8, 13])
def test_diffq_sizes_per_tensor_by_hand_for_every_width_spread(widest: int) -> None:
    """Per tensor: every group's width times its size, ``ceil(log2(1 + max - min_bits))`` bits per
    group for the widths, 64 bits for min / max and 8 more (the reference's accounting); the
    spreads make ``1 + max - min_bits`` a power of two plus one, where an off-by-one shows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 16))
    quantizer = DiffQuantizer(model, min_size=0, group_size=8, min_bits=2, max_bits=15, exclude=["*.bias"])
    with torch.no_grad():
        for qp in quantizer.quantized_params():
            t = torch.rand(qp.logit.shape) * min((widest + 0.49) / 13, 0.999)  # bits = 2 + 13 t, rounded: 2 .. 2 + widest
            t[0] = min((widest + 0.2) / 13, 0.999)
            qp.logit.copy_(torch.log(t / (1 - t)))
    stats = {s["name"]: s for s in quantizer.layer_stats()}
    total = sum(32 * p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    for qp in quantizer.quantized_params():
        bits = quantizer.true_bits(qp)
        assert int(bits.max()) == 2 + widest
        expected = int(bits.sum()) * 8 + math.ceil(math.log2(1 + widest)) * qp.num_groups + 72
        assert stats[qp.name]["size_mb"] * MB_BITS == expected, qp.name
        total += expected
    assert quantizer.true_model_size() * MB_BITS == pytest.approx(total, rel=1e-9)
