"""``python -m qat_lightning.app.docs > docs/options.md``: the option tables of the DiffQ and
EMAFakeQuant callbacks, generated from their declarations (``tests/test_options.py`` checks that
the committed file is what this prints)."""
from __future__ import annotations

import inspect

from .._options import declared
from ..callbacks import diffq, ema_fake_quant
from ..quantizers.diffq import DiffQConfig
from ..quantizers.fake_quantizer import FakeQuantConfig


def _table(callback: type, config: type, callback_options: dict[str, str]) -> list[str]:
    signature = inspect.signature(callback.__init__).parameters
    docs = {**callback_options, **{name: f.metadata["doc"] for name, f in declared(config).items()}}
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for name, parameter in signature.items():
        if name == "self":
            continue
        rows.append(f"| `{name}` | `{parameter.default!r}` | {docs[name]} |")
    return rows


def options_markdown() -> str:
    lines = [
        "# Options",
        "",
        "Generated from the declarations (`DiffQConfig`, `FakeQuantConfig` and the callbacks' own options) by",
        "`python -m qat_lightning.app.docs > docs/options.md`; the test suite checks it is current. Every option",
        "is validated when the callback is constructed: a bad value raises `ValueError` naming it and what is",
        "allowed. The Hydra configs `qat_lightning/app/conf/callbacks/*.yaml` list the same options.",
        "",
        "## `DiffQ`",
        "",
        *_table(diffq.DiffQ, DiffQConfig, diffq.CALLBACK_OPTIONS),
        "",
        "## `EMAFakeQuant`",
        "",
        *_table(ema_fake_quant.EMAFakeQuant, FakeQuantConfig, ema_fake_quant.CALLBACK_OPTIONS),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(options_markdown(), end="")
