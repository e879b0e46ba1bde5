"""Our DiffQuantizer against the reference implementation (PyPI ``diffq-fixed``) as a test oracle."""
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from qat_lightning import DiffQuantizer

diffq = pytest.importorskip("diffq")

CONFIGS = [
    {"group_size": 8},
    {"group_size": 1},
    {"group_size": 0},
    {"group_size": 8, "param": "noise", "float16": True},
    {"group_size": 16, "extra_bits": 1.3, "init_bits": 5},
    {"group_size": 4, "noise": "uniform", "min_bits": 3, "max_bits": 12, "exclude": ["*.bias"], "min_size": 0},
]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 16))


def pair(config: dict):  # noqa: ANN201
    ours_model, ref_model = model(), model()
    ours = DiffQuantizer(ours_model, **config)
    ref = diffq.DiffQuantizer(ref_model, **config)
    ref.no_optimizer()
    generator = torch.Generator().manual_seed(1)
    for a, b in zip(ours.parameters(), [qp.logit for qp in ref._qparams]):
        values = 2 * torch.randn(a.shape, generator=generator)  # spread the bits over the whole range
        a.data.copy_(values)
        b.data.copy_(values)
    return ours_model, ours, ref_model, ref


@pytest.mark.parametrize("config", CONFIGS)
def test_sizes_equal_the_reference(config: dict) -> None:
    _, ours, _, ref = pair(config)
    assert_close(ours.model_size(), ref.model_size(), rtol=1e-6, atol=0)
    assert ours.true_model_size() == pytest.approx(ref.true_model_size(), rel=1e-6)


@pytest.mark.parametrize("config", CONFIGS)
def test_quantized_weights_are_bit_identical(config: dict) -> None:
    ours_model, ours, ref_model, ref = pair(config)
    with ours.quantized(), ref.enter_quantize():
        for (name, a), (_, b) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
            if not name.endswith("_diffq"):
                assert torch.equal(a, b), name
    ours_model.eval(), ref_model.eval()
    x = torch.randn(5, 40)
    assert torch.equal(ours_model(x), ref_model(x))


@pytest.mark.parametrize("config", CONFIGS)
def test_training_forward_matches_with_the_same_noise(config: dict) -> None:
    ours_model, _, ref_model, _ = pair(config)
    x = torch.randn(5, 40)
    torch.manual_seed(5)
    ours_out = ours_model(x)
    torch.manual_seed(5)
    ref_out = ref_model(x)
    # param="noise" maps logit -> noise -> bits -> noise in the reference: a few ulps apart
    assert_close(ours_out, ref_out, rtol=1e-4, atol=1e-4 if config.get("param") == "noise" else 1e-6)
