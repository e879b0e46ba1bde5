"""Run by tests/test_resume.py: a seeded CPU fit with DiffQ + EMAFakeQuant, an end-of-epoch
checkpoint (last.ckpt) and CSV metrics. ``--pause-at N`` writes OUT/paused after global step N and
sleeps (for the test to SIGKILL it); ``--resume`` continues from OUT/ckpt/last.ckpt.

    python tests/resume_run.py OUT_DIR [--epochs 3] [--pause-at 6] [--resume]
"""
import argparse
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qat_lightning import DiffQ, EMAFakeQuant  # noqa: E402
from tests.helpers import tiny_loader, tiny_model  # noqa: E402


class PauseAt(pl.Callback):
    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            self.marker.write_text(str(self.step))
            time.sleep(600)  # killed here, mid-epoch


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pause-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    callbacks = [
        DiffQ(min_size=0, exclude=["*.bias"], penalty=5.0, bits_lr=0.05),  # noise seed drawn from the global seed
        EMAFakeQuant(weights=False, ema_decay=0.9),
        ModelCheckpoint(dirpath=args.out / "ckpt", save_last=True, every_n_epochs=1),
    ]
    if args.pause_at is not None:
        callbacks.append(PauseAt(args.pause_at, args.out / "paused"))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=CSVLogger(args.out, name="logs", version=0),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
        callbacks=callbacks,
    )  # fmt: skip
    model = tiny_model()
    trainer.fit(model, tiny_loader(n=64, batch_size=16), tiny_loader(n=32, batch_size=16, seed=1),
                ckpt_path=args.out / "ckpt" / "last.ckpt" if args.resume else None)  # fmt: skip
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, args.out / "final.pt")
    torch.save({k: float(v) for k, v in trainer.callback_metrics.items()}, args.out / "metrics.pt")


if __name__ == "__main__":
    main()
