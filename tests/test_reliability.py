"""Reliability: unsupported setups refused with the reason, NaN/Inf never stored, property-based
round trips, awkward models and training setups."""
from __future__ import annotations

import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning import AdaScale, DiffQ, DiffQuantizer, EMAFakeQuant, HistogramCalibration, Rescaling
from qat_lightning.callbacks._param_groups import check_trainer
from qat_lightning.core.fake_quant import FakeLinearQuantization
from qat_lightning.core.packing import pack_levels, save_quantized, unpack_levels
from qat_lightning.core.uniform import uniform_dequantize, uniform_quantize

from .helpers import tiny_loader, tiny_model, tiny_trainer

ALL_CALLBACKS = [DiffQ, EMAFakeQuant, HistogramCalibration, Rescaling, AdaScale]


# ----------------------------------------------------------------------------- refused setups
@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
@pytest.mark.parametrize("callback", ALL_CALLBACKS, ids=lambda c: c.__name__)
def test_sharded_strategies_are_refused_with_the_reason(strategy: str, callback: type) -> None:
    trainer = types.SimpleNamespace(strategy=type(strategy, (), {})())
    with pytest.raises(ValueError, match=f"{callback.__name__} does not support strategy={strategy}.*strategy='ddp'"):
        check_trainer(trainer, tiny_model(), callback())


def test_compiled_module_is_refused_at_setup() -> None:
    with pytest.raises(ValueError, match="DiffQ does not support a torch.compile'd LightningModule"):
        tiny_trainer(callbacks=[DiffQ(min_size=0)], max_steps=1).fit(torch.compile(tiny_model()), tiny_loader())


# ----------------------------------------------------------------------------- NaN / Inf
def test_activation_nan_names_the_layer_and_keeps_the_range() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    from qat_lightning import EMAFakeQuantizer

    quantizer = EMAFakeQuantizer(model).prepare()
    model(torch.randn(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"activation quantizer \(output of 0\).*non-finite"):
        model(torch.full((8, 4), float("nan")))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "quant" in k or "tracked" in k)
    assert quantizer is not None


def test_device_path_skips_a_non_finite_batch() -> None:
    fq = FakeLinearQuantization(8, "asymmetric_unsigned")
    fq.update_range(torch.tensor([-1.0, 2.0]))
    biased = fq.tracked_biased.clone()
    fq._update_on_device(torch.tensor([float("nan"), 3.0]), 2)  # what CUDA runs, on CPU tensors
    assert torch.equal(fq.tracked_biased, biased) and torch.isfinite(fq.tracked).all()


def test_diffq_refuses_to_quantize_or_pack_nan_weights(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    quantizer = DiffQuantizer(model, min_size=0, exclude=["*.bias"])
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"NaN or Inf in \['2.weight'\]"):
        quantizer.quantize()
    assert not quantizer.is_quantized and torch.isinf(model[2].weight).any()  # nothing was swapped
    path = tmp_path / "m.safetensors"
    with pytest.raises(FloatingPointError, match=r"NaN or Inf in \['2.weight'\].*nothing was written"):
        save_quantized(quantizer, path)
    assert not path.exists()


def test_diffq_validation_stops_on_a_diverged_model() -> None:
    class Diverging(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            with torch.no_grad():
                pl_module.net[0].weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match="net.0.weight"):
        tiny_trainer(callbacks=[DiffQ(min_size=0, exclude=["*.bias"]), Diverging()], limit_train_batches=1, limit_val_batches=1).fit(
            tiny_model(), tiny_loader(), tiny_loader()
        )


