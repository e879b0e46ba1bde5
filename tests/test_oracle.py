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


# logits uniform in (low, high): the whole range of bits, or narrow ranges whose widest rounded
# width is min_bits + 1, + 2, + 4, + 8 (the per-group width term ceil(log2(1 + max - min)) of
# the size then changes with an off-by-one)
SPREADS = {"wide": None, "+1": (-8.0, -2.6), "+2": (-8.0, -1.6), "+4": (-8.0, -0.8), "+8": (-8.0, 0.45)}


def pair(config: dict, spread: tuple[float, float] | None = None):  # noqa: ANN201
    ours_model, ref_model = model(), model()
    ours = DiffQuantizer(ours_model, **config)
    ref = diffq.DiffQuantizer(ref_model, **{k: v for k, v in config.items() if k != "noise_sampler"})
    ref.no_optimizer()
    generator = torch.Generator().manual_seed(1)
    for a, b in zip(ours.parameters(), [qp.logit for qp in ref._qparams]):
        if spread is None:
            values = 2 * torch.randn(a.shape, generator=generator)  # spread the bits over the whole range
        else:
            values = torch.empty(a.shape).uniform_(*spread, generator=generator)
            values[0] = spread[1]  # the widest width is reached in every tensor
        a.data.copy_(values)
        b.data.copy_(values)
    return ours_model, ours, ref_model, ref


@pytest.mark.parametrize("spread", list(SPREADS))
def test_sizes_equal_the_reference_for_every_width_spread(spread: str) -> None:
    config = {"group_size": 8, "min_bits": 2, "max_bits": 15}
    _, ours, _, ref = pair(config, SPREADS[spread])
    widest = {int(ours.true_bits(qp).max()) - 2 for qp in ours.quantized_params()}
    assert widest == ({int(spread[1:])} if spread != "wide" else {13})
    assert_close(ours.model_size(), ref.model_size(), rtol=1e-6, atol=0)
    assert ours.true_model_size() == pytest.approx(ref.true_model_size(), rel=1e-9)


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
    """With torch's samplers (``noise_sampler="torch"``) the noise is the reference's, draw for draw."""
    ours_model, _, ref_model, _ = pair({**config, "noise_sampler": "torch"})
    x = torch.randn(5, 40)
    torch.manual_seed(5)
    ours_out = ours_model(x)
    torch.manual_seed(5)
    ref_out = ref_model(x)
    # param="noise" maps logit -> noise -> bits -> noise in the reference: a few ulps apart
    assert_close(ours_out, ref_out, rtol=1e-4, atol=1e-4 if config.get("param") == "noise" else 1e-6)
