"""Training-step time with each callback vs the same Lightning loop without it.

MNIST-1D MLP 40-512-512-10, batch 100, one thread. Float, DiffQ, EMAFakeQuant (W8A8), both
together, the number formats ``int4_g32`` weights and ``int8_per_token`` + ``int4_g32`` next to
torchao's QAT of the same formats (when torchao is installed; both keep the 40-feature input layer
float: 32 does not divide 40), torch.ao eager QAT (W8A8) and, when ``diffq-fixed`` is installed,
the reference diffq driven by an equivalent callback alternate in one process; each
reports the median time between ``on_train_batch_start`` and ``on_train_batch_end`` after
warm-up. Also prints the noise floor: the time to draw one gaussian number per quantized weight
with torch's ``normal_``, ``floor = (fp32 step + noise) / fp32 step``, and the same with DiffQ's own
16-bit table draws (``noise_sampler="table"``, its CPU default).

``--compile``: each variant also ``torch.compile``d (inductor; needs a C++ compiler), the module's
``training_step`` without ``self.log`` (dynamo cannot trace Lightning's), each compiled ratio to
the compiled fp32 step. ``--device cuda``: the same loop on a GPU (each step's time between two ``torch.cuda.synchronize``,
the floor's draws on the GPU); ``--batch-size`` and ``--hidden`` size the MLP up.

    python benchmarks/step_overhead.py [--steps 300] [--rounds 3] [--threads 1] [--device cpu] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from qat_lightning import DiffQ, DiffQuantizer, EMAFakeQuant
from qat_lightning.demo import Classifier, MLP, MNIST1DDataModule
from qat_lightning.quantizers.noise_draw import NoiseSampler


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work (a no-op on the CPU), so a wall-clock interval holds it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class StepTimer(pl.Callback):
    def __init__(self, warmup: int, device: str = "cpu") -> None:
        self.warmup, self.device, self.times, self._start = warmup, device, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        synchronize(self.device)
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)


class DiffQAlone(DiffQ):
    """DiffQ with each weight's noise drawn alone (as before stop 30), for the side-by-side ratio."""

    def build_quantizer(self, pl_module: pl.LightningModule) -> DiffQuantizer:
        quantizer = super().build_quantizer(pl_module)
        quantizer._small_weights = lambda: []
        return quantizer


class ReferenceDiffQ(pl.Callback):
    """The reference ``diffq.DiffQuantizer`` (PyPI ``diffq-fixed``) driven the same way, for comparison."""

    def __init__(self, penalty: float = 1.0, **kwargs: object) -> None:
        self.penalty, self.kwargs = penalty, kwargs

    def setup(self, trainer, pl_module, stage) -> None:  # noqa: ANN001
        import diffq

        self.quantizer = diffq.DiffQuantizer(pl_module, **self.kwargs)

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        optimizer = trainer.optimizers[0]
        self.quantizer.clear_optimizer(optimizer)
        self.quantizer.setup_optimizer(optimizer, lr=1e-2)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        logits = [qp.logit for qp in self.quantizer._qparams]
        with torch.enable_grad():
            grads = torch.autograd.grad(self.penalty * self.quantizer.model_size(), logits)
        for p, g in zip(logits, grads):
            p.grad.add_(g)


class TorchAOEagerQAT(pl.Callback):
    """torch.ao eager-mode QAT with its default 8-bit FakeQuantize config, for comparison."""

    def setup(self, trainer, pl_module, stage) -> None:  # noqa: ANN001
        import torch.ao.quantization as tq

        pl_module.qconfig = tq.get_default_qat_qconfig("x86")
        tq.prepare_qat(pl_module, inplace=True)


class TorchAOQAT(pl.Callback):
    """torchao's QAT (``quantize_(model, QATConfig(..., step="prepare"))``) of the same formats."""

    def __init__(self, activations: bool) -> None:
        self.activations = activations

    def setup(self, trainer, pl_module, stage) -> None:  # noqa: ANN001
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

        weight = IntxFakeQuantizeConfig(torch.int4, group_size=32)
        activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False) if self.activations else None
        fits = lambda module, name: isinstance(module, torch.nn.Linear) and module.in_features % 32 == 0  # noqa: E731
        quantize_(pl_module, QATConfig(activation_config=activation, weight_config=weight, step="prepare"), filter_fn=fits)


