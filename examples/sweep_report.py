"""A Hydra sweep over DiffQ's penalty and group size, then the size / accuracy report.

Runs ``python -m qat_lightning.train -m callbacks.diffq.penalty=... callbacks.diffq.group_size=...``
(Hydra's basic launcher: one run after the other; add ``hydra/launcher=joblib`` to run them in
parallel), then ``python -m qat_lightning.report <sweep dir>``, which writes report.csv and
report.png (accuracy vs true size, Pareto frontier) into the sweep directory.

    python examples/sweep_report.py [--epochs 30] [--penalties 0,0.3,1,3,10] [--group-sizes 8,16]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from qat_lightning import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--penalties", default="0,0.3,1,3,10")
    parser.add_argument("--group-sizes", default="8,16")
    parser.add_argument("--dir", default=f"multirun/sweep_{time.strftime('%Y%m%d_%H%M%S')}")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides, e.g. trainer.limit_train_batches=5")
    args = parser.parse_args()
    sweep = [sys.executable, "-m", "qat_lightning.train", "-m", f"callbacks.diffq.penalty={args.penalties}",
             f"callbacks.diffq.group_size={args.group_sizes}", f"trainer.max_epochs={args.epochs}",
             "trainer.enable_progress_bar=false", f"hydra.sweep.dir={args.dir}", *args.extra]  # fmt: skip
    print("$", " ".join(sweep[1:]), flush=True)
    subprocess.run(sweep, check=True)
    report.main([args.dir])
    print(f"open {Path(args.dir) / 'report.png'}")


if __name__ == "__main__":
    main()
