"""Bit-packed quantized checkpoints: exact round trips, size, safety."""
import json
import math
import re
import resource
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning import DiffQuantizer
from qat_lightning.export.packing import load_quantized, pack_uint, quantize_state_dict, read_quantized, save_quantized, unpack_uint
from qat_lightning.demo import MLP

from .helpers import set_widths


@pytest.mark.parametrize("width", range(1, 16))
def test_pack_unpack_every_width(width: int) -> None:
    values = torch.randint(0, 2**width, (1001,))
    values[:2] = torch.tensor([0, 2**width - 1])
    packed = pack_uint(values, width)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * width / 8)
    assert torch.equal(unpack_uint(packed, width, 1001), values)


def _mixed_model(group_size: int, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, DiffQuantizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 64)).to(dtype)
    quantizer = DiffQuantizer(model, group_size=group_size, min_size=0, min_bits=0.6, max_bits=15, init_bits=8)
    set_widths(quantizer, list(range(1, 16)))
    return model, quantizer


def _assert_within_half_a_step(loaded: torch.Tensor, float_weight: torch.Tensor, bits: torch.Tensor) -> None:
    """Each entry within half a step of its group's grid of the whole tensor's [min, max]: what
    rounding gives (flooring or an off-by-one level would be a whole step off)."""
    w = float_weight.detach().double().reshape(bits.numel(), -1)
    step = (w.max() - w.min()) / (2 ** bits.double()[:, None] - 1)
    error = (loaded.double().reshape_as(w) - w).abs()
    ulp = torch.finfo(float_weight.dtype).eps * w.abs().max()  # the final rounding into the dtype
    assert (error <= step / 2 * (1 + 1e-6) + ulp).all(), (error / step).max().item()


@pytest.mark.parametrize("group_size", [0, 1, 8])
def test_round_trip_is_bit_exact_for_every_width(group_size: int, tmp_path: Path) -> None:
    model, quantizer = _mixed_model(group_size)
    widths = {int(b) for qp in quantizer.quantized_params() for b in quantizer.true_bits(qp)}
    assert widths == (set(range(1, 16)) if group_size != 0 else {1})  # group_size 0: one group per tensor
    save_quantized(quantizer, tmp_path / "m.safetensors")
    plain = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 64))
    load_quantized(tmp_path / "m.safetensors", plain)
    for qp in quantizer.quantized_params():
        loaded = plain.state_dict()[qp.name]
        assert torch.equal(loaded, quantizer.quantized_weight(qp)), qp.name
        _assert_within_half_a_step(loaded, qp.param, quantizer.true_bits(qp))
    if group_size == 0:  # and a whole tensor at 15 bits (the reference drops 15-bit groups)
        set_widths(quantizer, [15])
        save_quantized(quantizer, tmp_path / "m15.safetensors")
        load_quantized(tmp_path / "m15.safetensors", plain)
        for qp in quantizer.quantized_params():
            assert torch.equal(plain.state_dict()[qp.name], quantizer.quantized_weight(qp))
            _assert_within_half_a_step(plain.state_dict()[qp.name], qp.param, quantizer.true_bits(qp))


@pytest.mark.parametrize("group_size", [1, 8])
def test_loaded_weights_equal_the_reference_quantizer(group_size: int, tmp_path: Path) -> None:
    """The packed file holds what ``diffq-fixed`` itself quantizes to, bit for bit, at every width."""
    diffq = pytest.importorskip("diffq")
    _, ours = _mixed_model(group_size)
    torch.manual_seed(0)
    ref_model = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 64))
    ref = diffq.DiffQuantizer(ref_model, group_size=group_size, min_size=0, min_bits=0.6, max_bits=15, init_bits=8)
    ref.no_optimizer()
    for mine, theirs in zip(ours.parameters(), [qp.logit for qp in ref._qparams]):
        theirs.data.copy_(mine.detach())
    save_quantized(ours, tmp_path / "m.safetensors")
    loaded = read_quantized(tmp_path / "m.safetensors")
    with ref.enter_quantize():
        for name, value in ref_model.state_dict().items():
            if not name.endswith("_diffq"):
                assert torch.equal(loaded[name], value), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_round_trip_is_bit_exact_in_every_float_dtype(dtype: torch.dtype, tmp_path: Path) -> None:
    """Quantization math in float32 (float64 for float64) rounded once into the dtype: the file's
    weights equal the quantizer's, lie within half a step, and equal the float32 computation."""
    model, quantizer = _mixed_model(8, dtype)
    save_quantized(quantizer, tmp_path / "m.safetensors")
    state = read_quantized(tmp_path / "m.safetensors")
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for qp in quantizer.quantized_params():
        bits = quantizer.true_bits(qp)
        assert state[qp.name].dtype == dtype and torch.equal(state[qp.name], quantizer.quantized_weight(qp)), qp.name
        _assert_within_half_a_step(state[qp.name], qp.param, bits)
        w = qp.param.detach().to(wide).reshape(bits.numel(), -1)
        mn, mx = w.min(), w.max()
        unit = 1 / (2 ** bits.to(wide)[:, None] - 1)
        expected = (((w - mn) / (mx - mn) / unit).round() * unit * (mx - mn) + mn).to(dtype).view_as(qp.param)
        assert torch.equal(state[qp.name], expected), qp.name
    assert {int(b) for qp in quantizer.quantized_params() for b in quantizer.true_bits(qp)} == set(range(1, 16))


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
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "t.safetensors"))
    assert "out.weight" not in stored and "embed.weight" not in stored  # the tied tensor once, as levels
    halves = {slot.qualified_name for k in quantizer._kept if k.half for slot in k.slots}
    assert halves and all(stored[name].dtype == torch.float16 for name in halves)
    payload = sum(t.numel() * t.element_size() for t in stored.values())
    assert size - payload < 4096  # the rest is the JSON header


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