class QuietClassifier(Classifier):
    """The demo classifier without ``self.log`` in ``training_step``, for a compiled module: dynamo
    cannot trace Lightning's ``log`` (Lightning 2.6)."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)


def callbacks_for(variant: str) -> list[pl.Callback]:
    """The callbacks of one benchmarked variant (fresh instances)."""
    return {
        "fp32": [],
        "diffq": [DiffQ(penalty=1.0, bits_lr=1e-2)],
        "diffq_alone": [DiffQAlone(penalty=1.0, bits_lr=1e-2)],  # each weight's noise drawn alone (before stop 30)
        "diffq_torch_noise": [DiffQ(penalty=1.0, bits_lr=1e-2, noise_sampler="torch")],  # torch's normal_, the old default
        "diffq_channel": [DiffQ(penalty=1.0, bits_lr=1e-2, scale="channel")],  # issue 18's grid, noise phase
        "diffq_channel_ste": [DiffQ(penalty=1.0, bits_lr=1e-2, scale="channel", range_search=10, learn_ranges=True,
                                    straight_through_fraction=1.0)],  # its straight-through phase (every step)
        "diffq_sym": [DiffQ(penalty=1.0, bits_lr=1e-2, scale="channel", symmetric_ranges=True)],  # the lm_diffq grid, noise
        "diffq_sym_ste": [DiffQ(penalty=1.0, bits_lr=1e-2, scale="channel", symmetric_ranges=True, range_search=10,
                                learn_ranges=True, straight_through_fraction=1.0)],  # and its straight-through phase
        "diffq_sym_ste_damp": [DiffQ(penalty=1.0, bits_lr=1e-2, scale="channel", symmetric_ranges=True, range_search=10,
                                     learn_ranges=True, straight_through_fraction=1.0, dampening=0.1)],  # lm_diffq's: with dampening
        "ema": [EMAFakeQuant(weight_bits=8, activation_bits=8)],
        "lsq_w4": [EMAFakeQuant(weight_format="distiller4_symmetric_per_channel_lsq", activations=False)],  # lm_lsq_w4's weights
        "diffq_ema": [DiffQ(penalty=1.0, bits_lr=1e-2), EMAFakeQuant(weights=False)],
        "torch_ao": [TorchAOEagerQAT()],
        "int4_g32": [EMAFakeQuant(weight_format="int4_g32", activations=False)],
        "int8tok_int4_g32": [EMAFakeQuant(weight_format="int4_g32", activation_format="int8_per_token", activation_position="inputs",
                                          exclude=["net.0"])],  # as torchao's filter: the 40-feature layer stays float
        "torchao_int4_g32": [TorchAOQAT(activations=False)],
        "torchao_int8tok_int4_g32": [TorchAOQAT(activations=True)],
        "reference": [ReferenceDiffQ(penalty=1.0)],  # its defaults: group_size=1
        "reference_g8": [ReferenceDiffQ(penalty=1.0, group_size=8)],
    }[variant]


def accelerator(device: str) -> str:
    """Lightning's ``accelerator`` for a torch device string."""
    return {"cpu": "cpu", "cuda": "gpu"}[torch.device(device).type]


def step_time(variant: str, steps: int, warmup: int, hidden: tuple[int, ...], device: str = "cpu", batch_size: int = 100) -> float:
    """Median step time of ``variant`` (``"<variant>+compile"``: the module ``torch.compile``d, inductor)."""
    pl.seed_everything(0, verbose=False)
    timer = StepTimer(warmup, device)
    base, compiled = variant.removesuffix("+compile"), variant.endswith("+compile")
    callbacks = [timer, *callbacks_for(base)]
    trainer = pl.Trainer(
        max_steps=steps + warmup, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks, accelerator=accelerator(device), devices=1,
    )  # fmt: skip
    model = torch.compile(QuietClassifier(MLP(hidden=hidden))) if compiled else Classifier(MLP(hidden=hidden))
    trainer.fit(model, MNIST1DDataModule(batch_size=batch_size))
    return statistics.median(timer.times)


def noise_time(hidden: tuple[int, ...], repeats: int = 200, device: str = "cpu") -> float:
    return module_noise_time(MLP(hidden=hidden).to(device), repeats)


