"""AdaScale vs round-to-nearest vs float: W4 weight-only test accuracy on MNIST-1D.

Trains each model in float (the Hydra app's model configs, same seed), then quantizes copies of it
with per-channel symmetric round-to-nearest and with AdaScale (training batches for calibration),
and prints the test accuracies side by side.

    python benchmarks/adascale_eval.py [--models mlp cnn transformer] [--epochs 30] [--bits 4]
"""
from __future__ import annotations

import argparse
import json
import logging
import warnings

import lightning.pytorch as pl
import torch

from qat_lightning import apply_adascale, round_to_nearest
from qat_lightning.demo import CNN1D, Classifier, MLP, MNIST1DDataModule, TinyTransformer

NETS = {"mlp": MLP, "cnn": CNN1D, "transformer": TinyTransformer}


def accuracy(net: torch.nn.Module, loader: torch.utils.data.DataLoader) -> float:
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (net(x).argmax(-1) == y).sum().item()
            total += len(y)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--samples", type=int, default=20000, help="MNIST-1D samples (the app's default)")
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    results = {}
    for name in args.models:
        pl.seed_everything(args.seed, verbose=False)
        data = MNIST1DDataModule(num_samples=args.samples)
        model = Classifier(NETS[name]())
        trainer = pl.Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu")  # fmt: skip
        trainer.fit(model, data)
        test = data.test_dataloader()
        row: dict = {"float": accuracy(model.net, test)}
        for bits in args.bits:
            rtn = NETS[name]()
            rtn.load_state_dict(model.net.state_dict())
            round_to_nearest(rtn, bits)
            ada = NETS[name]()
            ada.load_state_dict(model.net.state_dict())
            report = apply_adascale(ada, data.train_dataloader(), num_batches=args.batches, num_iterations=args.iterations,
                                    bits=bits, progress=False)  # fmt: skip
            row[f"w{bits}"] = {"round_to_nearest": accuracy(rtn, test), "adascale": accuracy(ada, test),
                               "blocks": [(b.name, b.loss_before, b.loss_after) for b in report.blocks]}  # fmt: skip
            print(f"{name:12s} float {100 * row['float']:6.2f} %   W{bits} round-to-nearest "
                  f"{100 * row[f'w{bits}']['round_to_nearest']:6.2f} %   W{bits} AdaScale {100 * row[f'w{bits}']['adascale']:6.2f} %",
                  flush=True)  # fmt: skip
        results[name] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
