"""A ``torch.compile``d LightningModule trains with every training callback as it does eagerly.

``backend="aot_eager"`` (torch.compile's tracing and autograd graphs without inductor's code
generation): the same ops as eager, so losses, weights and quantizer state must match exactly, and
the test needs no C++ compiler."""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, TensorDataset

from qat_lightning import DiffQ, DiffQuantizer, EMAFakeQuant
from qat_lightning.demo import MLP

from .helpers import tiny_trainer


class Plain(pl.LightningModule):
    """No ``self.log`` inside the compiled ``training_step``: with Lightning 2.6 and torch 2.13 dynamo
    cannot trace Lightning's own signature check in ``log`` (an upstream limitation)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = MLP(in_features=32, hidden=(64,), num_classes=8)
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_train_batch_end(self, outputs: dict, batch: object, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(96, 32, generator=g), torch.randint(0, 8, (96,), generator=g)), batch_size=16)


CALLBACKS: dict[str, Callable[[], list[pl.Callback]]] = {
    "diffq": lambda: [DiffQ(min_size=0, penalty=1.0, seed=0)],
    "diffq_channel_learned_ranges": lambda: [DiffQ(min_size=0, penalty=1.0, seed=0, scale="channel", range_search=4,
                                                   straight_through_fraction=0.5, learn_ranges=True)],
    "ema_w8a8": lambda: [EMAFakeQuant()],
    "lsq_w4a8": lambda: [EMAFakeQuant(learned_step=True, weight_bits=4)],
    **{spec: (lambda spec=spec: [EMAFakeQuant(weight_format=spec, activations=False)])
       for spec in ("int4_g32", "fp8_e4m3", "mxfp4", "nvfp4", "distiller8_asymmetric_unsigned")},
    "int8_per_token_int4_g32": lambda: [EMAFakeQuant(weight_format="int4_g32", activation_format="int8_per_token",
                                                     activation_position="inputs")],
}  # fmt: skip


def _fit(callbacks: list[pl.Callback], compiled: bool) -> tuple[Plain, int]:
    module = Plain()
    model = torch.compile(module, backend="aot_eager") if compiled else module
    counters.clear()
    trainer = tiny_trainer(max_steps=6, limit_val_batches=1, val_check_interval=3, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, _loader(), _loader())
    return module, sum(counters["graph_break"].values())


@functools.cache
def _float_breaks() -> int:
    return _fit([], compiled=True)[1]


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_a_compiled_module_trains_as_the_eager_one(name: str) -> None:
    eager, _ = _fit(CALLBACKS[name](), compiled=False)
    compiled, breaks = _fit(CALLBACKS[name](), compiled=True)
    assert len(compiled.losses) == 6
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-6, abs=0)
    state, reference = compiled.state_dict(), eager.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.allclose(state[key].float(), value.float(), rtol=1e-5, atol=1e-7), key
    assert breaks == _float_breaks()  # the quantized path traces whole: no break the float model has not


def test_code_compiled_before_the_hooks_is_not_reused() -> None:
    """Dynamo does not guard on module hooks: without a fresh compile, a second fit of the same class
    in one process reused the float graph of the first and trained unquantized, silently."""
    _fit([], compiled=True)  # a float fit of the same class first
    compiled, _ = _fit([EMAFakeQuant(weight_format="int4_g32", activations=False)], compiled=True)
    eager, _ = _fit([EMAFakeQuant(weight_format="int4_g32", activations=False)], compiled=False)
    float_run, _ = _fit([], compiled=False)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-6, abs=0)
    assert compiled.losses[1:] != pytest.approx(float_run.losses[1:], rel=1e-4, abs=0)


def test_diffq_under_compile_without_the_drawn_noise_says_what_to_do() -> None:
    torch.manual_seed(0)
    net = MLP(in_features=32, hidden=(64,), num_classes=8)
    DiffQuantizer(net, min_size=0)
    compiled = torch.compile(net, backend="aot_eager")
    with pytest.raises(Exception, match="prepare_compiled_step"):
        compiled(torch.randn(4, 32))
