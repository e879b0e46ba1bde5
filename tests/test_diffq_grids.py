"""DiffQ on per-channel and per-group grids: a [min, max] per output channel or per block of a row,
stored in fp16 / bf16 / fp32, with the learned bits per group as on the reference grid."""
import copy
import math
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from qat_lightning import DiffQuantizer
from qat_lightning.export.packing import load_quantized, quantize_state_dict, read_quantized, save_quantized
from qat_lightning.formats.uniform import grid_dequantize, grid_quantize, range_block
from qat_lightning.quantizers.noise import inject_noise

from .helpers import noise_source, set_widths

MB = 8 * 2**20


def test_channel_grid_by_hand() -> None:
    """Two rows, each with its own [min, max], 2 bits (levels 0..3) in row 0 and 1 bit in row 1."""
    p = torch.tensor([[0.0, 0.9, 2.1, 3.0], [-1.0, -0.4, 0.2, 1.0]])
    levels, mn, mx = grid_quantize(p, torch.tensor([2.0, 1.0]), group_size=4, block=4, scale_dtype=torch.float32)
    assert torch.equal(mn, torch.tensor([0.0, -1.0])) and torch.equal(mx, torch.tensor([3.0, 1.0]))
    # row 0: step 1 -> 0, 0.9 -> 1, 2.1 -> 2, 3; row 1: step 2 -> -1 -> 0, -0.4 (0.3 of a step) -> 0, 0.2 (0.6) -> 1, 1
    assert levels.tolist() == [[0, 1, 2, 3], [0, 0, 1, 1]]
    back = grid_dequantize(levels, mn, mx, torch.tensor([2.0, 1.0]), block=4).view(2, 4)
    assert torch.equal(back, torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, -1.0, 1.0, 1.0]]))


def test_group_grid_with_bit_groups_coarser_than_ranges() -> None:
    """Ranges per 2 entries, one width (3 bits) for all 8: each pair spans its own 7 steps."""
    p = torch.tensor([0.0, 7.0, 10.0, 17.0, -7.0, 0.0, 1.0, 1.0])
    levels, mn, mx = grid_quantize(p, torch.tensor([3.0]), group_size=8, block=2, scale_dtype=torch.float32)
    assert mn.tolist() == [0.0, 10.0, -7.0, 1.0] and mx.tolist() == [7.0, 17.0, 0.0, 1.0]
    assert levels.tolist() == [[0, 7, 0, 7, 0, 7, 0, 0]]  # a constant block: level 0, no division by zero
    assert torch.equal(grid_dequantize(levels, mn, mx, torch.tensor([3.0]), block=2), p)


