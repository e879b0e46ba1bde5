"""Hydra training app: ``python -m qat_lightning.train [overrides]``.

Trains the configured LightningModule with the configured callbacks (DiffQ by default) on the
embedded MNIST-1D, then tests the float and the true quantized weights and writes
``summary.json`` into the run directory.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from ..callbacks import AdaScale, DiffQ, EMAFakeQuant
from ..calibration.adascale import round_to_nearest

log = logging.getLogger(__name__)
MEGABYTE = 2**20


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a config group such as ``callbacks``."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def test_accuracy(trainer: pl.Trainer, model: pl.LightningModule, datamodule: pl.LightningDataModule, metric: str) -> float:
    results = trainer.test(model, datamodule=datamodule, verbose=False)
    if not results or metric not in results[0]:
        raise KeyError(f"test_metric={metric!r} was not logged by test_step; logged: {sorted(results[0]) if results else []}")
    return float(results[0][metric])


def summarize(
    trainer: pl.Trainer, model: pl.LightningModule, datamodule: pl.LightningDataModule, callbacks: list[Any], metric: str
) -> dict[str, Any]:
    """Float and quantized sizes and test accuracies of the trained model.

    The float accuracy is the same trained model evaluated with every quantizer switched off.
    """
    diffq = next((c for c in callbacks if isinstance(c, DiffQ) and c.quantizer is not None), None)
    ema = next((c for c in callbacks if isinstance(c, EMAFakeQuant) and c.quantizer is not None), None)
    quantized_acc = test_accuracy(trainer, model, datamodule, metric)
    with _float_evaluation(diffq, ema):
        float_acc = test_accuracy(trainer, model, datamodule, metric) if diffq or ema else quantized_acc
    float_size = 4 * sum(p.numel() for n, p in model.named_parameters() if not n.endswith("_diffq") and "fake_quant." not in n) / MEGABYTE
    summary: dict[str, Any] = dict(float_size_mb=float_size, quantized_size_mb=float_size, avg_bits=32.0)
    if diffq is not None:
        q = diffq.quantizer
        summary.update(quantized_size_mb=q.true_model_size(), avg_bits=float(q.average_bits(exact=True)),
                       stored_bits=q.stored_bits(), estimated_size_mb=float(q.model_size().detach()))  # fmt: skip
    elif ema is not None and ema.options["weights"]:
        bits = ema.quantizer.bits_per_weight()  # scales included
        summary.update(quantized_size_mb=ema.quantizer.model_size(), avg_bits=bits, stored_bits=bits)
    else:  # another library's QAT (qat_lightning.demo.baselines) reports its own size
        other = next((c for c in callbacks if callable(getattr(c, "model_size", None)) and callable(getattr(c, "bits_per_weight", None))), None)
        if other is not None:
            bits = other.bits_per_weight()
            summary.update(quantized_size_mb=other.model_size(), avg_bits=bits, stored_bits=bits)
    summary.update(compression=float_size / summary["quantized_size_mb"], float_test_acc=float_acc, quantized_test_acc=quantized_acc)
    return summary


@contextmanager
def _float_evaluation(diffq: DiffQ | None, ema: EMAFakeQuant | None) -> Iterator[None]:
    if diffq is not None:
        diffq.quantize_eval, setting = False, diffq.quantize_eval
    if ema is not None:
        ema.evaluate_quantized = False
    try:
        yield
    finally:
        if diffq is not None:
            diffq.quantize_eval = setting
        if ema is not None:
            ema.evaluate_quantized = True


def post_training_quantization(cfg: DictConfig, model: pl.LightningModule, datamodule: pl.LightningDataModule, metric: str) -> dict[str, Any]:
    """``+ptq=...``: quantize the trained model after the fact; reports the round-to-nearest baseline
    (same bits, per-channel symmetric) next to the PTQ method's accuracy."""
    ptq_callbacks = instantiate_group(cfg.ptq)
    method = next(c for c in ptq_callbacks if isinstance(c, AdaScale))
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    baseline = instantiate(cfg.model)
    baseline.load_state_dict(model.state_dict())
    round_to_nearest(baseline, method.bits)
    rtn_acc = test_accuracy(instantiate(cfg.trainer, callbacks=[], **quiet), baseline, datamodule, metric)
    ptq_trainer = instantiate(cfg.trainer, callbacks=ptq_callbacks, **quiet)
    ptq_trainer.validate(model, datamodule=datamodule, verbose=False)  # runs the PTQ method on training batches
    ptq_acc = test_accuracy(ptq_trainer, model, datamodule, metric)
    return {"method": type(method).__name__, "bits": method.bits, "rtn_test_acc": rtn_acc, "ptq_test_acc": ptq_acc}


def format_ptq(ptq: dict[str, Any]) -> str:
    return (
        f"post-training W{ptq['bits']}: round-to-nearest {100 * ptq['rtn_test_acc']:.2f} %, "
        f"{ptq['method']} {100 * ptq['ptq_test_acc']:.2f} %"
    )


