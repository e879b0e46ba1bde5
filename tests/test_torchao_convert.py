"""After QAT, torchao's quantized inference: the converted model computes what the fake-quantized
model computed in eval, with torchao's quantized weight tensors."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from qat_lightning import EMAFakeQuantizer  # noqa: E402
from qat_lightning.export.inference import convert_to_torchao  # noqa: E402

FORMATS = {
    "int4_g32": dict(weight_format="int4_g32", activations=False),
    "int8_per_channel": dict(weight_format="int8_per_channel", activations=False),
    "int8_per_token_int4_g32": dict(weight_format="int4_g32", activation_format="int8_per_token", activation_position="inputs"),
}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_converted_model_computes_what_the_fake_quantized_one_did(name: str) -> None:
    model = _mlp()
    quantizer = EMAFakeQuantizer(model, **FORMATS[name])
    quantizer.prepare()
    model.eval()
    x = torch.randn(16, 64)
    with torch.no_grad():
        fake_quant = model(x)
        quantizer.set_state(enabled=False)
        float_out = model(x)
        quantizer.set_state(enabled=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = convert_to_torchao(quantizer)
    assert set(plan) == {"0", "2", "4"}
    assert all(type(layer.weight).__name__ == "IntxUnpackedToInt8Tensor" for layer in model if isinstance(layer, nn.Linear))
    assert not any(n.endswith("fake_quant") for n, _ in model.named_modules())
    with torch.no_grad():
        converted = model(x)
    assert (float_out - fake_quant).abs().max() > 1e-3  # the quantized function differs from the float one
    torch.testing.assert_close(converted, fake_quant, rtol=0, atol=1e-5)


def test_a_llama_converts_and_keeps_its_logits() -> None:
    """Hugging Face Llama (tests/real_models.py): every decoder and head Linear with int8 per-token
    inputs and int4_g32 weights; the embedding is kept float by the quantizer's exclude."""
    pytest.importorskip("transformers")
    from .real_models import build, sample

    model = build("llama").net.eval()
    quantizer = EMAFakeQuantizer(model, exclude=["*embed_tokens*"], **FORMATS["int8_per_token_int4_g32"])
    quantizer.prepare()
    tokens = sample("llama")
    with torch.no_grad():
        fake_quant = model(tokens).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = convert_to_torchao(quantizer)
    assert len(plan) == 2 * 7 + 1 and set(plan.values()) == {"Int8DynamicActivationIntxWeightConfig"}
    with torch.no_grad():
        converted = model(tokens).logits
    torch.testing.assert_close(converted, fake_quant, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("options", "model", "reason"),
    [
        (dict(), _mlp, "Distiller / LSQ grid"),
        (dict(weight_format="mxfp4", activations=False), _mlp, "torchao's integer inference"),
        (dict(weight_format="int4_g32"), _mlp, "only int8_per_token inputs"),
        (dict(weight_format="int8_per_channel", activations=False), lambda: nn.Sequential(nn.Conv1d(4, 8, 3)), "Conv1d"),
    ],
    ids=["distiller", "mxfp4", "output_activations", "conv"],
)
def test_what_torchao_cannot_run_is_refused_before_the_model_changes(options: dict, model, reason: str) -> None:  # noqa: ANN001
    net = model()
    quantizer = EMAFakeQuantizer(net, **options)
    quantizer.prepare()
    with pytest.raises(ValueError, match=reason):
        convert_to_torchao(quantizer)
    assert any(n.endswith("fake_quant") for n, _ in net.named_modules())  # untouched