def test_reference_grid_is_the_reference_arithmetic() -> None:
    """One range per tensor without a scale dtype: exactly the reference order of operations."""
    torch.manual_seed(0)
    p = torch.randn(16, 8)
    bits = torch.tensor([3.0, 5.0]).repeat(8)
    levels, mn, mx = grid_quantize(p, bits, 8, p.numel())
    unit = 1 / (2 ** bits[:, None] - 1)
    expected = ((p.reshape(16, 8) - p.min()) / (p.max() - p.min()) / unit).round()
    assert torch.equal(levels, expected.to(torch.int16))
    assert torch.equal(grid_dequantize(levels, mn, mx, bits, p.numel()), (expected * unit * (p.max() - p.min()) + p.min()).reshape(-1))


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("group_size, block", [(8, 32), (32, 8), (4, 4), (64, 128)])
def test_round_trip_and_half_a_step(scale_dtype: torch.dtype, group_size: int, block: int) -> None:
    """The stored ranges hold their blocks (rounded outwards to the scale dtype); every entry lies
    within half a step of its cell's grid over that range, and the dequantized values stay inside it."""
    torch.manual_seed(1)
    p = torch.randn(16, 128) * torch.logspace(-2, 1, 16)[:, None]  # rows of very different ranges
    p[0, :4] = torch.tensor([1.001, 1.002, 1.0025, 1.003])  # a narrow block: nearest bf16 would be [1.0, 1.0]
    bits = torch.randint(2, 9, (p.numel() // group_size,)).float()
    levels, mn, mx = grid_quantize(p, bits, group_size, block, scale_dtype)
    assert torch.equal(mn, mn.to(scale_dtype).float()) and torch.equal(mx, mx.to(scale_dtype).float())  # stored exactly
    blocks = p.reshape(-1, block)
    assert (mn <= blocks.amin(1)).all() and (mx >= blocks.amax(1)).all()
    if scale_dtype != torch.float32:  # outward by less than one ulp of the scale dtype
        assert (mn.to(scale_dtype).nextafter(torch.tensor(math.inf, dtype=scale_dtype)).float() > blocks.amin(1)).all()
    back = grid_dequantize(levels, mn, mx, bits, block)
    inside = back.reshape(-1, block)
    # min + level * (unit * span): four roundings of at most an ulp of the span each, one of the sum
    ulps = 8 * torch.finfo(torch.float32).eps * torch.maximum(mn.abs(), mx.abs())[:, None]
    assert (inside >= mn[:, None]).all() and (inside <= mx[:, None] + ulps).all()
    entry_bits = bits.repeat_interleave(group_size)
    step = ((mx - mn).repeat_interleave(block) / (2**entry_bits - 1)).double()
    error = (back.double() - p.reshape(-1).double()).abs()
    assert (error <= step / 2 * (1 + 1e-5) + 1e-7).all(), (error / step).max().item()


def test_per_channel_grid_beats_per_tensor_on_outlier_rows() -> None:
    torch.manual_seed(0)
    p = torch.randn(64, 64)
    p[3] *= 50  # one outlier channel
    bits = torch.full((p.numel() // 8,), 4.0)
    err = {}
    for name, block, dtype in [("tensor", p.numel(), None), ("channel", 64, torch.float16)]:
        levels, mn, mx = grid_quantize(p, bits, 8, block, dtype)
        err[name] = (grid_dequantize(levels, mn, mx, bits, block).view_as(p) - p).pow(2).mean().item()
    assert err["channel"] < err["tensor"] / 20, err


def test_range_block_per_grid() -> None:
    assert range_block((64, 32), "tensor", 16) == (2048, "")
    assert range_block((64, 32), "channel", 16) == (32, "")
    assert range_block((8, 4, 3, 3), "channel", 16) == (36, "")  # a conv filter per output channel
    assert range_block((64, 32), "group", 16) == (16, "")
    assert range_block((64, 48), "group", 32) == (48, "one range per channel (group 32 does not divide rows of 48)")
    assert range_block((100,), "channel", 16) == (100, "one range (1-D)")


# ----------------------------------------------------------------------------------- quantizer
def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))


def test_eval_weights_are_the_grid_quantization() -> None:
    model = _model()
    q = DiffQuantizer(model, min_size=0, group_size=8, scale="group", scale_group_size=32, scale_dtype="bfloat16",
                      exclude=["*.bias"], init_bits=4)  # fmt: skip
    set_widths(q, [3, 4, 5])
    for qp in q.quantized_params():
        assert qp.range_block == 32 and qp.scale_dtype == torch.bfloat16
        w = qp.param.detach()
        bits = q.true_bits(qp)
        rows = w.reshape(-1, 32)
        mn, mx = rows.amin(1), rows.amax(1)
        down, up = mn.bfloat16().float(), mx.bfloat16().float()  # nearest, then one bf16 step outwards where it fell inside
        down = torch.where(down > mn, (down.bfloat16().view(torch.int16) + torch.where(down > 0, -1, 1).short()).view(torch.bfloat16).float(), down)
        up = torch.where(up < mx, (up.bfloat16().view(torch.int16) + torch.where(up > 0, 1, -1).short()).view(torch.bfloat16).float(), up)
        assert (down < mn).any() and (up > mx).any() and (down <= mn).all() and (up >= mx).all()
        mn, mx = down.repeat_interleave(4), up.repeat_interleave(4)  # 4 bit groups of 8 per range of 32
        top = 2**bits - 1
        levels = ((w.reshape(-1, 8) - mn[:, None]) / (mx - mn)[:, None] * top[:, None]).round().clamp(min=0)
        levels = torch.minimum(levels, top[:, None])
        expected = (levels * (1 / top * (mx - mn))[:, None] + mn[:, None]).view_as(w)
        assert torch.equal(q.quantized_weight(qp), expected), qp.name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale, group_size", [("channel", 8), ("channel", 0), ("group", 16), ("tensor", 8)])
def test_noise_and_gradients_equal_autograd_of_the_formula(dtype: torch.dtype, scale: str, group_size: int) -> None:
    """The noisy weight is ``p + unit(bits[group]) * span[block] / 2 * randn``; the fused op's
    gradients (weights and logits, penalty off) equal autograd through that formula written out.
    ``group_size=0`` with channel ranges: one logit whose cells are the rows (both backward paths:
    float32 recovers the noise, bfloat16 keeps it)."""
    model = _model().to(dtype)
    twin = copy.deepcopy(model)  # the same weights, bits and noise below, in plain autograd
    q = DiffQuantizer(model, min_size=0, group_size=group_size, scale=scale, scale_group_size=16, init_bits=4, exclude=["*.bias"])
    q.seed_noise(3)
    with torch.no_grad():
        for qp in q.quantized_params():
            qp.logit.uniform_(-1, 1)
    x = torch.randn(5, 64).to(dtype)
    model.train()
    model(x).float().square().sum().backward()
    ours = [qp.logit.grad.clone() for qp in q.quantized_params()]
    ours_w = [qp.param.grad.clone() for qp in q.quantized_params()]

    q2 = DiffQuantizer(twin, min_size=0, group_size=group_size, scale=scale, scale_group_size=16, init_bits=4, exclude=["*.bias"])
    q2.enabled = False
    generator = torch.Generator().manual_seed(3)
    noisy = {}
    for qp, mine in zip(q2.quantized_params(), q.quantized_params()):
        logit = mine.logit.detach().clone().requires_grad_(True)
        bits = 2 + 13 * torch.sigmoid(logit)
        unit = 1 / (2**bits - 1)
        w = qp.param.detach().float().clone().requires_grad_(True)
        block = qp.range_block
        span = (w.detach().reshape(-1, block).amax(1) - w.detach().reshape(-1, block).amin(1)).repeat_interleave(block)
        noise = 2 * noise_source("gaussian", "table", tuple(w.shape), generator, dtype).float()  # the CPU default
        entry_unit = unit.repeat_interleave(qp.group_size)
        noisy[qp.name] = (w, logit, (w.reshape(-1) + entry_unit * span * 0.5 * noise.reshape(-1)).view_as(w))
    for qp in q2.quantized_params():
        qp.param.data = noisy[qp.name][2].detach().to(dtype)
    out = twin(x)
    out.float().square().sum().backward()
    for (name, (w, logit, value)), mine, mine_w in zip(noisy.items(), ours, ours_w):
        g = dict(twin.named_parameters())[name].grad.float()
        value.backward(g)
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(mine_w.float(), w.grad, rtol=tolerance, atol=tolerance * w.grad.abs().max().item())
        torch.testing.assert_close(mine, logit.grad, rtol=tolerance, atol=tolerance * logit.grad.abs().max().item())


def test_inject_noise_cells_finer_than_groups() -> None:
    """Two logits, four cells each (``std`` per cell): the logit gradient sums its cells."""
    p = torch.zeros(8, 2, requires_grad=True)
    logit = torch.zeros(2, requires_grad=True)
    std = torch.arange(1.0, 9.0)
    noise = torch.ones(8, 2)
    out = inject_noise(p, logit, std, torch.tensor([1.0, 10.0]), noise.clone())
    assert torch.equal(out.detach(), std[:, None].expand(8, 2))
    out.backward(torch.ones(8, 2))
    # d out / d logit = log_slope * std * noise summed over a group's entries
    assert torch.equal(logit.grad, torch.tensor([2 * (1 + 2 + 3 + 4) * 1.0, 2 * (5 + 6 + 7 + 8) * 10.0]))
    half = inject_noise(p.detach().bfloat16().requires_grad_(True), logit, std, torch.tensor([1.0, 10.0]), noise.bfloat16())
    logit.grad = None
    half.backward(torch.ones(8, 2, dtype=torch.bfloat16))
    assert torch.equal(logit.grad, torch.tensor([20.0, 520.0]))


def test_size_counts_every_range_and_the_file_matches(tmp_path: Path) -> None:
    model = _model()
    q = DiffQuantizer(model, min_size=0, group_size=8, scale="channel", exclude=["*.bias"], init_bits=4)
    set_widths(q, [4])
    # per tensor: 4 bits x entries + ceil(log2(4 - 2 + 1)) = 2 bits per group of 8 + a fp16 min and max per row + 8
    expected = sum(4 * n + 2 * (n // 8) + rows * 32 + 8 for n, rows in [(64 * 96, 96), (96 * 32, 32)]) + 32 * (96 + 32)
    assert q.true_model_size() == expected / MB
    assert q.stored_bits() == pytest.approx((expected - 32 * (96 + 32)) / (64 * 96 + 96 * 32), rel=1e-12)
    assert q.stored_bits() == pytest.approx(4 + 2 / 8 + 32 / 64 * (96 / 96) * (64 * 96) / (64 * 96 + 96 * 32)
                                            + 32 / 96 * (96 * 32) / (64 * 96 + 96 * 32) + 16 / (64 * 96 + 96 * 32))  # fmt: skip
    path = tmp_path / "m.safetensors"
    size = save_quantized(q, path)
    header = int.from_bytes(path.read_bytes()[:8], "little")
    # the file's tensors: every level at 4 bits, no widths (one width per tensor: 0 bits each), an fp16
    # min and max per row, the fp32 biases; the widths' bits and the header byte the estimate counts are not stored
    stored = sum(n * 4 // 8 + rows * 2 * 2 + rows * 4 for n, rows in [(64 * 96, 96), (96 * 32, 32)])
    assert size - 8 - header == stored
    assert stored * 8 == expected - 2 * (64 * 96 + 96 * 32) // 8 - 2 * 8


@pytest.mark.parametrize("scale, scale_dtype, symmetric", [("channel", "float16", False), ("group", "bfloat16", False), ("group", "float32", False),
                                                            ("tensor", "float16", False), ("group", "float16", True)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_packed_round_trip_is_bit_exact(scale: str, scale_dtype: str, symmetric: bool, dtype: torch.dtype, tmp_path: Path) -> None:
    model = _model().to(dtype)
    q = DiffQuantizer(model, min_size=0, group_size=4, scale=scale, scale_group_size=16, scale_dtype=scale_dtype, min_bits=0.6,
                      symmetric_ranges=symmetric, range_search=3 if symmetric else 0)  # fmt: skip
    set_widths(q, list(range(1, 16)))
    save_quantized(q, tmp_path / "m.safetensors")
    state = read_quantized(tmp_path / "m.safetensors")
    for qp in q.quantized_params():
        assert state[qp.name].dtype == dtype and torch.equal(state[qp.name], q.quantized_weight(qp)), qp.name
    plain = _model().to(dtype)
    load_quantized(tmp_path / "m.safetensors", plain)
    expected = quantize_state_dict(q)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, expected[key]), key
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        ranges = f.get_tensor("0.weight::range")
    rows = {"channel": 96, "group": 96 * 64 // 16, "tensor": 1}[scale]
    stored = torch.float64 if scale == "tensor" and dtype == torch.float64 else (torch.float32 if scale == "tensor" else getattr(torch, scale_dtype))
    assert ranges.shape == (1 if symmetric else 2, rows) and ranges.dtype == stored


def test_version_2_files_still_load(tmp_path: Path) -> None:
    """A file of the previous format (one range per tensor, shape (2,), no range fields) reads the same."""
    import json

    from safetensors.torch import load_file, safe_open, save_file

    from qat_lightning.export import packing

    model = _model()
    q = DiffQuantizer(model, min_size=0)
    save_quantized(q, tmp_path / "v3.safetensors")
    with safe_open(str(tmp_path / "v3.safetensors"), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(str(tmp_path / "v3.safetensors"))
    layout = json.loads(header["layout"])
    for name, entry in layout.items():
        if entry["kind"] == "quantized":
            del entry["range_block"], entry["range_dtype"]
            tensors[f"{name}::range"] = tensors[f"{name}::range"].reshape(2)
    header = {**header, "version": "2", "layout": json.dumps(layout)}
    header["sha256"] = packing._digest(header, tensors)
    save_file(tensors, str(tmp_path / "v2.safetensors"), metadata=header)
    old, new = read_quantized(tmp_path / "v2.safetensors"), read_quantized(tmp_path / "v3.safetensors")
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


def test_bad_grid_options_and_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="scale must be one of 'tensor', 'channel', 'group'; got 'row'"):
        DiffQuantizer(_model(), scale="row")
    with pytest.raises(ValueError, match="scale_group_size"):
        DiffQuantizer(_model(), scale="group", scale_group_size=0)
    with pytest.raises(ValueError, match="scale_dtype must be one of 'float16', 'bfloat16', 'float32'"):
        DiffQuantizer(_model(), scale="channel", scale_dtype="int8")
    with pytest.raises(ValueError, match=r"group_size=24 and the 'channel' ranges of parameter '0.weight' .*do not nest"):
        DiffQuantizer(_model(), scale="channel", group_size=24, min_size=0, exclude=["*.bias"])  # rows of 64


def test_coverage_names_the_grid_and_where_it_fell_back() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.Linear(64, 8))
    q = DiffQuantizer(model, min_size=0, group_size=8, scale="group", scale_group_size=32, exclude=["*.bias"])
    rows = {r.name: r.format for r in q.coverage().rows}
    assert rows["0.weight"].endswith("one range per channel (group 32 does not divide rows of 48)")
    assert rows["1.weight"].endswith("a float16 range per 32 entries")
    assert q.quantized_params()[0].range_block == 48


def test_onnx_export_holds_the_grid_weights(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from qat_lightning.export.onnx import export_onnx

    model = _model()
    q = DiffQuantizer(model, min_size=0, group_size=8, scale="group", scale_group_size=16, max_bits=8, init_bits=4, exclude=["*.bias"])
    set_widths(q, [3, 4, 6])
    model.eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = model(x)
    path = export_onnx(model, x, tmp_path / "m.onnx", diffq=q, exporter="legacy")
    got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        q.enabled = False
        floating = model(x)
        q.enabled = True
    assert (torch.from_numpy(got) - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (floating - expected).abs().max() > 1e-2 * expected.abs().max()  # the file holds the quantized weights


def test_checkpoint_cli_rebuilds_the_grid(tmp_path: Path) -> None:
    from qat_lightning.export.packing import quantized_from_checkpoint

    model = _model()
    q = DiffQuantizer(model, min_size=0, group_size=8, scale="channel", scale_dtype="bfloat16", exclude=["*.bias"])
    set_widths(q, [3, 5])
    config = dict(min_size=0, group_size=8, scale="channel", scale_dtype="bfloat16", exclude=["*.bias"])
    _, quantized, _ = quantized_from_checkpoint(dict(model.state_dict()), config)
    for qp in q.quantized_params():
        assert torch.equal(quantized[qp.name].dequantize(), q.quantized_weight(qp)), qp.name


# ----------------------------------------------------------------------------------- clipping search
def test_clipping_search_by_hand() -> None:
    """One outlier in a block of four at 2 bits: the min / max range [0, 12] puts 1, 2, 3 on levels
    0 and 4 (error 1 + 4 + 1 + 0 = 6); ratio 0.5 ([3, 9]) costs 9 + 1 + 0 + 9 = 19; the search keeps the best."""
    p = torch.tensor([1.0, 2.0, 3.0, 12.0])
    bits = torch.tensor([2.0])
    levels, mn, mx = grid_quantize(p, bits, 4, 4, torch.float32, search=2)  # ratios 1, 0.75, 0.5
    back = grid_dequantize(levels, mn, mx, bits, 4)
    errors = {}
    for ratio in (1.0, 0.75, 0.5):
        lo, hi = 6.5 - ratio * 5.5, 6.5 + ratio * 5.5
        step = (hi - lo) / 3
        q = [lo + step * min(max(round((v - lo) / step), 0), 3) for v in p.tolist()]
        errors[ratio] = sum((a - b) ** 2 for a, b in zip(q, p.tolist()))
    best = min(errors, key=errors.get)
    assert (mn.item(), mx.item()) == pytest.approx((6.5 - best * 5.5, 6.5 + best * 5.5))
    assert (back - p).square().sum().item() == pytest.approx(errors[best], rel=1e-5)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=str)
def test_clipping_search_keeps_each_blocks_least_error(scale_dtype: torch.dtype) -> None:
    """Against a brute force over the same ratios, block by block; never worse than min / max."""
    from qat_lightning.formats.uniform import clip_ratios

    torch.manual_seed(0)
    p = torch.randn(32, 64)
    p[::5, 7] *= 8  # outliers in some rows
    bits = torch.randint(2, 6, (p.numel() // 16,)).float()
    levels, mn, mx = grid_quantize(p, bits, 16, 64, scale_dtype, search=8)
    plain, pmn, pmx = grid_quantize(p, bits, 16, 64, scale_dtype)
    err = (grid_dequantize(levels, mn, mx, bits, 64) - p.reshape(-1)).square().reshape(32, 64).sum(1)
    plain_err = (grid_dequantize(plain, pmn, pmx, bits, 64) - p.reshape(-1)).square().reshape(32, 64).sum(1)
    assert (err <= plain_err * (1 + 1e-6)).all() and (err < plain_err * 0.9).sum() >= 6
    brute = []
    for row in range(32):
        w, b = p[row], bits[row * 4 : row * 4 + 4]
        best = None
        for ratio in clip_ratios(8):
            lo0, hi0 = w.min(), w.max()
            c, h = (lo0 + hi0) / 2, (hi0 - lo0) / 2
            lo, hi = (c - ratio * h, c + ratio * h) if ratio < 1 else (lo0, hi0)
            lo = lo.to(scale_dtype).float() if lo.to(scale_dtype).float() <= lo else lo.to(scale_dtype).nextafter(torch.tensor(-math.inf, dtype=scale_dtype)).float()
            hi = hi.to(scale_dtype).float() if hi.to(scale_dtype).float() >= hi else hi.to(scale_dtype).nextafter(torch.tensor(math.inf, dtype=scale_dtype)).float()
            top = (2 ** b - 1).repeat_interleave(16)
            q = ((w - lo) / (hi - lo) * top).round().clamp(min=0)
            q = torch.minimum(q, top) * ((1 / top) * (hi - lo)) + lo
            e = (q - w).square().sum()
            if best is None or e < best[0]:
                best = (e, lo, hi)
        brute.append(best)
    assert torch.equal(mn, torch.stack([b[1] for b in brute])) and torch.equal(mx, torch.stack([b[2] for b in brute]))


def test_range_search_reaches_the_quantizer_the_file_and_the_coverage(tmp_path: Path) -> None:
    model = _model()
    q = DiffQuantizer(model, min_size=0, group_size=8, scale="channel", range_search=6, exclude=["*.bias"], init_bits=3)
    qp = q.quantized_params()[0]
    levels, mn, mx = grid_quantize(qp.param.detach(), q.true_bits(qp), 8, qp.range_block, torch.float16, search=6)
    assert torch.equal(q.quantized_weight(qp).reshape(-1), grid_dequantize(levels, mn, mx, q.true_bits(qp), qp.range_block))
    plain = DiffQuantizer(copy.deepcopy(_model()), min_size=0, group_size=8, scale="channel", exclude=["*.bias"], init_bits=3)
    assert not torch.equal(q.quantized_weight(qp), plain.quantized_weight(plain.quantized_params()[0]))
    save_quantized(q, tmp_path / "m.safetensors")
    state = read_quantized(tmp_path / "m.safetensors")
    assert torch.equal(state["0.weight"], q.quantized_weight(qp))
    assert "clipping searched over 7 ratios" in q.coverage().rows[0].format
    with pytest.raises(ValueError, match="range_search"):
        DiffQuantizer(_model(), range_search=65)


# ----------------------------------------------------------------------------------- straight-through phase
def test_straight_through_forward_is_the_quantized_model_and_the_bits_get_nothing() -> None:
    model = _model()
    q = DiffQuantizer(model, min_size=0, group_size=8, scale="channel", exclude=["*.bias"], init_bits=3)
    x = torch.randn(6, 64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    weights = {qp.name: q.quantized_weight(qp).clone().requires_grad_(True) for qp in q.quantized_params()}
    biases = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if n.endswith("bias")}
    q.straight_through = True
    model.train()
    out = model(x)
    assert torch.equal(out, expected)  # the forward is the true quantized model
    out.square().sum().backward()
    # plain autograd through the quantized values: the straight-through gradient is that of the quantized model
    F = torch.nn.functional
    hidden = torch.relu(F.linear(x, weights["0.weight"], biases["0.bias"]))
    F.linear(hidden, weights["2.weight"], biases["2.bias"]).square().sum().backward()
    for qp in q.quantized_params():
        torch.testing.assert_close(qp.param.grad, weights[qp.name].grad, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(logit.grad, torch.zeros_like(logit)) for logit in q.parameters())  # frozen, still in the graph


def test_every_parameter_gets_a_gradient_in_both_phases() -> None:
    """DDP's reducer expects a gradient for every parameter in every step: the learned ranges in the
    noise phase (before they start) and the frozen bits in the straight-through phase get zeros."""
    model = _model()
    q = DiffQuantizer(model, min_size=0, group_size=8, scale="channel", learn_ranges=True, exclude=["*.bias"], init_bits=4)
    x = torch.randn(4, 64)
    model.train()
    for phase in (False, True):
        q.straight_through = phase
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, (phase, missing)
        ranges = [qp.ranges.grad for qp in q.quantized_params()]
        assert all((g == 0).all() for g in ranges) != phase  # zero before the phase, learned in it
        assert all((logit.grad == 0).all() for logit in q.parameters()) == phase  # learned before, frozen in it


def test_callback_switches_to_straight_through_for_the_last_share_of_the_steps(tmp_path: Path) -> None:
    from qat_lightning import DiffQ

    from .helpers import tiny_loader, tiny_model, tiny_trainer

    seen: list[tuple[int, bool, torch.Tensor]] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            q = diffq.quantizer
            seen.append((trainer.global_step, q.straight_through, torch.cat([p.detach().clone() for p in q.parameters()])))

    diffq = DiffQ(min_size=0, group_size=4, penalty=5.0, bits_lr=0.1, straight_through_fraction=0.5)
    trainer = tiny_trainer(tmp_path, max_steps=8, callbacks=[diffq, Watch()])
    trainer.fit(tiny_model(), tiny_loader(n=128))
    phases = [s for _, s, _ in seen]
    assert phases == [False] * 4 + [True] * 4  # steps 0..3 noise, 4..7 straight-through
    logits = [b for _, _, b in seen]
    assert not torch.equal(logits[2], logits[3])  # the bits learn in the noise phase
    assert all(torch.equal(logits[3], b) for b in logits[4:])  # and stay frozen after it
    assert not diffq.quantizer.straight_through  # back to noise once fit ends
    with pytest.raises(ValueError, match="straight_through_fraction"):
        DiffQ(straight_through_fraction=1.5)


# ------------------------------------------------------------------------------ oscillation dampening
def test_rounding_offset_by_hand() -> None:
    """Block 1, range [0, 1] at 2 bits (step 1/3, t = 3 x): 0.26 -> t 0.78, 0.22 below level 1; 0.74
    -> 2.22, 0.22 above level 2; 0.5 -> 1.5, a tie, rounded to even (level 2): -0.5; the end 1.0 and
    1.2 beyond it (clipped by the grid) get none. Block 2, [-1, 1] at 1 bit (step 2, t = (x + 1) / 2):
    -0.1 -> 0.45; -1.5 beyond the range: none; 0.2 -> 0.6, 0.4 below level 1; the ends none; 0.9 ->
    0.95: -0.05."""
    from qat_lightning.formats.uniform import grid_rounding_offset, grid_rounding_pull

    p = torch.tensor([0.0, 0.26, 0.74, 0.5, 1.0, 1.2, -0.1, -1.5, 0.2, 1.0, -1.0, 0.9])
    bits = torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0, 1.0])
    offset, step = grid_rounding_offset(p, bits, 2, 6, torch.tensor([0.0, -1.0]), torch.tensor([1.0, 1.0]))
    expected = [0.0, -0.22, 0.22, -0.5, 0.0, 0.0, 0.45, 0.0, -0.4, 0.0, 0.0, -0.05]
    assert offset.tolist() == pytest.approx(expected, abs=1e-5)
    assert step.tolist() == pytest.approx([1 / 3] * 6 + [2.0] * 6)
    # the pull, offset / step: a block of no span gets none (0.4 lies beyond its one value 0.3);
    # [0, 1] at 2 bits: 0.7 -> t 2.1, 0.1 / (1/3) = 0.3; 0.1 -> t 0.3, 0.9
    pull = grid_rounding_pull(torch.tensor([0.3, 0.4, 0.7, 0.1]), torch.tensor([2.0, 2.0]), 2, 2, torch.tensor([0.3, 0.0]), torch.tensor([0.3, 1.0]))
    assert pull.tolist() == pytest.approx([0.0, 0.0, 0.3, 0.9], abs=1e-5)


def test_rounding_pull_is_the_gradient_of_the_squared_offset() -> None:
    """The quantizer's pull, against autograd through t - round(t) (an independent route): half the
    gradient of sum(offset**2) in each weight, on a channel grid with searched ranges and on learned ones."""
    from qat_lightning.formats.uniform import per_cell

    torch.manual_seed(0)
    model = _model()
    q = DiffQuantizer(model, min_size=0, group_size=8, scale="channel", range_search=4, learn_ranges=True, exclude=["*.bias"])
    with torch.no_grad():
        for logit in q.parameters():
            logit.uniform_(-2, 2)
    for started in (False, True):
        q.straight_through = started
        for qp in q.quantized_params():
            bits = q._size.true_bits_of(qp.logit.detach())
            levels, mn, mx = q.grid_levels(qp, qp.param.detach(), bits)
            w = qp.param.detach().clone().requires_grad_(True)
            rows = w.reshape(-1, 8)
            top = (2 ** bits - 1)[:, None]
            t = (rows - per_cell(mn, qp.range_block, 8)[:, None]) / per_cell(mx - mn, qp.range_block, 8)[:, None] * top
            inside = (t >= 0) & (t <= top)
            assert torch.equal(t.detach().round()[inside], levels.float()[inside])  # the grid's own rounding
            (((t - t.detach().round()) * inside.float()).square().sum() / 2).backward()
            assert torch.allclose(q.rounding_pull(qp), w.grad, rtol=1e-5, atol=1e-5), (started, qp.name)
            assert w.grad.abs().sum() > 0


def test_dampening_settles_the_weights_on_their_levels(tmp_path: Path) -> None:
    """Trained with dampening, the straight-through phase ends with the latent weights nearer their
    grid levels than without it (the same run otherwise); before the phase nothing is added, and
    the strength ramps by a cosine from 0 to its value over the phase."""
    from qat_lightning import DiffQ

    from .helpers import tiny_loader, tiny_model, tiny_trainer

    def run(dampening: float) -> tuple[DiffQ, list[torch.Tensor]]:
        pl.seed_everything(0)
        diffq = DiffQ(min_size=0, group_size=4, scale="channel", init_bits=6, straight_through_fraction=0.5, dampening=dampening, seed=1)
        trainer = tiny_trainer(tmp_path / str(dampening), max_steps=24, max_epochs=-1, callbacks=[diffq])
        model = tiny_model()
        trainer.fit(model, tiny_loader(n=128))
        q = diffq.quantizer
        q.straight_through = True
        offsets = [_offset(q, qp).abs() for qp in q.quantized_params()]
        return diffq, offsets

    plain, free = run(0.0)
    damped, pulled = run(50.0)
    ratio = torch.cat([o.reshape(-1) for o in pulled]).mean() / torch.cat([o.reshape(-1) for o in free]).mean()
    assert ratio < 0.5
    assert damped._phase_steps == (12, 24)
    assert [damped.dampening_strength(s) for s in (0, 11, 12, 23)] == [0.0, 0.0, 0.0, 50.0]
    assert damped.dampening_strength(17.5) == pytest.approx(25.0)
    assert damped.dampening_strength(13) == pytest.approx(50 * (1 - math.cos(math.pi / 11)) / 2)
    assert plain.dampening_strength(23) == 0.0


def _offset(q: DiffQuantizer, qp) -> torch.Tensor:  # noqa: ANN001
    from qat_lightning.formats.uniform import grid_rounding_offset

    bits = q._size.true_bits_of(qp.logit.detach())
    _, mn, mx = q.grid_levels(qp, qp.param.detach(), bits)
    return grid_rounding_offset(qp.param.detach(), bits, qp.group_size, qp.range_block, mn, mx)[0]


# ----------------------------------------------------------------------------------- learned ranges
def test_learned_grid_gradients_by_hand() -> None:
    """One block [0, 1] at 1 bit (levels 0, 1), q = level * span + min with the level's gradient
    straight through: x = 0.75 rounds up to 1, d q / d max = -(x - min) / span + level = 0.25,
    d q / d min = (x - min) / span - level = -0.25, d q / d x = 1; x = 0.2 rounds to 0: -0.2 and 0.2;
    x = 1.5 lies beyond the range: clipped to max, d q / d max = 1, d q / d min = 0, d q / d x = 0;
    x = 1 is the max itself: its gradient passes whole (no tie split at the end)."""
    from qat_lightning.formats.uniform import learned_grid_fake_quantize

    for x_value, expected in [(0.75, (1.0, -0.25, 0.25, 1.0)), (1.5, (1.0, 0.0, 1.0, 0.0)), (0.2, (0.0, 0.2, -0.2, 1.0)), (1.0, (1.0, 0.0, 0.0, 1.0))]:
        x = torch.tensor([x_value], requires_grad=True)
        mn, mx = torch.tensor([0.0], requires_grad=True), torch.tensor([1.0], requires_grad=True)
        q = learned_grid_fake_quantize(x, torch.tensor([1.0]), 1, 1, mn, mx)
        q.sum().backward()
        got = (q.item(), mn.grad.item(), mx.grad.item(), x.grad.item())
        assert got == pytest.approx(expected, abs=1e-6), (x_value, got)


def test_learned_grid_gradients_match_autograd() -> None:
    """The fused op's values and its gradients in the weight, the mins and the maxes equal autograd's
    through the plain formula, on blocks with clipped entries, entries on the ends, a block of zero
    span and one whose ends have crossed (an optimizer can swap them), groups of several widths."""
    from qat_lightning.formats.uniform import learned_grid_fake_quantize, plain_learned_grid_fake_quantize

    torch.manual_seed(0)
    p = torch.randn(6, 32, dtype=torch.float64)
    bits = torch.randint(1, 6, (p.numel() // 8,)).double()
    mn, mx = p.reshape(-1, 16).amin(1) * 0.8, p.reshape(-1, 16).amax(1) * 0.7
    p.view(-1)[3] = mx[0]  # an end itself
    p.view(-1)[20] = mn[1]
    mn[2] = mx[2] = 0.1  # zero span
    mn[3], mx[3] = mx[3].item(), mn[3].item()  # crossed
    grad = torch.randn_like(p)
    results = []
    for fn in (learned_grid_fake_quantize, plain_learned_grid_fake_quantize):
        x, lo, hi = (v.clone().requires_grad_(True) for v in (p, mn, mx))
        out = fn(x, bits, 8, 16, lo, hi)
        out.backward(grad)
        results.append((out.detach(), x.grad, lo.grad, hi.grad))
    for name, fused, plain in zip(("values", "x", "min", "max"), *results):
        assert torch.allclose(fused, plain, rtol=1e-12, atol=1e-12), name
    passed = results[0][1].reshape(-1, 16)[:2] == grad.reshape(-1, 16)[:2]
    assert passed.any() and (~passed).any()  # entries passed and entries clipped
    assert results[0][3][2] != 0 and results[0][3][3] != 0 and results[0][2][3] != 0  # degenerate blocks have range gradients


def test_learned_grid_forward_is_the_true_quantization() -> None:
    from qat_lightning.formats.uniform import learned_grid_fake_quantize

    torch.manual_seed(0)
    p = torch.randn(8, 64)
    bits = torch.randint(2, 7, (p.numel() // 16,)).float()
    mn, mx = p.reshape(-1, 32).amin(1) * 0.7, p.reshape(-1, 32).amax(1) * 0.8  # clipped ranges
    for dtype in (None, torch.float16):
        levels, smn, smx = grid_quantize(p, bits, 16, 32, dtype, ranges=(mn, mx))
        assert torch.equal(learned_grid_fake_quantize(p, bits, 16, 32, mn, mx, dtype).reshape(-1), grid_dequantize(levels, smn, smx, bits, 32))
        assert (levels == 0).any() and (levels.float() == (2 ** bits[:, None] - 1)).any()  # clipped entries on the ends


def test_learned_ranges_start_train_export_and_reload(tmp_path: Path) -> None:
    from qat_lightning.export.packing import quantized_from_checkpoint

    model = _model()
    options = dict(min_size=0, group_size=8, scale="channel", range_search=4, learn_ranges=True, exclude=["*.bias"], init_bits=3)
    q = DiffQuantizer(model, **options)
    names = [n for n, _ in model.named_parameters() if n.endswith("_range_diffq")]
    assert names == ["0.weight_range_diffq", "2.weight_range_diffq"]
    assert all(torch.equal(qp.ranges, torch.zeros_like(qp.ranges)) for qp in q.quantized_params())  # not started
    before = [q.quantized_weight(qp) for qp in q.quantized_params()]
    q.straight_through = True  # starts the ranges from the searched ones: the same quantized weights
    for qp, value in zip(q.quantized_params(), before):
        assert torch.isfinite(qp.ranges).all() and torch.equal(q.quantized_weight(qp), value)
    x = torch.randn(4, 64)
    model.train()
    out = model(x)
    model.eval()
    with torch.no_grad():
        assert torch.equal(out.detach(), model(x))
    out.square().sum().backward()
    assert all(qp.ranges.grad is not None and qp.ranges.grad.abs().sum() > 0 for qp in q.quantized_params())
    with torch.no_grad():
        for qp in q.quantized_params():
            qp.ranges.mul_(0.8)  # as an optimizer step would move them
    changed = [q.quantized_weight(qp) for qp in q.quantized_params()]
    assert not torch.equal(changed[0], before[0])
    save_quantized(q, tmp_path / "m.safetensors")
    state = read_quantized(tmp_path / "m.safetensors")
    _, rebuilt, _ = quantized_from_checkpoint(dict(model.state_dict()), options)
    for qp, value in zip(q.quantized_params(), changed):
        assert torch.equal(state[qp.name], value) and torch.equal(rebuilt[qp.name].dequantize(), value), qp.name
    assert "0.weight_range_diffq" not in state  # the ranges are stored as the file's ranges, not as tensors


def test_learned_ranges_need_the_straight_through_phase() -> None:
    from qat_lightning import DiffQ

    with pytest.raises(ValueError, match="learn_ranges=True .* set straight_through_fraction > 0"):
        DiffQ(learn_ranges=True)


def test_callback_trains_the_ranges_only_in_the_straight_through_phase(tmp_path: Path) -> None:
    """Before the phase the ranges' zero gradients are dropped (no optimizer step, no Adam state);
    in it they start from the searched ranges and learn: Adam counts only those steps."""
    from qat_lightning import DiffQ

    from .helpers import tiny_loader, tiny_model, tiny_trainer

    seen: list[torch.Tensor] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            seen.append(torch.cat([qp.ranges.detach().reshape(-1).clone() for qp in diffq.quantizer.quantized_params()]))

    diffq = DiffQ(min_size=0, group_size=4, scale="channel", learn_ranges=True, range_lr=1e-2, straight_through_fraction=0.5)
    trainer = tiny_trainer(tmp_path, max_steps=8, callbacks=[diffq, Watch()])
    trainer.fit(tiny_model(), tiny_loader(n=128))
    assert all(not r.any() for r in seen[:4]) and all(r.any() for r in seen[4:])
    assert not torch.equal(seen[4], seen[7])  # learned
    optimizer = trainer.optimizers[0]
    for qp in diffq.quantizer.quantized_params():
        assert int(optimizer.state[qp.ranges]["step"]) == 4  # the straight-through steps only


def test_learned_ranges_follow_a_loaded_state() -> None:
    """Whether the ranges are started is a host flag (no device read per step), read again after
    every load_state_dict: a state from before the phase (zeros) un-starts them, one from inside it
    starts them in a fresh quantizer."""
    options = dict(min_size=0, group_size=8, scale="channel", learn_ranges=True, exclude=["*.bias"])
    model = _model()
    q = DiffQuantizer(model, **options)
    before = copy.deepcopy(model.state_dict())
    q.straight_through = True
    inside = copy.deepcopy(model.state_dict())
    assert all(q.learned_ranges(qp) is not None for qp in q.quantized_params())
    model.load_state_dict(before)
    assert all(q.learned_ranges(qp) is None for qp in q.quantized_params())
    fresh = _model()
    q2 = DiffQuantizer(fresh, **options)
    fresh.load_state_dict(inside)
    for qp, theirs in zip(q2.quantized_params(), q.quantized_params()):
        assert torch.equal(q2.learned_ranges(qp), inside[theirs.name.replace("weight", "weight_range_diffq")])


def test_coverage_says_when_the_rows_are_not_output_channels() -> None:
    """A transposed convolution (like GPT-2's Conv1D) stores its output channels on axis 1: the
    per-row ranges are reported as rows of the stored weight, not as output channels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose1d(8, 16, 8), nn.Linear(16, 8))
    q = DiffQuantizer(model, min_size=0, group_size=8, scale="channel", exclude=["*.bias"])
    rows = {r.name: r.format for r in q.coverage().rows}
    assert rows["0.weight"].endswith("a float16 range per row of the stored weight (its output channels lie on another axis)")
    assert rows["1.weight"].endswith("a float16 range per channel")


# -------------------------------------------------------------------------------- symmetric ranges
def test_symmetric_grid_by_hand() -> None:
    """Row 0: largest magnitude 3 -> [-3, 3] at 2 bits (step 2): 0.3 -> 1.65 -> 2, 0.9 -> 1.95 -> 2,
    2.1 -> 2.55 -> 3, 3 -> 3; row 1: m = 1 (the -1) -> [-1, 1] at 1 bit (step 2): -1 -> 0, -0.4 -> 0.3
    -> 0, 0.2 -> 0.6 -> 1, 0.5 -> 0.75 -> 1."""
    p = torch.tensor([[0.3, 0.9, 2.1, 3.0], [-1.0, -0.4, 0.2, 0.5]])
    bits = torch.tensor([2.0, 1.0])
    levels, mn, mx = grid_quantize(p, bits, group_size=4, block=4, scale_dtype=torch.float32, symmetric=True)
    assert mn.tolist() == [-3.0, -1.0] and mx.tolist() == [3.0, 1.0]
    assert levels.tolist() == [[2, 2, 3, 3], [0, 0, 1, 1]]
    back = grid_dequantize(levels, mn, mx, bits, block=4).view(2, 4)
    assert torch.equal(back, torch.tensor([[1.0, 1.0, 3.0, 3.0], [-1.0, -1.0, 1.0, 1.0]]))
    # fp16 storage: m rounded up (0.1 is not a float16), the ends exact negatives of each other
    _, mn, mx = grid_quantize(torch.tensor([0.1, -0.05]), torch.tensor([3.0]), 2, 2, torch.float16, symmetric=True)
    assert mx.item() > 0.1 and mx.to(torch.float16).float() == mx and torch.equal(mn, -mx)
    assert mx.item() == torch.tensor(0.1).to(torch.float16).nextafter(torch.tensor(1.0, dtype=torch.float16)).item()


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32], ids=str)
def test_symmetric_clipping_search_against_a_brute_force(scale_dtype: torch.dtype) -> None:
    """The search shrinks m (ranges stay [-m, m]) and keeps each block's least squared error."""
    from qat_lightning.formats.uniform import clip_ratios

    torch.manual_seed(2)
    p = torch.randn(16, 64) + 0.5  # off-centre rows: symmetric ranges waste part of the grid
    p[::3, 5] *= 10
    bits = torch.randint(2, 6, (p.numel() // 16,)).float()
    levels, mn, mx = grid_quantize(p, bits, 16, 64, scale_dtype, search=6, symmetric=True)
    assert torch.equal(mn, -mx)
    for row in range(16):
        w, top = p[row], (2 ** bits[row * 4 : row * 4 + 4] - 1).repeat_interleave(16)
        best = None
        for ratio in clip_ratios(6):
            m = w.abs().max() * ratio
            m = m.to(scale_dtype).float() if m.to(scale_dtype).float() >= m else m.to(scale_dtype).nextafter(torch.tensor(math.inf, dtype=scale_dtype)).float()
            q = torch.minimum(((w + m) / (2 * m) * top).round().clamp(min=0), top) * ((1 / top) * (2 * m)) - m
            e = (q - w).square().sum()
            if best is None or e < best[0]:
                best = (e, m)
        assert mx[row] == best[1], row
    m, peak = grid_quantize(p, bits, 16, 64, scale_dtype, symmetric=True)[2], p.abs().amax(1)  # no search: the smallest m >= peak
    below = m.to(scale_dtype).nextafter(torch.zeros_like(m, dtype=scale_dtype)).float()
    assert torch.equal(m.to(scale_dtype).float(), m) and (m >= peak).all() and (below < peak).all()


def _symmetric(model: nn.Module, **options) -> DiffQuantizer:
    return DiffQuantizer(model, min_size=0, group_size=8, scale="channel", symmetric_ranges=True, exclude=["*.bias"], init_bits=4, **options)


def test_symmetric_size_counts_one_value_per_range_and_the_file_matches(tmp_path: Path) -> None:
    from safetensors import safe_open

    q = _symmetric(_model())
    set_widths(q, [4])
    # per tensor: 4 bits x entries + 2 bits per group of 8 + one fp16 m per row + 8
    expected = sum(4 * n + 2 * (n // 8) + rows * 16 + 8 for n, rows in [(64 * 96, 96), (96 * 32, 32)]) + 32 * (96 + 32)
    assert q.true_model_size() == expected / MB
    asymmetric = DiffQuantizer(_model(), min_size=0, group_size=8, scale="channel", exclude=["*.bias"], init_bits=4)
    set_widths(asymmetric, [4])
    assert asymmetric.stored_bits() - q.stored_bits() == pytest.approx(16 * (96 + 32) / (64 * 96 + 96 * 32), rel=1e-12)
    path = tmp_path / "m.safetensors"
    size = save_quantized(q, path)
    header = int.from_bytes(path.read_bytes()[:8], "little")
    stored = sum(n * 4 // 8 + rows * 2 + rows * 4 for n, rows in [(64 * 96, 96), (96 * 32, 32)])  # levels, one fp16 m per row, fp32 biases
    assert size - 8 - header == stored
    with safe_open(str(path), framework="pt") as f:
        ranges = f.get_tensor("0.weight::range")
    qp = q.quantized_params()[0]
    _, mn, mx = q.grid_levels(qp, qp.param.detach(), q.true_bits(qp))
    assert ranges.shape == (1, 96) and ranges.dtype == torch.float16 and torch.equal(ranges[0].float(), mx) and torch.equal(mn, -mx)


def test_symmetric_file_with_a_negative_m_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from .test_packing import _resigned

    save_quantized(_symmetric(_model()), tmp_path / "m.safetensors")
    assert load_file(str(tmp_path / "m.safetensors"))["0.weight::range"].shape == (1, 96)

    def negative(tensors: dict) -> None:
        tensors["0.weight::range"] = -tensors["0.weight::range"]

    bad = _resigned(tmp_path / "m.safetensors", tmp_path / "bad.safetensors", None, negative)
    with pytest.raises(ValueError, match=r"symmetric grid must hold finite m >= 0"):
        read_quantized(bad)

    def asymmetric(layout: dict) -> None:
        layout["0.weight"]["symmetric"] = False

    with pytest.raises(ValueError, match=re.escape("'symmetric' and 'shape' imply (2, 96)")):
        read_quantized(_resigned(tmp_path / "m.safetensors", tmp_path / "bad2.safetensors", asymmetric))


def test_symmetric_noise_scale_is_the_symmetric_step() -> None:
    """The training noise follows the true grid: per entry unit(bits) x 2 m x half."""
    q = _symmetric(_model())
    qp = q.quantized_params()[0]
    p = qp.param.detach()
    unit = torch.rand(p.numel() // 8) + 0.1
    std = q._noise_std(qp, p, unit, 0.5)
    m = p.abs().amax(1)
    assert torch.allclose(std.reshape(96, 8), unit.reshape(96, 8) * m[:, None], rtol=1e-6, atol=0)
    assert not torch.allclose(std.reshape(96, 8), unit.reshape(96, 8) * ((p.amax(1) - p.amin(1)) / 2)[:, None], rtol=1e-3)


def test_symmetric_learned_ranges_start_train_and_reload(tmp_path: Path) -> None:
    from qat_lightning.export.packing import quantized_from_checkpoint

    model = _model()
    options = dict(min_size=0, group_size=8, scale="channel", symmetric_ranges=True, range_search=4, learn_ranges=True,
                   exclude=["*.bias"], init_bits=3)  # fmt: skip
    q = DiffQuantizer(model, **options)
    assert [tuple(qp.ranges.shape) for qp in q.quantized_params()] == [(1, 96), (1, 32)]
    before = [q.quantized_weight(qp) for qp in q.quantized_params()]
    q.straight_through = True  # started from the searched m: the same quantized weights
    for qp, value in zip(q.quantized_params(), before):
        assert (qp.ranges > 0).all() and torch.equal(q.quantized_weight(qp), value)
    model.train()
    model(torch.randn(4, 64)).square().sum().backward()
    assert all(qp.ranges.grad is not None and qp.ranges.grad.abs().sum() > 0 for qp in q.quantized_params())
    with torch.no_grad():
        for qp in q.quantized_params():
            qp.ranges.mul_(0.8)
    changed = [q.quantized_weight(qp) for qp in q.quantized_params()]
    assert not torch.equal(changed[0], before[0])
    lv, mn, mx = q.grid_levels(q.quantized_params()[0], q.quantized_params()[0].param.detach(), q.true_bits(q.quantized_params()[0]))
    assert torch.equal(mn, -mx) and torch.equal(mx, q.quantized_params()[0].ranges[0].detach().half().float())
    save_quantized(q, tmp_path / "m.safetensors")
    state = read_quantized(tmp_path / "m.safetensors")
    _, rebuilt, _ = quantized_from_checkpoint(dict(model.state_dict()), options)
    for qp, value in zip(q.quantized_params(), changed):
        assert torch.equal(state[qp.name], value) and torch.equal(rebuilt[qp.name].dequantize(), value), qp.name


def test_symmetric_ranges_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"symmetric_ranges=True needs scale='channel' or 'group'"):
        DiffQuantizer(_model(), symmetric_ranges=True)
    with pytest.raises(ValueError, match="symmetric_ranges"):
        DiffQuantizer(_model(), scale="channel", symmetric_ranges="yes")
    rows = {r.name: r.format for r in _symmetric(_model()).coverage().rows}
    assert rows["0.weight"].endswith("a float16 symmetric range [-m, m] per channel")
