"""Run by tests/test_ddp.py: a CPU fit with the callbacks of one mode, saving the LightningModule's
state after every step; two-process DDP (gloo, batch 8 per rank) or, with ``single``, one process
with the same global batch of 16.

    python tests/ddp_run.py OUT_DIR {ema,lsq,stack,diffq,adascale} [single]
"""
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qat_lightning import AdaScale, DiffQ, EMAFakeQuant, HistogramCalibration, Rescaling  # noqa: E402
from tests.helpers import tiny_loader, tiny_model  # noqa: E402


class SaveState(pl.Callback):
    def __init__(self, out: Path, tag: str) -> None:
        self.out, self.tag = out, tag

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        for callback in trainer.callbacks:  # the noise generator: the same seed and state on every rank
            if isinstance(callback, DiffQ):
                state.update({f"noise_rng/{k}": v.clone() for k, v in callback.quantizer.noise_rng_state().items()})
        torch.save(state, self.out / f"{self.tag or f'rank{trainer.global_rank}'}_step{trainer.global_step}.pt")


class Reseed(pl.Callback):
    """Lightning's DDP re-seeds every rank from ``seed_everything``'s seed when it sets up its
    environment, after the model is built; the one-process run does the same here, so that
    ``DiffQ(seed=None)`` draws its noise seed from the same global RNG state in both runs."""

    def setup(self, trainer, pl_module, stage) -> None:  # noqa: ANN001
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()


class Interleaved(torch.utils.data.Sampler):
    """Rank r of w reads samples r, r + w, r + 2w, ...: its batch k and the other ranks' batch k
    together are exactly batch k of one process with a w times larger batch."""

    def __init__(self, n: int) -> None:
        self.n = n

    def _shard(self) -> range:
        if torch.distributed.is_initialized():
            return range(torch.distributed.get_rank(), self.n, torch.distributed.get_world_size())
        return range(self.n)

    def __iter__(self):  # noqa: ANN204
        return iter(self._shard())

    def __len__(self) -> int:
        return len(self._shard())


def callbacks(mode: str) -> list[pl.Callback]:
    if mode == "stack":  # every callback that trains: DiffQ weights, 8-bit activations, calibrated ranges, SmoothQuant
        return [DiffQ(min_size=0, exclude=["*.bias"], penalty=5.0, bits_lr=0.05, seed=0), EMAFakeQuant(weights=False, ema_decay=0.9),
                Rescaling(num_batches=1), HistogramCalibration(method="max", num_batches=1, weights=False)]  # fmt: skip
    if mode == "diffq":  # seed=None: the noise seed comes from the global seed, alike on every rank
        return [DiffQ(min_size=0, exclude=["*.bias"], penalty=5.0, bits_lr=0.05)]
    if mode == "adascale":  # post-training weights, then fine-tuning on the frozen grid with 8-bit activations
        return [AdaScale(bits=4, num_batches=2, num_iterations=5, progress=False), EMAFakeQuant(weights=False, ema_decay=0.9)]
    return [EMAFakeQuant(learned_step=mode == "lsq", ema_decay=0.9)]


def main() -> None:
    warnings.filterwarnings("ignore")
    out, mode = Path(sys.argv[1]), sys.argv[2]
    single = len(sys.argv) > 3 and sys.argv[3] == "single"
    pl.seed_everything(0, verbose=False)
    devices = {"devices": 1} if single else {"strategy": "ddp", "devices": 2}
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[*([Reseed()] if single else []), *callbacks(mode), SaveState(out, "single" if single else "")],
        use_distributed_sampler=False, **devices,
    )  # fmt: skip
    dataset = tiny_loader(n=64).dataset
    trainer.fit(tiny_model(), torch.utils.data.DataLoader(dataset, batch_size=16 if single else 8, sampler=Interleaved(64)))
    if torch.distributed.is_initialized():  # tear gloo down before exit: its threads abort the process otherwise
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
