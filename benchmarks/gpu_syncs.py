"""Host-device synchronizations inside a training step on a GPU, per callback.

A sync stalls the CPU until the GPU's queue drains, so a step that syncs cannot overlap Python with
the GPU's work. Runs the demo MLP's Lightning loop with each callback and, between
``on_train_batch_start`` and ``on_train_batch_end`` of the steps after warm-up, turns on
``torch.cuda.set_sync_debug_mode("warn")``: every synchronizing CUDA call then warns, and the
warnings are counted per source line.

    python benchmarks/gpu_syncs.py [--steps 6] [--variants diffq ema]
"""
from __future__ import annotations

import argparse
import collections
import logging
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.step_overhead import callbacks_for  # noqa: E402
from qat_lightning.demo import MLP, Classifier, MNIST1DDataModule  # noqa: E402


class SyncWatch(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.sites = warmup, collections.Counter()
        self._catch: warnings.catch_warnings | None = None
        self._log: list[warnings.WarningMessage] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step >= self.warmup:
            self._catch = warnings.catch_warnings(record=True)
            self._log = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if self._catch is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(None, None, None)
            self._catch = None
            for w in self._log:
                if "synchroniz" in str(w.message):
                    self.sites[f"{Path(w.filename).name}:{w.lineno}"] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["fp32", "diffq", "ema", "int4_g32", "lsq_w4", "diffq_sym_ste_damp"])
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for variant in args.variants:
        pl.seed_everything(0, verbose=False)
        watch = SyncWatch(args.warmup)
        trainer = pl.Trainer(
            max_steps=args.steps + args.warmup, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, callbacks=[watch, *callbacks_for(variant)],
            accelerator="gpu", devices=1,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Classifier(MLP()), MNIST1DDataModule(batch_size=100))
        total = sum(watch.sites.values())
        print(f"{variant:22s} {total / args.steps:5.1f} syncs per step  " + ", ".join(f"{s} x{n}" for s, n in watch.sites.most_common(8)))


if __name__ == "__main__":
    main()
