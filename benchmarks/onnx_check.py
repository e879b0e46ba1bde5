"""Train with EMAFakeQuant, export to ONNX (QDQ), and compare ONNX Runtime with PyTorch on MNIST-1D.

    python benchmarks/onnx_check.py [--epochs 30] [--learned-step] [--diffq]

``--diffq``: DiffQ weights (at most 8 bits) with EMA-quantized activations, the weights stored as
uint8 levels + DequantizeLinear.
"""
from __future__ import annotations

import argparse
import logging
import warnings

import lightning.pytorch as pl
import numpy as np
import torch

from qat_lightning import DiffQ, EMAFakeQuant
from qat_lightning.export.onnx import export_onnx
from qat_lightning.demo import Classifier, MLP, MNIST1DDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--learned-step", action="store_true")
    parser.add_argument("--diffq", action="store_true", help="DiffQ weights (max_bits=8) + EMA activations")
    parser.add_argument("--out", default="ema_mlp.onnx")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import onnxruntime as ort

    pl.seed_everything(0, verbose=False)
    data = MNIST1DDataModule(num_samples=20000)
    model = Classifier(MLP())
    ema = EMAFakeQuant(weight_mode="symmetric_restricted", learned_step=args.learned_step, weights=not args.diffq)
    diffq = DiffQ(penalty=1.0, bits_lr=1e-2, min_bits=3, max_bits=8, init_bits=6) if args.diffq else None
    trainer = pl.Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[c for c in (diffq, ema) if c is not None])  # fmt: skip
    trainer.fit(model, data)
    data.setup("test")
    inputs, labels = (torch.cat(t) for t in zip(*data.test_dataloader()))
    model.eval()
    if diffq is not None:
        diffq.quantizer.quantize()  # evaluate with the true quantized weights, as validation does
    with torch.no_grad():
        reference = model(inputs)
    if diffq is not None:
        diffq.quantizer.restore()
    path = export_onnx(model, inputs[:2], args.out, diffq=diffq.quantizer if diffq else None)
    session = ort.InferenceSession(str(path))
    ours = torch.from_numpy(session.run(None, {"input": inputs.numpy()})[0])
    acc_torch = (reference.argmax(1) == labels).float().mean().item()
    acc_ort = (ours.argmax(1) == labels).float().mean().item()
    print(f"{path}: max |ORT - PyTorch| = {float(np.abs((ours - reference).numpy()).max()):.4g} "
          f"(mean {float((ours - reference).abs().mean()):.3g}, logits up to {float(reference.abs().max()):.3g}); "
          f"test accuracy PyTorch {100 * acc_torch:.2f} %, ONNX Runtime {100 * acc_ort:.2f} %")  # fmt: skip


if __name__ == "__main__":
    main()