# ----------------------------------------------------------------------------- untrusted headers
def _resigned(path: Path, out: Path, layout_edit=None, tensor_edit=None, sign: bool = True) -> Path:  # noqa: ANN001
    """A copy of a packed file with its layout and tensors edited, its checksum recomputed (as
    someone who knows the format would), so that only validation can tell."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from qat_lightning.export.packing import _digest

    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
    tensors = load_file(str(path))
    if layout_edit is not None:
        layout = json.loads(header["layout"])
        layout = layout_edit(layout) or layout
        header["layout"] = json.dumps(layout)
    if tensor_edit is not None:
        tensor_edit(tensors)
    if sign:
        header["sha256"] = _digest(header, tensors)
    save_file(tensors, str(out), metadata=header)
    return out


def _tied_file(tmp_path: Path) -> Path:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(64, 16)
            self.mid = nn.Linear(16, 16)
            self.out = nn.Linear(16, 64, bias=False)
            self.out.weight = self.embed.weight

    torch.manual_seed(0)
    quantizer = DiffQuantizer(Tied(), min_size=0, group_size=8, exclude=["*.bias"])
    path = tmp_path / "tied.safetensors"
    save_quantized(quantizer, path)
    return path


def test_the_checksum_covers_the_layout(tmp_path: Path) -> None:
    path = _tied_file(tmp_path)
    read_quantized(path)

    def swap_alias(layout: dict) -> None:
        layout["embed.weight"]["aliases"] = ["mid.weight"]

    def other_dtype(layout: dict) -> None:
        layout["mid.bias"]["dtype"] = "float64"

    for edit in (swap_alias, other_dtype):
        with pytest.raises(ValueError, match="do not match the checksum"):
            read_quantized(_resigned(path, tmp_path / "edited.safetensors", edit, sign=False))


def _set(name: str, key: str, value: object):  # noqa: ANN202
    def edit(layout: dict) -> None:
        layout[name][key] = value

    return edit


def _drop(name: str, key: str):  # noqa: ANN202
    def edit(layout: dict) -> None:
        del layout[name][key]

    return edit


def _tensor(key: str, make):  # noqa: ANN001, ANN202
    def edit(tensors: dict) -> None:
        tensors[key] = make(tensors[key])

    return edit


MALFORMED = {
    "a JSON list": (lambda layout: [layout], None, "layout must be a JSON object"),
    "negative shape": (_set("mid.weight", "shape", [-16, -16]), None, "field 'shape'"),
    "huge shape": (_set("mid.weight", "shape", [2**60, 2**60]), None, "field 'shape'"),
    "float shape": (_set("mid.weight", "shape", [16.0, 16]), None, "field 'shape'"),
    "min_bits 2**70": (_set("mid.weight", "min_bits", 2**70), None, "field 'min_bits'"),
    "min_bits 0": (_set("mid.weight", "min_bits", 0), None, "field 'min_bits'"),
    "bits_bits 9": (_set("mid.weight", "bits_bits", 9), None, "field 'bits_bits'"),
    "groups a bool": (_set("mid.weight", "groups", True), None, "field 'groups'"),
    "group_size a float": (_set("mid.weight", "group_size", 8.0), None, "field 'group_size'"),
    "groups missing": (_drop("mid.weight", "groups"), None, "field 'groups' is missing"),
    "2**28 groups": (lambda layout: layout["mid.weight"].update(groups=2**28, group_size=1, shape=[2**28]), None, "'groups'"),
    "groups x size": (_set("mid.weight", "groups", 16), None, "fields 'groups' x 'group_size'"),
    "unknown kind": (_set("mid.weight", "kind", "pickle"), None, "field 'kind'"),
    "unknown dtype": (_set("mid.weight", "dtype", "float128"), None, "field 'dtype'"),
    "integer dtype": (_set("mid.weight", "dtype", "int32"), None, "field 'dtype'"),
    "range of another dtype": (_set("mid.weight", "range_dtype", "float64"), None, "fields 'range_dtype', 'range_block'"),
    "range dtype unknown": (_set("mid.weight", "range_dtype", "int8"), None, "field 'range_dtype'"),
    "range block not dividing": (_set("mid.weight", "range_block", 7), None, "field 'range_block'"),
    "symmetric not a bool": (_set("mid.weight", "symmetric", "yes"), None, "field 'symmetric' must be true or false"),
    "symmetric with a min and a max": (_set("mid.weight", "symmetric", True), None, "imply (1, 1)"),
    "stored as int8": (_set("mid.bias", "stored", "int8"), None, "field 'stored'"),
    "tensor shape": (_set("mid.bias", "shape", [17]), None, "fields 'stored' and 'shape'"),
    "alias not a name": (_set("embed.weight", "aliases", [3]), None, "field 'aliases'"),
    "alias twice": (_set("embed.weight", "aliases", ["mid.weight"]), None, "appears twice"),
    "entry not an object": (lambda layout: layout.update({"mid.weight": 5}), None, "must be an object"),
    "float levels": (None, _tensor("mid.weight::levels", lambda t: t.float()), "'mid.weight::levels' is torch.float32"),
    "NaN range": (None, _tensor("mid.weight::range", lambda t: torch.tensor([[float("nan")], [1.0]])), "finite"),
    "Inf range": (None, _tensor("mid.weight::range", lambda t: torch.tensor([[0.0], [float("inf")]])), "finite"),
    "min above max": (None, _tensor("mid.weight::range", lambda t: t.flip(0)), "min <= max"),
    "fp64 range for fp32": (None, _tensor("mid.weight::range", lambda t: t.double()), "fields 'range_dtype', 'range_block', 'symmetric' and 'shape' imply torch.float32"),
    "range of two blocks for one": (None, _tensor("mid.weight::range", lambda t: t.repeat(1, 2)), "imply (2, 1)"),
    "levels truncated": (None, _tensor("mid.weight::levels", lambda t: t[:-1]), "bytes of levels"),
    "widths missing": (None, lambda tensors: tensors.pop("mid.weight::bits"), "'mid.weight::bits' is missing"),
    "a stray tensor": (None, lambda tensors: tensors.update(stray=torch.zeros(3)), "tensors no entry describes"),
    "widths above 15": (lambda layout: layout["mid.weight"].update(min_bits=15), None, "'min_bits'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_every_malformed_field_raises_one_value_error_naming_it(case: str, tmp_path: Path) -> None:
    layout_edit, tensor_edit, message = MALFORMED[case]
    bad = _resigned(_tied_file(tmp_path), tmp_path / "bad.safetensors", layout_edit, tensor_edit)
    with pytest.raises(ValueError, match=re.escape(message)):
        read_quantized(bad)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


FIELDS = ["kind", "shape", "dtype", "groups", "group_size", "min_bits", "bits_bits", "aliases", "stored", "symmetric"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entry=st.sampled_from(["embed.weight", "mid.weight", "mid.bias"]), key=st.sampled_from(FIELDS), value=JSON_VALUES)
def test_mutated_headers_raise_a_value_error_naming_the_field_in_bounded_memory(entry: str, key: str, value: object, tmp_path: Path) -> None:
    """Any value in any field, re-signed: either one ValueError that names the field, or a file
    that is consistent (then every tensor it yields has the shape its layout gives, finite)."""
    path = _tied_file(tmp_path)
    layout = json.loads(_header(path)["__metadata__"]["layout"])
    assume(layout[entry].get(key, None) != value)
    bad = _resigned(path, tmp_path / "bad.safetensors", _set(entry, key, value))
    before = _peak_rss_mb()
    try:
        state = read_quantized(bad)
    except ValueError as error:
        assert f"'{key}'" in str(error), str(error)
    else:
        shape = value if key == "shape" else layout[entry]["shape"]
        assert tuple(state[entry].shape) == tuple(shape) and torch.isfinite(state[entry].float()).all()
    assert _peak_rss_mb() - before < 256  # nothing a header claims is allocated before it is checked
