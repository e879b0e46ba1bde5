"""The benchmark suite: step time, validation swap cost and peak memory, with and without callbacks.

For each model (MNIST-1D MLP 40-512-512-10 and a ~10 M parameter transformer), batch 100, in the
same Lightning loop, measured side by side in one process (variants interleaved over ``--rounds``,
medians after warm-up):

* training-step time ratio to the float loop for DiffQ, EMAFakeQuant (W8A8), both, torch.ao eager
  QAT and, when ``diffq-fixed`` is installed, the reference diffq;
* the noise floor: ``(fp32 step + one normal_ per quantized weight) / fp32 step``;
* the validation swap: DiffQ's ``quantize()`` + ``restore()`` relative to one validation batch forward;
* peak memory: each variant trains in a child process (after a throw-away float fit that pays the
  one-off allocations of Lightning and torch); the growth of its peak RSS over the RSS before the
  model is built is compared with the float run's. Linux only (``/proc/self/clear_refs``).

Prints a table and writes JSON (``--json``). ``--smoke`` runs tiny sizes (CI: no timing claims).

    python benchmarks/run.py [--models mlp transformer] [--rounds 3] [--steps 200] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import StepTimer, callbacks_for, module_noise_time  # noqa: E402

from qat_lightning import DiffQuantizer  # noqa: E402
from qat_lightning.demo import Classifier, MLP, MNIST1DDataModule, TinyTransformer

MODELS = {
    "mlp": lambda smoke: MLP(hidden=(64, 64) if smoke else (512, 512)),
    "transformer": lambda smoke: TinyTransformer(dim=32, depth=1, heads=2, hidden=64) if smoke
    else TinyTransformer(dim=384, depth=6, heads=6, hidden=1536),
}  # fmt: skip


def step_time(variant: str, model: str, steps: int, warmup: int, smoke: bool) -> float:
    pl.seed_everything(0, verbose=False)
    timer = StepTimer(warmup)
    trainer = pl.Trainer(max_steps=steps + warmup, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[timer, *callbacks_for(variant)],
                         accelerator="cpu")  # fmt: skip
    trainer.fit(Classifier(MODELS[model](smoke)), MNIST1DDataModule(batch_size=100, num_samples=2000))
    return statistics.median(timer.times)


def noise_time(model: str, smoke: bool, repeats: int = 50) -> float:
    return module_noise_time(MODELS[model](smoke), repeats)


def swap_cost(model: str, smoke: bool, repeats: int = 20) -> dict[str, float]:
    """DiffQ's quantize + restore for a validation stage vs one validation batch forward."""
    net = MODELS[model](smoke)
    quantizer = DiffQuantizer(net)
    with torch.no_grad():
        for qp in quantizer.quantized_params():
            qp.logit.uniform_(-2, 2)
    x = torch.randn(100, 40)
    net.eval()
    swaps, forwards = [], []
    for _ in range(repeats):
        with torch.no_grad():
            qp0 = quantizer.quantized_params()[0]
            qp0.param.add_(0)  # a training step happened: the cached quantized weights are stale
            start = time.perf_counter()
            quantizer.quantize()
            quantizer.restore()
            swaps.append(time.perf_counter() - start)
            start = time.perf_counter()
            net(x)
            forwards.append(time.perf_counter() - start)
    swap, forward = statistics.median(swaps), statistics.median(forwards)
    return {"swap_ms": 1e3 * swap, "val_batch_ms": 1e3 * forward, "ratio": swap / forward}


def memory_child(variant: str, model: str, steps: int, smoke: bool) -> None:
    """Child process: train briefly and print the growth of its peak RSS (bytes) over its RSS just
    before the model was built, after a throw-away float fit has paid Lightning's and torch's
    one-off allocations (so the growth is the model's parameters, gradients, optimizer state,
    activations and whatever the callbacks add)."""
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    data = MNIST1DDataModule(batch_size=100, num_samples=2000)

    def fit(module: pl.LightningModule, callbacks: list[pl.Callback]) -> None:
        trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
                             accelerator="cpu")  # fmt: skip
        trainer.fit(module, data)

    fit(Classifier(MLP(hidden=(8,))), [])  # warm-up: lazy initialisation of everything but the model
    before = _rss_now()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    pl.seed_everything(0, verbose=False)
    fit(Classifier(MODELS[model](smoke)), callbacks_for(variant))
    print(json.dumps({"growth": _peak_rss() - before}))


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_memory(variant: str, model: str, steps: int, smoke: bool) -> float:
    cmd = [sys.executable, __file__, "--memory-child", variant, model, "--steps", str(steps)] + (["--smoke"] if smoke else [])
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return float(json.loads(result.stdout.strip().splitlines()[-1])["growth"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="tiny models and few steps (CI)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.memory_child:
        memory_child(*args.memory_child, args.steps, args.smoke)
        return
    variants = ["fp32", "diffq", "ema", "diffq_ema", "torch_ao"]
    if importlib.util.find_spec("diffq") is not None:
        variants.append("reference_g8")
    labels = {"diffq": "DiffQ", "ema": "EMAFakeQuant W8A8", "diffq_ema": "DiffQ + EMAFakeQuant A8",
              "torch_ao": "torch.ao eager QAT W8A8", "reference_g8": "reference diffq (group 8)"}  # fmt: skip
    report: dict[str, dict] = {}
    for model in args.models:
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):  # interleaved: drifts of the machine hit every variant alike
            for variant in variants:
                times[variant].append(step_time(variant, model, args.steps, args.warmup, args.smoke))
        median = {v: statistics.median(t) for v, t in times.items()}
        fp32 = median["fp32"]
        noise = noise_time(model, args.smoke)
        entry: dict = {
            "parameters": sum(p.numel() for p in MODELS[model](args.smoke).parameters()),
            "fp32_step_ms": 1e3 * fp32,
            "noise_floor_ratio": (fp32 + noise) / fp32,
            "step_ratio": {v: median[v] / fp32 for v in variants if v != "fp32"},
            "swap": swap_cost(model, args.smoke),
        }
        if args.memory:
            growth = {v: peak_memory(v, model, min(args.steps, 50), args.smoke) for v in ("fp32", "diffq", "ema", "diffq_ema")}
            entry["peak_memory_ratio"] = {v: growth[v] / growth["fp32"] for v in growth if v != "fp32"}
        report[model] = entry
        print(f"{model}: {entry['parameters'] / 1e6:.2f} M parameters, fp32 step {entry['fp32_step_ms']:.2f} ms, "
              f"noise floor {entry['noise_floor_ratio']:.2f}x", flush=True)  # fmt: skip
        for v, ratio in entry["step_ratio"].items():
            memory = entry.get("peak_memory_ratio", {}).get(v)
            print(f"  {labels[v]:28s} step {ratio:5.2f}x" + (f"   peak memory {memory:4.2f}x" if memory else ""), flush=True)
        swap = entry["swap"]
        print(f"  validation swap (quantize + restore) {swap['swap_ms']:.2f} ms = {swap['ratio']:.2f} x one validation batch "
              f"({swap['val_batch_ms']:.2f} ms)", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
