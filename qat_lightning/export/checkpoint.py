"""Export a Lightning checkpoint trained with ``DiffQ`` to a bit-packed file, without the model's code.

    python -m qat_lightning.export path/to/last.ckpt model.packed.safetensors

The checkpoint is read with ``torch.load(weights_only=True)`` (no pickled code runs); the bits come
from the ``*_diffq`` logits in its state dict and the options from the ``DiffQ`` callback's state.
Load the result with ``qat_lightning.export.packing.load_quantized(path, model)``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from .packing import quantized_from_checkpoint, write_packed


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the packed file; returns ``{"path", "bytes", "quantized", "float"}``."""
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file: one clear message
        raise ValueError(f"cannot read {checkpoint} as a Lightning checkpoint with weights_only=True: {error}") from error
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{checkpoint} has no 'state_dict': not a Lightning checkpoint")
    states = [v for k, v in ckpt.get("callbacks", {}).items() if str(k).split("{")[0] == "DiffQ" and isinstance(v, dict)]
    if not states or "config" not in states[0]:
        raise ValueError(f"{checkpoint} has no DiffQ callback state: was it trained with qat_lightning.DiffQ?")
    config = states[0]["config"]
    try:
        floats, quantized, half = quantized_from_checkpoint(ckpt["state_dict"], dict(config))
    except (TypeError, KeyError, RuntimeError) as error:  # a config or state dict this version cannot read
        raise ValueError(f"{checkpoint}: cannot rebuild the DiffQ quantization from its state ({type(error).__name__}: {error})") from error
    size = write_packed(out, floats, quantized, half, metadata={"source": Path(checkpoint).name})
    return {"path": str(out), "bytes": size, "quantized": len(quantized), "float": len(floats)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qat_lightning.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("checkpoint", help="Lightning checkpoint (.ckpt) of a run with the DiffQ callback")
    parser.add_argument("out", help="packed file to write (.safetensors)")
    args = parser.parse_args(argv)
    try:
        info = export_checkpoint(args.checkpoint, args.out)
    except (ValueError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the output cannot be written (a directory, no space, no permission)
        print(f"error: cannot write {args.out}: {error}", file=sys.stderr)
        return 2
    print(f"{info['path']}: {info['bytes']} bytes ({info['bytes'] / 2**20:.4f} MB), "
          f"{info['quantized']} quantized tensors, {info['float']} float")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