def format_summary(summary: dict[str, Any]) -> str:
    rows = [
        ("float size", f"{summary['float_size_mb']:.4f} MB"),
        ("quantized size (true)", f"{summary['quantized_size_mb']:.4f} MB"),
        ("compression", f"{summary['compression']:.2f}x"),
        ("average bits / weight", f"{summary['avg_bits']:.2f}"),
    ]
    metric = summary.get("test_metric", "test/acc")
    if "stored_bits" in summary:
        rows.append(("stored bits / weight", f"{summary['stored_bits']:.2f}"))
    for kind in ("float", "quantized"):
        value = summary[f"{kind}_test_acc"]
        rows.append((f"{kind} test accuracy", f"{100 * value:.2f} %") if metric.endswith("acc") else (f"{kind} {metric}", f"{value:.4f}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v:>12}" for k, v in rows]
    rule = "-" * len(lines[0])
    return "\n".join([rule, *lines, rule])


def _instantiate_model(cfg: DictConfig, datamodule: pl.LightningDataModule) -> pl.LightningModule:
    """The model; ``vocab_size: null`` in its config takes the data module's ``vocab_size``."""
    if "vocab_size" in cfg.model and cfg.model.vocab_size is None:
        if not hasattr(datamodule, "vocab_size"):
            raise ValueError(f"model.vocab_size is null but the data module {type(datamodule).__name__} has no vocab_size: set it")
        return instantiate(cfg.model, vocab_size=datamodule.vocab_size)
    return instantiate(cfg.model)


def pretrain(cfg: DictConfig, model: pl.LightningModule, datamodule: pl.LightningDataModule) -> None:
    """``pretrain.steps`` float training steps (no callbacks, learning rate ``pretrain.lr``) before
    the quantization-aware fit: a recipe that fine-tunes a trained float model, in one run."""
    pretrain_cfg = cfg.pretrain
    steps = int(pretrain_cfg.steps)
    if steps < 0:
        raise ValueError(f"pretrain.steps must be >= 0; got {steps}")
    lr = pretrain_cfg.get("lr")
    if lr is not None and not hasattr(model, "lr"):
        raise ValueError(f"pretrain.lr is set but {type(model).__name__} has no lr attribute to set: remove pretrain.lr")
    saved = getattr(model, "lr", None)
    if lr is not None:
        model.lr = float(lr)
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = instantiate(cfg.trainer, callbacks=[], max_steps=steps, max_epochs=-1, limit_val_batches=0, **quiet)
    trainer.fit(model, datamodule=datamodule)
    if lr is not None:
        model.lr = saved
    log.info("pretrained %d float steps", steps)


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Train and summarise one configuration; returns the summary (also written as JSON)."""
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = _instantiate_model(cfg, datamodule)
    if cfg.get("pretrain") and cfg.pretrain.get("steps"):
        pretrain(cfg, model, datamodule)
    callbacks = instantiate_group(cfg.get("callbacks"))
    if cfg.get("progress_bar") and cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(instantiate(cfg.progress_bar))
    for callback in callbacks:  # relative report paths: in the run directory, next to summary.json
        if isinstance(callback, DiffQ) and callback.layer_report and output_dir is not None:
            callback.layer_report = str(Path(output_dir) / callback.layer_report)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    trainer.fit(model, datamodule=datamodule)
    if not cfg.get("test", True):
        return {}
    metric = cfg.get("test_metric", "test/acc")
    summary = summarize(trainer, model, datamodule, callbacks, metric)
    summary["epochs"] = trainer.current_epoch
    summary["test_metric"] = metric
    print(format_summary(summary), flush=True)
    diffq = next((c for c in callbacks if isinstance(c, DiffQ) and c.quantizer is not None), None)
    if diffq is not None and output_dir is not None:
        packed = diffq.export(trainer, Path(output_dir) / "model.packed.safetensors")
        summary["packed_file_mb"] = packed.stat().st_size / MEGABYTE
        print(f"bit-packed model: {packed} ({summary['packed_file_mb']:.4f} MB on disk, "
              f"true size {summary['quantized_size_mb']:.4f} MB)", flush=True)  # fmt: skip
    if cfg.get("ptq"):
        summary["ptq"] = post_training_quantization(cfg, model, datamodule, metric)
        print(format_ptq(summary["ptq"]), flush=True)
    if output_dir is not None:
        path = Path(output_dir) / cfg.get("summary_file", "summary.json")
        path.write_text(json.dumps(summary, indent=2) + "\n")
        log.info("summary written to %s", path)
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | tuple[float, ...] | None:
    summary = run(cfg, HydraConfig.get().runtime.output_dir)
    return objective(summary, cfg.get("objective", "quantized_test_acc"))


def objective(summary: dict[str, Any], keys: str | Sequence[str] | None) -> float | tuple[float, ...] | None:
    """The value(s) a sweeper optimises: one summary key, or a tuple for several objectives."""
    if not summary or keys is None:
        return None
    names = [keys] if isinstance(keys, str) else list(keys)
    missing = [k for k in names if k not in summary]
    if missing:
        raise KeyError(f"objective {missing} not in the run summary; pick from {sorted(summary)}")
    values = tuple(float(summary[k]) for k in names)
    return values[0] if isinstance(keys, str) else values


if __name__ == "__main__":
    main()