def module_noise_time(module: torch.nn.Module, repeats: int = 200, sampler: str = "torch", **diffq: object) -> float:
    """Median time to draw one gaussian number per weight DiffQ (options ``diffq``) quantizes in
    ``module`` (on its device): with torch's ``normal_`` (the floor), or ``sampler="table"``, DiffQ's
    16-bit draws."""
    quantizer = DiffQuantizer(module, **diffq)
    buffers = [torch.empty_like(qp.param) for qp in quantizer.quantized_params()]  # refilled: no page faults
    device = str(buffers[0].device) if buffers else "cpu"
    draw = NoiseSampler("gaussian", sampler).draw
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for buffer in buffers:
            draw(buffer, None)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument("--json", default=None)
    parser.add_argument("--variants", nargs="+", default=None, help="subset to run (fp32 is always included)")
    parser.add_argument("--compile", action="store_true", help="also each variant torch.compile'd (inductor), ratios to compiled fp32")
    parser.add_argument("--no-reference", dest="reference", action="store_false", help="skip torch.ao and the reference diffq")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    hidden = tuple(args.hidden)

    variants = ["fp32", "diffq", "ema", "diffq_ema", "int4_g32", "int8tok_int4_g32"]
    if args.reference:
        variants += ["torch_ao"]
        if importlib.util.find_spec("torchao") is not None:
            variants += ["torchao_int4_g32", "torchao_int8tok_int4_g32"]
        if importlib.util.find_spec("diffq") is not None:
            variants += ["reference", "reference_g8"]
    if args.variants:
        variants = ["fp32", *[v for v in args.variants if v != "fp32"]]
    if args.compile:  # torch.ao's prepare_qat, torchao's quantize_ and the reference swap modules: eager only
        variants += [f"{v}+compile" for v in variants if not v.startswith(("torch_ao", "torchao", "reference"))]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):  # interleaved, so drifts of the machine hit every variant alike
        for variant in variants:
            times[variant].append(step_time(variant, args.steps, args.warmup, hidden, args.device, args.batch_size))
    median = {v: statistics.median(t) for v, t in times.items()}
    fp32, noise = median["fp32"], noise_time(hidden, device=args.device)
    table_noise = module_noise_time(MLP(hidden=hidden).to(args.device), sampler="table")
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{args.threads} thread(s)"
    result = {
        "model": f"MLP 40-{'-'.join(map(str, hidden))}-10, batch {args.batch_size}, {where}",
        "fp32_step_ms": 1e3 * fp32,
        "noise_ms": 1e3 * noise,
        "noise_floor_ratio": (fp32 + noise) / fp32,
        "table_noise_ms": 1e3 * table_noise,  # DiffQ's own draw (noise_sampler="table", the CPU default)
        "table_noise_floor_ratio": (fp32 + table_noise) / fp32,
        **{f"{v}_step_ms": 1e3 * median[v] for v in variants if v != "fp32"},
        **{f"{v}_ratio": median[v] / fp32 for v in variants if v != "fp32"},
        **{f"{v}_compiled_ratio": median[v] / median["fp32+compile"] for v in variants if v.endswith("+compile") and v != "fp32+compile"},
    }
    labels = {
        "diffq": "qat_lightning DiffQ", "diffq_alone": "DiffQ, each weight drawn alone", "diffq_torch_noise": "DiffQ, noise_sampler='torch'",
        "ema": "EMAFakeQuant W8A8", "diffq_ema": "DiffQ + EMAFakeQuant A8",
        "torch_ao": "torch.ao eager QAT W8A8", "reference": "reference diffq (group 1)",
        "int4_g32": "ours int4_g32 weights", "int8tok_int4_g32": "ours int8_per_token + int4_g32",
        "torchao_int4_g32": "torchao QAT int4_g32", "torchao_int8tok_int4_g32": "torchao QAT int8 token + int4_g32",
        "reference_g8": "reference diffq (group 8)", "diffq_channel": "DiffQ per-channel ranges (noise)",
        "diffq_channel_ste": "DiffQ per-channel, learned ranges (STE)", "diffq_sym": "DiffQ symmetric per-channel (noise)",
        "diffq_sym_ste": "DiffQ symmetric, learned ranges (STE)", "lsq_w4": "LSQ W4 per-channel (weights)",
        "diffq_sym_ste_damp": "DiffQ symmetric, STE, dampening 0.1",
    }  # fmt: skip
    print(result["model"])
    print(f"  {'fp32 step':34s} {result['fp32_step_ms']:8.3f} ms")
    for v in variants[1:]:
        base, compiled = v.removesuffix("+compile"), v.endswith("+compile")
        label = ("compiled fp32" if base == "fp32" else f"compiled {labels[base]}") if compiled else labels[v]
        extra = f"   / compiled fp32 {result[f'{v}_compiled_ratio']:.2f}x" if f"{v}_compiled_ratio" in result else ""
        print(f"  {label[:34]:34s} {result[f'{v}_step_ms']:8.3f} ms   ratio {result[f'{v}_ratio']:.2f}x{extra}")
    print(f"  {'noise alone (normal_)':34s} {result['noise_ms']:8.3f} ms   floor {result['noise_floor_ratio']:.2f}x")
    print(f"  {'noise alone (16-bit table draws)':34s} {result['table_noise_ms']:8.3f} ms   floor {result['table_noise_floor_ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
