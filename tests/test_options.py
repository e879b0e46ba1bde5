"""Options declared once: the callbacks' signatures, docstrings, Hydra YAML and docs/options.md all
follow the config dataclasses (and the callbacks' own option docs)."""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import yaml

from qat_lightning import DiffQ, DiffQConfig, DiffQuantizer, EMAFakeQuant, EMAFakeQuantizer
from qat_lightning._options import declared
from qat_lightning.app.docs import options_markdown
from qat_lightning.callbacks import diffq, ema_fake_quant
from qat_lightning.quantizers.fake_quantizer import FakeQuantConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "qat_lightning" / "app" / "conf" / "callbacks"
# (callback, its config, the config options the callback does not take, its own options, its YAML, values the app changes)
SUBJECTS = {
    "DiffQ": (DiffQ, DiffQConfig, set(), diffq.CALLBACK_OPTIONS, ("diffq.yaml", "diffq"),
              {"min_bits": 3, "bits_lr": 0.01, "layer_report": "diffq_layers.png"}),  # the demo's recipe, commented in the YAML
    "EMAFakeQuant": (EMAFakeQuant, FakeQuantConfig, {"activation_types"}, ema_fake_quant.CALLBACK_OPTIONS,
                     ("ema_fake_quant.yaml", "ema_fake_quant"), {}),
}  # fmt: skip


def _normal(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("subject", list(SUBJECTS))
def test_the_signature_is_the_config_plus_the_callbacks_own_options(subject: str) -> None:
    callback, config, skipped, own, _, _ = SUBJECTS[subject]
    parameters = {k: v for k, v in inspect.signature(callback.__init__).parameters.items() if k != "self"}
    options = {k: f for k, f in declared(config).items() if k not in skipped}
    assert set(parameters) == set(options) | set(own)
    for name, field in options.items():
        assert _normal(parameters[name].default) == _normal(field.default), name
        assert field.metadata["doc"] in callback.__doc__, name  # the docstring is derived from the declaration
    for name, doc in own.items():
        assert f"{name}: {doc}" in callback.__doc__


@pytest.mark.parametrize("subject", list(SUBJECTS))
def test_the_yaml_lists_every_option_with_its_default_and_a_comment(subject: str) -> None:
    callback, _, _, _, (path, key), overrides = SUBJECTS[subject]
    text = (CONF / path).read_text()
    node = yaml.safe_load(text)[key]
    parameters = {k: v.default for k, v in inspect.signature(callback.__init__).parameters.items() if k != "self"}
    assert set(node) - {"_target_"} == set(parameters)
    for name, default in parameters.items():
        expected = overrides.get(name, _normal(default))
        assert _normal(node[name]) == expected, name
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{name}:"))
        assert "#" in line, f"{name} has no comment in {path}"


def test_docs_options_md_is_generated_from_the_declarations() -> None:
    assert (ROOT / "docs" / "options.md").read_text() == options_markdown(), "run python -m qat_lightning.app.docs > docs/options.md"


def test_the_quantizers_take_exactly_the_declared_options() -> None:
    import torch

    for quantizer, config in ((DiffQuantizer, DiffQConfig), (EMAFakeQuantizer, FakeQuantConfig)):
        with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]; the options are \["):
            quantizer(torch.nn.Linear(4, 4), colour="red")
        made = quantizer(torch.nn.Linear(64, 64), config())
        assert made.config == config()
        for name, field in declared(config).items():
            assert field.metadata["doc"] in quantizer.__doc__, name


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_dotted_name_in_the_docs_exists() -> None:
    """``qat_lightning.x.y`` in README.md and docs/*.md names a module or attribute that exists
    (the layout moved; a stale path in the docs is a newcomer's first error)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    names = {name for page in pages for name in re.findall(r"qat_lightning(?:\.[A-Za-z_][A-Za-z_0-9]*)+", page.read_text())}
    assert len(names) > 5
    assert sorted(name for name in names if not _resolves(name)) == []
