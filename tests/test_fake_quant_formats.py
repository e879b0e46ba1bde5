"""The fake-quant transform and callback with number formats: weights and activations where and as
the format says, Distiller's grids by default, DiffQ + any activation format."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning import DiffQ, EMAFakeQuant, EMAFakeQuantizer, fake_quantize
from qat_lightning.demo import MLP, Classifier
from qat_lightning.quantizers.activation import FakeLinearQuantization
from qat_lightning.quantizers.factory import FormatQuantizer

from .helpers import tiny_loader, tiny_trainer

WEIGHT_FORMATS = ["int4_g32", "int8_per_channel", "int4", "fp8_e4m3", "fp8_e5m2_per_row", "mxfp8", "mxfp6_e2m3", "mxfp4", "nvfp4",
                  "int4_asym_g32", "distiller4_symmetric_per_channel_lsq"]  # fmt: skip
ACTIVATION_FORMATS = ["int8_per_token", "int8", "fp8_e4m3_per_row", "mxfp8", "mxfp4", "nvfp4", "distiller8_asymmetric_unsigned_ema"]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))


def test_int4_weights_and_int8_token_inputs_compute_what_the_formats_say() -> None:
    """The quantized MLP's output is the float MLP run on the formats' values, computed by hand."""
    model = _mlp()
    EMAFakeQuantizer(model, weight_format="int4_g32", activation_format="int8_per_token", activation_position="inputs").prepare()
    x = torch.randn(16, 64)
    with torch.no_grad():
        hidden = F.relu(F.linear(fake_quantize(x, "int8_per_token"), fake_quantize(model[0].weight, "int4_g32"), model[0].bias))
        expected = F.linear(fake_quantize(hidden, "int8_per_token"), fake_quantize(model[2].weight, "int4_g32"), model[2].bias)
        assert torch.equal(model(x), expected)
        model.eval()
        assert torch.equal(model(x), expected)  # dynamic formats: the same in eval, nothing tracked


@pytest.mark.parametrize("spec", ACTIVATION_FORMATS)
def test_activation_formats_at_the_outputs_and_at_the_inputs(spec: str) -> None:
    for position in ("outputs", "inputs"):
        model = _mlp()
        quantizer = EMAFakeQuantizer(model, weights=False, activation_format=spec, activation_position=position).prepare()
        names = sorted(quantizer.activation_quantizers())
        assert names == (["0.output_fake_quant", "1.output_fake_quant", "2.output_fake_quant"] if position == "outputs"
                         else ["0.input_fake_quant", "2.input_fake_quant"])  # fmt: skip
        x = torch.randn(8, 64)
        for _ in range(2):
            model(x)  # tracks the EMA range where the format has one
        model.eval()
        with torch.no_grad():
            quantizer.set_state(enabled=False)
            float_out = model(x)
            quantizer.set_state(enabled=True)
            assert not torch.equal(model(x), float_out)


@pytest.mark.parametrize("spec", WEIGHT_FORMATS)
def test_every_weight_format_trains_through_the_callback_and_counts_its_size(spec: str) -> None:
    torch.manual_seed(0)
    model = Classifier(MLP(in_features=16, hidden=(64,), num_classes=8), num_classes=8)
    ema = EMAFakeQuant(weight_format=spec, activation_format="int8_per_token", activation_position="inputs")
    trainer = tiny_trainer(callbacks=[ema], max_epochs=2, limit_val_batches=1)
    trainer.fit(model, tiny_loader(), tiny_loader())
    quantizer = ema.quantizer
    weights = quantizer.weight_quantizers()
    # the 16-feature input layer cannot hold blocks of 32: left float, with the reason
    blocked = spec.startswith("mx") or "_g32" in spec  # nvfp4 blocks of 16 fit
    assert set(weights) == ({"net.2.weight"} if blocked else {"net.0.weight", "net.2.weight"})
    assert bool(quantizer.left_float) == blocked
    stored = sum(q.storage_bits(tuple(model.get_parameter(n).shape)) for n, q in weights.items() if isinstance(q, FormatQuantizer))
    float_bits = sum(32 * p.numel() for n, p in model.named_parameters() if n not in weights and "fake_quant" not in n)
    if not spec.startswith("distiller"):
        assert quantizer.model_size() * 8 * 2**20 == stored + float_bits
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_conv_and_transposed_conv_weights_are_seen_per_output_channel() -> None:
    conv, up = nn.Conv1d(16, 16, 3), nn.ConvTranspose1d(16, 8, 2)  # weights (16, 16, 3) and (16, 8, 2)
    model = nn.Sequential(conv, nn.ReLU(), up)
    quantizer = EMAFakeQuantizer(model, weight_format="int4_per_channel", activations=False).prepare()
    seen = {}
    for name, layer in (("conv", conv), ("up", up)):
        layer.register_forward_pre_hook(lambda m, i, name=name: seen.__setitem__(name, m.weight.detach()))
    model(torch.randn(2, 16, 10))
    assert torch.equal(seen["conv"], fake_quantize(conv.weight.reshape(16, -1), "int4_per_channel").reshape(16, 16, 3))
    per_out = up.weight.detach().transpose(0, 1).reshape(8, -1)  # output channels of a transposed conv are dim 1
    assert torch.equal(seen["up"], fake_quantize(per_out, "int4_per_channel").reshape(8, 16, 2).transpose(0, 1))
    assert quantizer.model_size() > 0


def test_a_named_format_and_distiller_arguments_are_not_both_taken() -> None:
    with pytest.raises(ValueError, match=r"weight_format=int4_g32 and weight_bits=4 both say how to quantize"):
        EMAFakeQuantizer(_mlp(), weight_format="int4_g32", weight_bits=4)
    with pytest.raises(ValueError, match=r"weight_format=int4_g32 and learned_step=True"):
        EMAFakeQuantizer(_mlp(), weight_format="int4_g32", activation_format="int8_per_token", learned_step=True)
    with pytest.raises(ValueError, match="an EMA-tracked range is for activations"):
        EMAFakeQuantizer(_mlp(), weight_format="distiller8_symmetric_ema")
    with pytest.raises(ValueError, match="activation_position must be one of 'outputs', 'inputs'"):
        EMAFakeQuant(activation_position="middle")
    with pytest.raises(ValueError, match="unknown number format 'int4_g33x'"):
        EMAFakeQuant(weight_format="int4_g33x")
    legacy = EMAFakeQuantizer(_mlp(), weight_bits=4, learned_step=True)
    assert (legacy.weight_format.spec, legacy.activation_format.spec) == ("distiller4_symmetric_per_channel_lsq", "distiller8_asymmetric_unsigned_lsq")


def test_diffq_weights_compose_with_any_activation_format() -> None:
    torch.manual_seed(0)
    model = Classifier(MLP(in_features=16, hidden=(64,), num_classes=8), num_classes=8)
    diffq = DiffQ(min_size=0, exclude=["*.bias"])
    ema = EMAFakeQuant(weights=False, activation_format="int8_per_token", activation_position="inputs")
    tiny_trainer(callbacks=[diffq, ema], max_epochs=1, limit_val_batches=1).fit(model, tiny_loader(), tiny_loader())
    seen = {}
    model.net[2].register_forward_pre_hook(lambda m, i: seen.update(weight=m.weight.detach(), input=i[0].detach()))
    model.eval()
    with torch.no_grad(), diffq.quantizer.quantized():
        model(torch.randn(4, 16))
        qp = next(q for q in diffq.quantizer.quantized_params() if q.name == "net.2.weight")
        assert torch.equal(seen["weight"], qp.param.detach())  # DiffQ's true quantized weight...
    assert torch.equal(seen["input"], fake_quantize(seen["input"], "int8_per_token"))  # ...and an int8 token input


def test_dynamic_formats_are_refused_by_the_onnx_export_and_need_no_calibration(tmp_path) -> None:
    pytest.importorskip("onnx")
    from qat_lightning import calibrate
    from qat_lightning.export.onnx import export_onnx

    model = _mlp()
    EMAFakeQuantizer(model, weight_format="int4_g32", activation_format="int8_per_token", activation_position="inputs").prepare()
    with pytest.raises(ValueError, match="scales computed from each tensor.*torchao"):
        export_onnx(model, torch.randn(1, 64), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="no range to calibrate"):
        calibrate(model, [torch.randn(4, 64)])
    assert not [m for m in model.modules() if isinstance(m, FakeLinearQuantization)]


def test_the_callback_logs_the_deployed_size_of_any_format(tmp_path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    model = Classifier(MLP(in_features=16, hidden=(64,), num_classes=8), num_classes=8)
    logger = CSVLogger(tmp_path, name="csv")
    ema = EMAFakeQuant(weight_format="nvfp4", activation_format="int8_per_token", activation_position="inputs")
    tiny_trainer(tmp_path, callbacks=[ema], max_epochs=1, logger=logger).fit(model, tiny_loader())
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header, row = metrics[0].split(","), metrics[-1].split(",")
    size = float(row[header.index("quant/true_model_size_mb")])
    assert size == pytest.approx(ema.quantizer.model_size(), rel=1e-6)
    bits = float(row[header.index("quant/true_avg_bits")])
    weights = [model.net[0].weight, model.net[2].weight]
    expected = sum(4 * w.numel() + 8 * w.numel() / 16 + 32 for w in weights) / sum(w.numel() for w in weights)  # nvfp4
    assert bits == pytest.approx(expected, rel=1e-6)


def test_activations_a_block_format_cannot_hold_are_left_float_and_named() -> None:
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 8))
    with pytest.warns(UserWarning, match=r"left float: \{'input of 0'.*'0.weight'"):
        quantizer = EMAFakeQuantizer(model, weight_format="mxfp4", activation_format="mxfp4", activation_position="inputs").prepare()
    assert sorted(quantizer.activation_quantizers()) == ["2.input_fake_quant"]
    assert set(quantizer.left_float) == {"0.weight", "input of 0"} and "block size 32" in quantizer.left_float["input of 0"]
    model(torch.randn(4, 40))
