"""Bit-packed quantized checkpoints: exact round trips, size, safety."""
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from qat_lightning import DiffQuantizer
from qat_lightning.core.packing import load_quantized, pack_uint, quantize_state_dict, read_quantized, save_quantized, unpack_uint
from qat_lightning.models import MLP


@pytest.mark.parametrize("width", range(1, 16))
def test_pack_unpack_every_width(width: int) -> None:
    values = torch.randint(0, 2**width, (1001,))
    values[:2] = torch.tensor([0, 2**width - 1])
    packed = pack_uint(values, width)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * width / 8)
    assert torch.equal(unpack_uint(packed, width, 1001), values)


def _set_widths(quantizer: DiffQuantizer, widths: list[int]) -> None:
    """Force the rounded bits of the groups, cycling through ``widths``."""
    with torch.no_grad():
        for qp in quantizer.quantized_params():
            target = torch.tensor(widths, dtype=torch.float32).repeat(qp.logit.numel() // len(widths) + 1)[: qp.logit.numel()]
            t = ((target - quantizer.min_bits) / (quantizer.max_bits - quantizer.min_bits)).clamp(1e-6, 1 - 1e-6)
            qp.logit.copy_(torch.log(t / (1 - t)))


@pytest.mark.parametrize("group_size", [0, 1, 8])
def test_round_trip_is_bit_exact_for_every_width(group_size: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 64))
    quantizer = DiffQuantizer(model, group_size=group_size, min_size=0, min_bits=0.6, max_bits=15, init_bits=8)
    _set_widths(quantizer, list(range(1, 16)))
    widths = {int(b) for qp in quantizer.quantized_params() for b in quantizer._true_bits(qp)}
    assert widths == (set(range(1, 16)) if group_size != 0 else {1})  # group_size 0: one group per tensor
    save_quantized(quantizer, tmp_path / "m.safetensors")
    plain = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 64))
    load_quantized(tmp_path / "m.safetensors", plain)
    for qp in quantizer.quantized_params():
        assert torch.equal(plain.state_dict()[qp.name], quantizer.quantized_weight(qp)), qp.name
    if group_size == 0:  # and a whole tensor at 15 bits (the reference drops 15-bit groups)
        _set_widths(quantizer, [15])
        save_quantized(quantizer, tmp_path / "m15.safetensors")
        load_quantized(tmp_path / "m15.safetensors", plain)
        for qp in quantizer.quantized_params():
            assert torch.equal(plain.state_dict()[qp.name], quantizer.quantized_weight(qp))


def test_tied_parameters_and_fp16_leftovers(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(100, 32)
            self.mid = nn.Linear(32, 32)
            self.out = nn.Linear(32, 100, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.out(self.mid(self.embed(tokens)))

    torch.manual_seed(0)
    model = Tied()
    quantizer = DiffQuantizer(model, min_size=0.002, float16=True, group_size=8)
    assert any(k.half for k in quantizer._kept)
    size = save_quantized(quantizer, tmp_path / "t.safetensors")
    layout = json.loads(_header(tmp_path / "t.safetensors")["__metadata__"]["layout"])
    assert layout["embed.weight"]["aliases"] == ["out.weight"] and "out.weight" not in layout
    plain = Tied()
    plain.out.weight = nn.Parameter(plain.out.weight.detach().clone())  # untied: both names must be filled
    load_quantized(tmp_path / "t.safetensors", plain)
    expected = quantize_state_dict(quantizer)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert plain.mid.bias.dtype == torch.float32 and torch.equal(plain.mid.bias, model.mid.bias.detach().half().float())
    assert size < 4 * sum(p.numel() for p in model.parameters())


def test_file_size_close_to_the_true_model_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()  # the demo model, default DiffQ settings
    quantizer = DiffQuantizer(model)
    with torch.no_grad():
        for qp in quantizer.quantized_params():
            qp.logit.uniform_(-2, 2)  # mixed widths, as after training
    size = save_quantized(quantizer, tmp_path / "mlp.safetensors")
    exact = quantizer.true_model_size() * 2**20
    assert abs(size - exact) / exact < 0.03, (size, exact)


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length])


