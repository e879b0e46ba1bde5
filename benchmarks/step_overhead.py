"""Training-step time with the DiffQ callback vs the same Lightning loop without it.

MNIST-1D MLP 40-512-512-10, batch 100, one thread. Float and DiffQ runs alternate in one
process; each reports the median time between ``on_train_batch_start`` and
``on_train_batch_end`` after warm-up. Also prints the noise floor: the time to draw one
gaussian number per quantized weight, ``floor = (fp32 step + noise) / fp32 step``.

    python benchmarks/step_overhead.py [--steps 300] [--rounds 3] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch

from qat_lightning import DiffQ, DiffQuantizer
from qat_lightning.data import MNIST1DDataModule
from qat_lightning.models import MLP, Classifier


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)


def step_time(quantize: bool, steps: int, warmup: int, hidden: tuple[int, ...]) -> float:
    pl.seed_everything(0, verbose=False)
    timer = StepTimer(warmup)
    callbacks = [timer, DiffQ(penalty=1.0, bits_lr=1e-2)] if quantize else [timer]
    trainer = pl.Trainer(
        max_steps=steps + warmup, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(Classifier(MLP(hidden=hidden)), MNIST1DDataModule(batch_size=100))
    return statistics.median(timer.times)


def noise_time(hidden: tuple[int, ...], repeats: int = 200) -> float:
    quantizer = DiffQuantizer(MLP(hidden=hidden))
    params = [qp.param for qp in quantizer.quantized_params()]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for p in params:
            torch.empty_like(p).normal_()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    hidden = tuple(args.hidden)

    float_times, diffq_times = [], []
    for _ in range(args.rounds):
        float_times.append(step_time(False, args.steps, args.warmup, hidden))
        diffq_times.append(step_time(True, args.steps, args.warmup, hidden))
    fp32, diffq = statistics.median(float_times), statistics.median(diffq_times)
    noise = noise_time(hidden)
    result = {
        "model": f"MLP 40-{'-'.join(map(str, hidden))}-10, batch 100, {args.threads} thread(s)",
        "fp32_step_ms": 1e3 * fp32,
        "diffq_step_ms": 1e3 * diffq,
        "noise_ms": 1e3 * noise,
        "diffq_ratio": diffq / fp32,
        "noise_floor_ratio": (fp32 + noise) / fp32,
    }
    print(f"{result['model']}")
    print(f"  fp32 step          {result['fp32_step_ms']:8.3f} ms")
    print(f"  DiffQ step         {result['diffq_step_ms']:8.3f} ms   ratio {result['diffq_ratio']:.2f}x")
    print(f"  noise alone        {result['noise_ms']:8.3f} ms   floor {result['noise_floor_ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
