"""Training-step time of each training callback on model code no one here wrote, against the same
Lightning loop without callbacks, measured side by side in one process (one thread).

The tiny random-init models of the test matrix (``tests/real_models.py``: Hugging Face GPT-2,
Llama, BERT, ``nn.TransformerEncoder``, an LSTM LM, ResNet- and MobileNetV3-style CNNs), batch 16.
Variants: DiffQ (``min_size=0``, biases float: every weight; ``diffq_alone``: each weight's noise
drawn alone, as before stop 30), EMAFakeQuant W8A8 (defaults),
``int4_g16`` weights + ``int8_per_token`` layer inputs, LSQ W4A8. The calibration callbacks
(AdaScale, HistogramCalibration, Rescaling) cost once, at setup, and train like the fake-quant
callback they configure. Also prints each model's DiffQ noise floor: ``(fp32 step + time to draw
one gaussian per quantized weight) / fp32 step``. ``--compile``: every variant also
``torch.compile``d (inductor; needs a C++ compiler), each ratio to the eager fp32 step.
``--device cuda``: on a GPU (steps timed between ``torch.cuda.synchronize`` calls).

    python benchmarks/real_models.py [--steps 60] [--rounds 2] [--models gpt2 llama] [--device cpu] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.step_overhead import DiffQAlone, StepTimer, accelerator, module_noise_time  # noqa: E402
from qat_lightning import DiffQ, EMAFakeQuant  # noqa: E402
from tests.real_models import MODELS, build, loader  # noqa: E402

DIFFQ = dict(min_size=0, exclude=["*bias"])  # every weight of these tiny models (the default min_size would skip most)
VARIANTS = {
    "fp32": lambda: [],
    "diffq": lambda: [DiffQ(**DIFFQ)],
    "diffq_alone": lambda: [DiffQAlone(**DIFFQ)],
    "ema_w8a8": lambda: [EMAFakeQuant()],
    "int4_g16_int8tok": lambda: [EMAFakeQuant(weight_format="int4_g16", activation_format="int8_per_token", activation_position="inputs")],
    "lsq_w4a8": lambda: [EMAFakeQuant(learned_step=True, weight_bits=4)],
}


def step_time(name: str, variant: str, steps: int, warmup: int, batch_size: int, compiled: bool = False,
              device: str = "cpu") -> float:
    pl.seed_everything(0, verbose=False)
    timer = StepTimer(warmup, device)
    model = build(name)
    if compiled:  # inductor; the warm-up steps absorb the compilation
        model.log_loss = False
        model = torch.compile(model)
    trainer = pl.Trainer(
        max_steps=steps + warmup, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[timer, *VARIANTS[variant]()],
        accelerator=accelerator(device), devices=1,
    )  # fmt: skip
    trainer.fit(model, loader(name, n=batch_size * 8, batch_size=batch_size))
    return statistics.median(timer.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "diffq_alone"], choices=list(VARIANTS))
    parser.add_argument("--compile", action="store_true", help="also each variant torch.compile'd (inductor): ratios to the eager fp32 step")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    variants = ["fp32", *[v for v in args.variants if v != "fp32"]]
    if args.compile:
        variants += [f"{v}+compile" for v in variants]
    result: dict[str, dict[str, float]] = {}
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{args.threads} thread(s)"
    print(f"batch {args.batch_size}, {where}, median of {args.steps} steps, {args.rounds} interleaved rounds")
    print(f"  {'model':20s} {'fp32 ms':>8s} " + " ".join(f"{v:>24s}" for v in variants[1:]) + f" {'noise floor':>12s}")
    for name in args.models:
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):  # interleaved: drifts of the machine hit every variant alike
            for variant in variants:
                base, compiled = variant.removesuffix("+compile"), variant.endswith("+compile")
                times[variant].append(step_time(name, base, args.steps, args.warmup, args.batch_size, compiled, args.device))
        median = {v: statistics.median(t) for v, t in times.items()}
        fp32 = median["fp32"]
        row = {"fp32_step_ms": 1e3 * fp32, "noise_floor_ratio": (fp32 + module_noise_time(build(name).to(args.device), 100, **DIFFQ)) / fp32}
        row.update({f"{v}_ratio": median[v] / fp32 for v in variants[1:]})
        result[name] = row
        print(f"  {name:20s} {row['fp32_step_ms']:8.2f} " + " ".join(f"{row[f'{v}_ratio']:23.2f}x" for v in variants[1:])
              + f" {row['noise_floor_ratio']:11.2f}x", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
