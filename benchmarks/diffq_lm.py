"""The character-LM table of issue 18: a tiny HF Llama (hidden 128, 4 layers) pretrained 400 float
steps on pydoc text, then 300 fine-tuning steps per recipe (decoder Linear weights quantized,
embeddings and head float); test bits per character and stored bits per weight (scales included).

Every recipe is an app experiment (``qat_lightning/app/conf/experiment/<name>.yaml``): this script
pretrains once and fine-tunes a copy per recipe from the same state (weights, batch stream and
RNG), so each row equals ``python -m qat_lightning.train experiment=<name>`` at the same seed.

    python benchmarks/diffq_lm.py [--recipes lm_float lm_diffq ...] [--seeds 0 1] [--threads 1]

The thread count is part of the measurement: it changes the order of CPU reductions, and 700 steps of
training turn that into a different run (float fine-tuning at seed 0 reads 2.2745 bpc on one thread,
2.3305 on two). docs/diffq.md's tables are on one thread; two processes side by side use both cores.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from qat_lightning.app.train import _instantiate_model, instantiate_group, pretrain, summarize
from qat_lightning.demo.charlm import pydoc_fingerprint

CONF = Path(__file__).resolve().parents[1] / "qat_lightning" / "app" / "conf"
RECIPES = ["lm_float", "lm_torchao_int4_g32", "lm_torchao_int8tok_int4_g32", "lm_lsq_w4", "lm_ema_w4", "lm_diffq_reference", "lm_diffq_channel",
           "lm_diffq", "lm_diffq_budget", "lm_diffq_min4", "lm_diffq_small", "lm_lsq_w3"]  # fmt: skip


def _config(name: str, overrides: list[str]):  # noqa: ANN202
    """The recipe's config; an override of a key the recipe does not have (``callbacks.diffq.*`` for
    ``lm_float``) is left out for it."""
    fixed = [f"experiment={name}", "logger=none", "progress_bar=tqdm", "trainer.enable_progress_bar=false",
             "trainer.enable_model_summary=false", "trainer.enable_checkpointing=false", "trainer.default_root_dir=/tmp/qat_lightning_diffq_lm"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        plain = compose("train", overrides=fixed)
        kept = [o for o in overrides if not o.startswith("callbacks.") or OmegaConf.select(plain, o.split("=", 1)[0]) is not None]
        return compose("train", overrides=[*fixed, *kept])


def run_seed(seed: int, recipes: list[str], overrides: list[str]) -> dict[str, dict]:
    base_cfg = _config("lm_base", overrides + [f"seed={seed}"])
    pl.seed_everything(seed, workers=True, verbose=False)
    datamodule = instantiate(base_cfg.data)
    model = _instantiate_model(base_cfg, datamodule)
    start = time.time()
    pretrain(base_cfg, model, datamodule)
    print(f"seed {seed}: pretrained {base_cfg.pretrain.steps} steps in {time.time() - start:.0f} s", flush=True)
    state = (copy.deepcopy(model.state_dict()), datamodule.shuffle_generator.get_state(), torch.get_rng_state())
    results = {}
    for name in recipes:
        cfg = _config(name, overrides + [f"seed={seed}"])
        tuned = _instantiate_model(cfg, datamodule)
        tuned.load_state_dict(state[0])
        datamodule.shuffle_generator.set_state(state[1])
        torch.set_rng_state(state[2])
        callbacks = instantiate_group(cfg.get("callbacks"))
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
        start = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(tuned, datamodule=datamodule)
            summary = summarize(trainer, tuned, datamodule, callbacks, cfg.test_metric)
        summary["seconds"] = time.time() - start
        results[name] = summary
        print(f"  {name}: test bpc {summary['quantized_test_acc']:.4f}, {summary.get('stored_bits', 32):.2f} bits/weight, "
              f"{summary['seconds']:.0f} s", flush=True)  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (part of the measurement: see above)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every recipe, e.g. trainer.max_steps=50 (smoke runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipes = args.recipes if "lm_float" in args.recipes else ["lm_float", *args.recipes]
    runs = [run_seed(seed, recipes, args.overrides) for seed in args.seeds]
    control = [r["lm_float"]["quantized_test_acc"] for r in runs]
    print(f"\n{pydoc_fingerprint()}, {args.threads} torch thread(s)")
    print(f"float fine-tuned: {statistics.mean(control):.4f} bpc (seeds {args.seeds})")
    print("| recipe (experiment=) | bits/weight incl. scales | test bpc | Δ bpc vs float |" + (" per seed |" if len(runs) > 1 else ""))
    print("|---|---|---|---|" + ("---|" if len(runs) > 1 else ""))
    for name in recipes[1:]:
        bpc = [r[name]["quantized_test_acc"] for r in runs]
        bits = statistics.mean(r[name].get("stored_bits", 32.0) for r in runs)
        deltas = [b - c for b, c in zip(bpc, control)]
        per_seed = " " + ", ".join(f"{d:+.4f}" for d in deltas) + " |" if len(runs) > 1 else ""
        print(f"| {name} | {bits:.2f} | {statistics.mean(bpc):.4f} | {statistics.mean(deltas):+.4f} |{per_seed}")


if __name__ == "__main__":
    main()
