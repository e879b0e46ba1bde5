"""The core API without Lightning: DiffQ in a plain PyTorch training loop, evaluation on the true
quantized weights, the bit-packed file written and loaded back into a fresh model.

    python examples/plain_torch.py [--epochs 10]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from qat_lightning import DiffQuantizer
from qat_lightning.export.packing import load_quantized, save_quantized
from qat_lightning.demo import MLP, MNIST1DDataModule


def accuracy(model: torch.nn.Module, loader) -> float:  # noqa: ANN001
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    model.train()
    return correct / len(loader.dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batches", type=int, default=None, help="limit batches per epoch (smoke runs)")
    parser.add_argument("--penalty", type=float, default=1.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = MNIST1DDataModule(num_samples=20000)
    data.prepare_data()
    data.setup("fit")
    data.setup("test")

    model = MLP(hidden=(512, 512))
    quantizer = DiffQuantizer(model, group_size=8, min_bits=3)       # bits logits registered on the model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    quantizer.setup_optimizer(optimizer, lr=1e-2)                     # bits in their own param group
    for epoch in range(args.epochs):
        for i, (x, y) in enumerate(data.train_dataloader()):
            if args.batches is not None and i >= args.batches:
                break
            loss = F.cross_entropy(model(x), y) + args.penalty * quantizer.model_size()  # noisy weights
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with quantizer.quantized():                                   # true quantized weights inside
            acc = accuracy(model, data.test_dataloader())
        print(f"epoch {epoch}: loss {loss.item():.3f}, {quantizer.true_model_size():.4f} MB, quantized test acc {acc:.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mlp.packed.safetensors"
        save_quantized(quantizer, path)                               # bit-packed, no pickle
        fresh = MLP(hidden=(512, 512))
        load_quantized(path, fresh)                                   # plain model, quantized values
        restored = accuracy(fresh, data.test_dataloader())
        print(f"file {path.stat().st_size / 2**20:.4f} MB; fresh model loaded from it: test acc {restored:.4f} "
              f"({'same' if restored == acc else 'differs'} as the quantized model)")  # fmt: skip


if __name__ == "__main__":
    main()
