"""ONNX QDQ export of fake-quantized models, checked in ONNX Runtime (skipped without onnx/onnxruntime)."""
from pathlib import Path

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from qat_lightning import DiffQuantizer, EMAFakeQuantizer, calibrate  # noqa: E402
from qat_lightning.core.onnx_export import export_onnx, qdq_mode  # noqa: E402


def _prepared(**kwargs: object) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    EMAFakeQuantizer(model, **kwargs).prepare()
    x = torch.randn(256, 16)
    target = x @ torch.randn(16, 8)  # a regression task, so that nothing collapses to zero
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(20):  # ranges tracked, LSQ steps initialised and moved
        optimizer.zero_grad()
        (model(x) - target).square().mean().backward()
        optimizer.step()
    return model.eval(), x


def _run(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path))
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


@pytest.mark.parametrize("kwargs", [dict(weight_mode="symmetric_restricted"), dict(weight_mode="asymmetric_signed", activation_mode="asymmetric_signed"), dict(learned_step=True)])
def test_export_runs_in_onnx_runtime_like_pytorch(kwargs: dict, tmp_path: Path) -> None:
    model, x = _prepared(**kwargs)
    path = export_onnx(model, x[:2], tmp_path / "model.onnx")
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 5 + 3  # activations + weights
    ours = _run(path, x)
    with torch.no_grad(), qdq_mode(model):
        fused = model(x)  # the same ops as the graph
        assert model[0].output_fake_quant.forward is not None
    with torch.no_grad():
        fake_quant = model(x)  # the training-time fake quantization, in eval
    assert torch.equal(fused, fake_quant) or kwargs.get("learned_step") is None  # LSQ: the same op
    # ONNX Runtime divides by the scale where torch multiplies by its inverse: a tie may round one
    # level apart and move later layers a little; everything else is identical
    assert ((ours - fused).abs() <= 1e-6 * fused.abs().max()).float().mean() > 0.95
    assert (ours - fake_quant).abs().mean() < 0.01 * fake_quant.abs().mean()
    assert (ours.argmax(1) == fake_quant.argmax(1)).float().mean() > 0.97
    assert "forward" not in model[0].output_fake_quant.__dict__  # qdq_mode restored the modules


def test_calibrated_model_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    EMAFakeQuantizer(model, weight_mode="symmetric_restricted").prepare()
    calibrate(model, [torch.randn(64, 8)], method="max", num_bins=64, start_bin=8)
    path = export_onnx(model, torch.randn(1, 8), tmp_path / "cal.onnx", dynamic_batch=False)
    assert _run(path, torch.randn(1, 8)).shape == (1, 2)


def test_unexportable_settings_are_refused(tmp_path: Path) -> None:
    model, x = _prepared(weight_mode="symmetric")
    with pytest.raises(ValueError, match="257 levels"):
        export_onnx(model, x[:1], tmp_path / "a.onnx")
    model, x = _prepared(weight_mode="symmetric_restricted", activation_bits=4)
    with pytest.raises(ValueError, match="needs 8-bit quantizers"):
        export_onnx(model, x[:1], tmp_path / "b.onnx")
    fresh = nn.Sequential(nn.Linear(4, 4))
    EMAFakeQuantizer(fresh, weight_mode="symmetric_restricted").prepare()
    with pytest.raises(ValueError, match="has no range yet"):
        export_onnx(fresh, torch.randn(1, 4), tmp_path / "c.onnx")
    assert fresh.training  # mode restored after a failed export


def _diffq_model(max_bits: float = 8) -> tuple[nn.Module, DiffQuantizer, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    quantizer = DiffQuantizer(model, min_size=0, group_size=8, max_bits=max_bits, init_bits=min(5, max_bits - 1), exclude=["*.bias"])
    with torch.no_grad():
        for qp in quantizer.quantized_params():
            qp.logit.uniform_(-3, 3)  # mixed widths
    return model.eval(), quantizer, torch.randn(64, 16)


def test_diffq_weights_export_as_uint8_levels_with_dequantize_linear(tmp_path: Path) -> None:
    model, quantizer, x = _diffq_model()
    with torch.no_grad():
        reference = model(x)  # eval: DiffQ's true quantized weights
    path = export_onnx(model, x[:2], tmp_path / "diffq.onnx", diffq=quantizer)
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node].count("DequantizeLinear") == 2
    levels = [i for i in graph.initializer if i.name.endswith("::levels")]
    assert len(levels) == 2 and all(i.data_type == onnx.TensorProto.UINT8 for i in levels)
    assert "0.weight" not in {i.name for i in graph.initializer}  # no float copy left
    assert (_run(path, x) - reference).abs().max() < 1e-5
    assert quantizer.enabled  # restored


def test_diffq_weights_with_ema_activations(tmp_path: Path) -> None:
    model, quantizer, x = _diffq_model()
    EMAFakeQuantizer(model, weights=False).prepare()
    model.train()
    model(x)  # track the activation ranges once
    model.eval()
    with torch.no_grad():
        reference = model(x)
    path = export_onnx(model, x[:2], tmp_path / "both.onnx", diffq=quantizer)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 3 + 2
    ours = _run(path, x)
    assert (ours - reference).abs().mean() < 0.01 * reference.abs().mean()


def test_diffq_wider_than_8_bits_is_refused(tmp_path: Path) -> None:
    model, quantizer, x = _diffq_model(max_bits=12)
    with torch.no_grad():
        for qp in quantizer.quantized_params():
            qp.logit.fill_(5.0)  # about 12 bits
    with pytest.raises(ValueError, match="needs at most 8 bits per group"):
        export_onnx(model, x[:2], tmp_path / "wide.onnx", diffq=quantizer)