# ----------------------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None)
@given(
    groups=st.integers(1, 12),
    group_size=st.integers(1, 9),
    bits=st.lists(st.integers(1, 15), min_size=12, max_size=12),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_quantize_dequantize_requantize_is_exact(groups: int, group_size: int, bits: list[int], scale: float, seed: int) -> None:
    """Dequantized levels quantize back to the same levels, within [0, 2**bits - 1], for any shape,
    widths and group size; the error of each weight is at most half a step."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(groups, group_size, generator=g) * scale
    b = torch.tensor(bits[:groups], dtype=torch.float32)[:, None]
    levels, mn, mx = uniform_quantize(p, b)
    assert (levels >= 0).all() and (levels <= 2**b - 1).all()
    q = uniform_dequantize(levels, mn, mx, b)
    again, mn2, mx2 = uniform_quantize(q, b) if q.numel() > 1 else (levels, mn, mx)
    step = (mx - mn) / (2**b - 1)
    assert (q - p).abs().le(step / 2 * (1 + 1e-5) + 1e-6 * scale).all()
    if torch.equal(mn2, mn) and torch.equal(mx2, mx):  # same range: the levels come back exactly
        assert torch.equal(again, levels)


@settings(max_examples=60, deadline=None)
@given(widths=st.lists(st.integers(1, 15), min_size=1, max_size=20), group_size=st.integers(1, 17), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip_over_widths_and_group_sizes(widths: list[int], group_size: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    group_bits = torch.tensor(widths, dtype=torch.int64)
    levels = torch.stack([torch.randint(0, 2**w, (group_size,), generator=g) for w in widths]).to(torch.int16)
    packed = pack_levels(levels, group_bits)
    assert packed.dtype == torch.uint8 and packed.numel() <= sum(-(-w * group_size // 8) for w in widths) + len(set(widths))
    assert torch.equal(unpack_levels(packed, group_bits, group_size).to(torch.int16), levels)


# ----------------------------------------------------------------------------- awkward models
class Awkward(pl.LightningModule):
    """Embedding, LSTM, GRU, Conv1d, Conv2d, ConvTranspose1d, BatchNorm, a bias-less layer, a frozen
    layer and a branch used only every other step."""

    def __init__(self, recurrent: bool = True) -> None:
        super().__init__()
        self.recurrent = recurrent
        self.embed = nn.Embedding(32, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.conv1 = nn.Conv1d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.up = nn.ConvTranspose1d(16, 16, 2, stride=2)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.sometimes = nn.Linear(16, 16)
        self.head = nn.Linear(16, 8, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.recurrent:
            x, _ = self.lstm(x)
            x, _ = self.gru(x)
        x = self.up(F.relu(self.bn(self.conv1(x.transpose(1, 2)))))  # (b, 16, 2t)
        x = x + self.conv2(x[:, None]).mean(1)
        x = self.frozen(x.mean(2))
        if self.training and self.global_step % 2:
            x = x + self.sometimes(x)
        return self.head(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:  # noqa: ANN001
        tokens, y = batch
        return F.cross_entropy(self(tokens), y)

    def validation_step(self, batch, batch_idx: int) -> None:  # noqa: ANN001
        tokens, y = batch
        self.log("val/loss", F.cross_entropy(self(tokens), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam((p for p in self.parameters() if p.requires_grad), lr=1e-2)


def _token_loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randint(0, 32, (32, 6), generator=g), torch.randint(0, 8, (32,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


@pytest.mark.parametrize(
    "callbacks",
    [
        lambda: [DiffQ(min_size=0, group_size=0)],
        lambda: [EMAFakeQuant()],
        lambda: [DiffQ(min_size=0, group_size=0), EMAFakeQuant(weights=False)],
        lambda: [EMAFakeQuant(learned_step=True)],
    ],
    ids=["diffq", "ema", "diffq_ema", "lsq"],
)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_awkward_model_trains_validates_and_restores(callbacks, precision: str) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = Awkward(recurrent=precision == "32-true")  # torch's CPU LSTM has no bf16 autocast kernel (oneDNN error)
    made = callbacks()
    trainer = tiny_trainer(callbacks=made, max_epochs=2, precision=precision, gradient_clip_val=1.0,
                           accumulate_grad_batches=2, limit_val_batches=1, val_check_interval=2)  # fmt: skip
    trainer.fit(model, _token_loader(), _token_loader())
    assert trainer.global_step == 4
    state = model.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    frozen_before = model.frozen.weight.detach().clone()
    trainer.validate(model, _token_loader(), verbose=False)
    after = model.state_dict()  # validation swapped quantized weights in and restored the float ones
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert torch.equal(model.frozen.weight, frozen_before)


def test_manual_optimization_with_two_optimizers_gets_the_bits_group() -> None:
    class Manual(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.body, self.head = nn.Linear(16, 32), nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(F.relu(self.body(x)))

        def training_step(self, batch, batch_idx: int) -> None:  # noqa: ANN001
            first, second = self.optimizers()
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            first.zero_grad()
            second.zero_grad()
            self.manual_backward(loss)
            first.step()
            second.step()

        def configure_optimizers(self) -> list[torch.optim.Optimizer]:
            return [torch.optim.Adam(self.body.parameters(), lr=1e-2), torch.optim.SGD(self.head.parameters(), lr=1e-2)]

    diffq = DiffQ(min_size=0, exclude=["*.bias"], penalty=1000.0, bits_lr=0.1)
    model = Manual()
    trainer = tiny_trainer(callbacks=[diffq], max_epochs=3)
    trainer.fit(model, tiny_loader())
    groups = [g for opt in trainer.optimizers for g in opt.param_groups]
    bits_groups = [g for g in groups if any(p is diffq.quantizer.parameters()[0] for p in g["params"])]
    assert len(bits_groups) == 1 and bits_groups[0]["lr"] == 0.1
    assert diffq.quantizer.average_bits(exact=True) < 8  # the penalty reached the bits
