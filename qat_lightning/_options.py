"""Options declared once: a config dataclass whose fields carry their default and one line of doc.

The quantizer takes ``**options`` into the config; the callback's explicit signature (LightningCLI
and jsonargparse need one), its docstring, the Hydra YAML and the option tables in ``docs/`` are
derived from the config or tested against it (``tests/test_options.py``).
"""
from __future__ import annotations

from dataclasses import MISSING, Field, field, fields
from typing import Any


def option(default: Any, doc: str) -> Any:
    """A config field with its default and its documentation."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return field(default=default, metadata={"doc": doc})


def declared(config_type: type) -> dict[str, Field]:
    """The options a config declares, in order."""
    return {f.name: f for f in fields(config_type) if "doc" in f.metadata}


def make_config(config_type: type, owner: str, options: dict[str, Any]) -> Any:
    """``config_type(**options)``, with an unknown option refused by a ``ValueError`` that lists the known ones."""
    known = declared(config_type)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{owner}: unknown option(s) {unknown}; the options are {sorted(known)}")
    return config_type(**options)


def args_doc(config_type: type, indent: str = "        ") -> str:
    """Docstring lines ``name: doc (default ...)`` for every option."""
    lines = []
    for name, f in declared(config_type).items():
        default = f.default if f.default is not MISSING else None
        lines.append(f"{indent}{name}: {f.metadata['doc']} (default ``{default!r}``)")
    return "\n".join(lines)


def markdown_rows(config_type: type, **extra: tuple[Any, str]) -> list[str]:
    """Rows ``| `name` | `default` | doc |`` of the options table (``extra``: callback-only options)."""
    rows = []
    entries = {name: (f.default, f.metadata["doc"]) for name, f in declared(config_type).items()}
    entries.update(extra)
    for name, (default, doc) in entries.items():
        rows.append(f"| `{name}` | `{default!r}` | {doc} |")
    return rows