def _saved(tmp_path: Path) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    quantizer = DiffQuantizer(model, min_size=0)
    path = tmp_path / "m.safetensors"
    save_quantized(quantizer, path)
    return path, model


def test_tampered_truncated_and_wrong_files_are_refused(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(raw[:-3]) + bytes([raw[-3] ^ 0xFF]) + bytes(raw[-2:]))
    with pytest.raises(ValueError, match="do not match the checksum"):
        read_quantized(flipped)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(ValueError, match="not a readable qat_lightning packed file"):
        read_quantized(truncated)
    header = _header(path)
    header["__metadata__"]["version"] = "99"
    text = json.dumps(header).encode()
    (length,) = struct.unpack("<Q", raw[:8])
    newer = tmp_path / "newer.safetensors"
    newer.write_bytes(struct.pack("<Q", len(text)) + text + bytes(raw[8 + length :]))
    with pytest.raises(ValueError, match="format version '99'"):
        read_quantized(newer)
    pickle_file = tmp_path / "model.pt"
    torch.save({"a": torch.ones(2)}, pickle_file)
    with pytest.raises(ValueError, match="not a readable qat_lightning packed file"):
        read_quantized(pickle_file)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_quantized(path, nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8)))
    with pytest.raises(ValueError, match="needs an nn.Module or a DiffQuantizer"):
        save_quantized("model", tmp_path / "x.safetensors")


def test_plain_model_saves_as_float(tmp_path: Path) -> None:
    model = MLP(8, (4,), 2)
    save_quantized(model, tmp_path / "f.safetensors")
    other = MLP(8, (4,), 2)
    load_quantized(tmp_path / "f.safetensors", other)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


# ----------------------------------------------------------------------------- Lightning, CLI
def test_callback_export_and_cli_from_a_checkpoint(tmp_path: Path) -> None:
    import subprocess
    import sys

    from lightning.pytorch.callbacks import ModelCheckpoint

    from qat_lightning import DiffQ

    from .helpers import tiny_loader, tiny_model, tiny_trainer

    diffq = DiffQ(min_size=0, group_size=4, export_path="packed.safetensors")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[diffq, ckpt])
    model = tiny_model()
    trainer.fit(model, tiny_loader())
    assert diffq.exported == tmp_path / "packed.safetensors" and diffq.exported.exists()
    expected = quantize_state_dict(diffq.quantizer)
    plain = tiny_model()
    load_quantized(diffq.exported, plain)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, expected[key]), key
    raw = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # no pickled code needed
    assert any(k.endswith("_diffq") for k in raw["state_dict"])
    out = tmp_path / "from_ckpt.safetensors"
    result = subprocess.run([sys.executable, "-m", "qat_lightning.export", str(tmp_path / "ckpt" / "last.ckpt"), str(out)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "quantized tensors" in result.stdout
    again = tiny_model()
    load_quantized(out, again)
    for key, value in again.state_dict().items():
        assert torch.equal(value, expected[key]), key
    bad = subprocess.run([sys.executable, "-m", "qat_lightning.export", str(out), str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_checkpoints_with_every_callback_load_with_weights_only(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from qat_lightning import DiffQ, EMAFakeQuant, HistogramCalibration, Rescaling

    from .helpers import tiny_loader, tiny_model, tiny_trainer

    callbacks = [DiffQ(min_size=0, group_size=4), EMAFakeQuant(weights=False, learned_step=True), Rescaling(num_batches=1),
                 HistogramCalibration(num_batches=1, num_bins=64, start_bin=8), ModelCheckpoint(dirpath=tmp_path, save_last=True)]  # fmt: skip
    tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=callbacks).fit(tiny_model(), tiny_loader())
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert {"DiffQ", "EMAFakeQuant", "Rescaling", "HistogramCalibration"} <= set(checkpoint["callbacks"])
