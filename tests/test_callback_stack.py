"""The callback protocol: one place orders the stack and checks it; callbacks never import each other."""
from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from qat_lightning import AdaScale, DiffQ, EMAFakeQuant, HistogramCalibration, Rescaling
from qat_lightning.callbacks.base import QuantizationCallback, Stack

from .helpers import tiny_loader, tiny_model, tiny_trainer

ROOT = Path(__file__).resolve().parents[1]
CALLBACKS = [AdaScale, DiffQ, EMAFakeQuant, HistogramCalibration, Rescaling]


def _stack() -> list[pl.Callback]:
    return [Rescaling(num_batches=2), EMAFakeQuant(ema_decay=0.9), HistogramCalibration(method="max", num_batches=2, weights=False)]


def test_the_order_of_the_list_does_not_change_the_result() -> None:
    """Rescaling plans its input scales before the quantizers attach (they become quantization
    points) and rescales before the ranges are calibrated, whatever the list's order."""
    results = []
    for order in itertools.permutations(range(3)):
        made = _stack()
        callbacks = [made[i] for i in order]
        model = tiny_model()
        tiny_trainer(callbacks=callbacks, max_steps=3).fit(model, tiny_loader())
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    assert [k for k in results[0] if ".input_scale." in k]  # the rescaled layers' inputs are quantized too
    assert any("input_scale.output_fake_quant" in k for k in results[0])
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for key in results[0]:
            assert torch.equal(other[key], results[0][key]), key


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        (lambda: [DiffQ(min_size=0), EMAFakeQuant()], r"DiffQ and EMAFakeQuant would both quantize the weights: use EMAFakeQuant\(weights=False\)"),
        (lambda: [EMAFakeQuant(), DiffQ(min_size=0)], r"EMAFakeQuant and DiffQ would both quantize the weights"),
        (lambda: [AdaScale(), DiffQ(min_size=0)], r"DiffQ and AdaScale would both quantize the weights: AdaScale quantizes"),
        (lambda: [HistogramCalibration()], r"HistogramCalibration sets the ranges of EMAFakeQuant"),
        (lambda: [EMAFakeQuant(weight_format="int8_per_channel", activation_format="int8_per_token"), HistogramCalibration()],
         r"formats whose scales come from each tensor have no range to calibrate"),
    ],
)  # fmt: skip
def test_conflicts_and_missing_partners_are_refused_in_one_place(pair, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        tiny_trainer(callbacks=pair(), max_steps=1).fit(tiny_model(), tiny_loader())


def test_diffq_next_to_activation_only_fake_quant_is_fine() -> None:
    stack = [DiffQ(min_size=0), EMAFakeQuant(weights=False)]
    trainer = tiny_trainer(callbacks=stack, max_steps=1)
    trainer.fit(tiny_model(), tiny_loader())
    assert [type(c).__name__ for c in Stack(trainer).callbacks] == ["DiffQ", "EMAFakeQuant"]


def test_every_disabled_context_switches_quantization_off_and_restores_it() -> None:
    model = tiny_model()
    stack = [DiffQ(min_size=0, exclude=["*.bias"]), EMAFakeQuant(weights=False)]
    trainer = tiny_trainer(callbacks=stack, max_steps=2)
    trainer.fit(model, tiny_loader())
    model.eval()
    x = torch.randn(8, 16)
    with torch.no_grad():
        quantized = model(x)
        with Stack(trainer).disabled():
            plain = model(x)
        again = model(x)
    floats = tiny_model()
    floats.load_state_dict({k: v for k, v in model.state_dict().items() if "_diffq" not in k and "fake_quant" not in k}, strict=False)
    with torch.no_grad():
        assert torch.equal(plain, floats.eval()(x))  # the float model, exactly
    assert torch.equal(again, quantized) and not torch.equal(plain, quantized)


def test_no_callback_imports_another() -> None:
    modules = {p.stem for p in (ROOT / "qat_lightning" / "callbacks").glob("*.py") if not p.stem.startswith("_") and p.stem != "base"}
    for path in (ROOT / "qat_lightning" / "callbacks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and path.stem != "__init__":
                assert node.module not in modules, f"{path.name} imports .{node.module}"
    # each imports first, with no module of the package loaded before it (torch and Lightning stay
    # loaded: one interpreter, not one per module): no cycle
    script = (
        "import importlib, sys\n"
        f"for name in {sorted(modules)!r}:\n"
        "    for key in [k for k in sys.modules if k == 'qat_lightning' or k.startswith('qat_lightning.')]:\n"
        "        del sys.modules[key]\n"
        "    importlib.import_module('qat_lightning.callbacks.' + name)\n"
        "    print('imported', name)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [word for name in sorted(modules) for word in ("imported", name)]


@pytest.mark.parametrize("callback", CALLBACKS, ids=lambda c: c.__name__)
def test_every_lightning_hook_is_marked_override(callback: type) -> None:
    hooks = {name for name in vars(pl.Callback) if not name.startswith("_")}
    for klass in callback.__mro__:
        if klass in (pl.Callback, object):
            continue
        for name, value in vars(klass).items():
            if name in hooks and callable(value):
                assert getattr(value, "__override__", False), f"{klass.__name__}.{name} lacks @override"
    assert issubclass(callback, QuantizationCallback)
