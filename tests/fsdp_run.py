"""Run by tests/test_fsdp.py: two CPU processes (gloo), batch 8 per rank, the callbacks of one mode,
either FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard`` of every Linear and of the
network in ``configure_model``) or DDP. Each rank saves its per-step losses and, at the end of
training, the whole state (FSDP2's shards gathered).

    python tests/fsdp_run.py OUT_DIR {int4_ema,lsq,diffq,stack} {fsdp2,ddp} [{full,half,resume}]

``full``: two epochs; ``half``: the first, ending with a (distributed) checkpoint; ``resume``: the
second, from that checkpoint.
"""
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qat_lightning import DiffQ, EMAFakeQuant  # noqa: E402
from qat_lightning.demo import MLP, Classifier  # noqa: E402
from tests.ddp_run import Interleaved  # noqa: E402
from tests.helpers import tiny_loader  # noqa: E402


class Sharded(Classifier):
    """The tiny classifier of the other tests; under ModelParallelStrategy its Linears and its
    network are sharded with FSDP2."""

    def configure_model(self) -> None:
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.net.modules():
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class Record(pl.Callback):
    def __init__(self, out: Path, tag: str) -> None:
        self.out, self.tag, self.losses, self.val_losses = out, tag, [], []

    def on_validation_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.val_losses.append(float(trainer.callback_metrics["val/loss"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        state = {}
        for key, value in pl_module.state_dict().items():  # every rank: the gathers are collective
            value = value.full_tensor() if type(value).__name__ == "DTensor" else value
            state[key] = value.detach().clone()
        from qat_lightning.export import quantized_state_dict

        quantizer = next(c for c in trainer.callbacks if isinstance(c, (DiffQ, EMAFakeQuant))).quantizer
        plain = quantized_state_dict(quantizer)  # the plain, quantized model: gathered on every rank
        torch.save({"losses": self.losses, "val_losses": self.val_losses, "state": state, "plain": plain}, self.out / f"{self.tag}_rank{trainer.global_rank}.pt")


def callbacks(mode: str, out: Path, tag: str) -> list[pl.Callback]:
    if mode == "diffq":
        return [DiffQ(min_size=0, exclude=["*.bias"], penalty=5.0, bits_lr=0.05, seed=0, export_path=str(out / f"{tag}.safetensors"))]
    if mode == "stack":  # DiffQ's weights on per-channel ranges (noise generator, bits, the straight-through
        # phase for the last 2 of 8 steps), LSQ activations (EMA ranges, steps)
        return [DiffQ(min_size=0, exclude=["*.bias"], penalty=5.0, bits_lr=0.05, seed=0, export_path=str(out / f"{tag}.safetensors"),
                      scale="channel", range_search=4, straight_through_fraction=0.25),
                EMAFakeQuant(weights=False, learned_step=True)]  # fmt: skip
    if mode == "int4_ema":  # a number format for the weights, Distiller's EMA ranges for the activations
        return [EMAFakeQuant(weight_format="int4_g16", ema_decay=0.9)]
    return [EMAFakeQuant(learned_step=True, ema_decay=0.9)]  # lsq


def main() -> None:
    """``fsdp_run.py OUT MODES TAG [PART]``: MODES comma-separated, trained one after the other in
    the same two processes (one launch); PART ``full`` (two epochs; FSDP2 also writes a distributed
    checkpoint after each) or ``resume`` (the second epoch from the first one's checkpoint)."""
    warnings.filterwarnings("ignore")
    out, modes, tag = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
    part = sys.argv[4] if len(sys.argv) > 4 else ""
    for mode in modes:
        train(out, mode, tag, part, prefix=f"{mode}_" if len(modes) > 1 else "")
    if torch.distributed.is_initialized():  # tear gloo down before exit: its threads abort the process otherwise
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def train(out: Path, mode: str, tag: str, part: str, prefix: str) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0, verbose=False)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if tag == "fsdp2" else "ddp"
    saving = part == "full" and tag == "fsdp2"
    extra = [ModelCheckpoint(dirpath=out / "checkpoints", filename="epoch{epoch}", auto_insert_metric_name=False,
                             save_top_k=-1, every_n_epochs=1)] if saving else []  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=2 if part in ("full", "resume") else 1, logger=False,
        enable_checkpointing=saving, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*callbacks(mode, out, prefix + tag), Record(out, prefix + tag + part), *extra],
        use_distributed_sampler=False, default_root_dir=str(out), val_check_interval=2 if not part else 1.0, limit_val_batches=2, num_sanity_val_steps=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Sharded(MLP(in_features=16, hidden=(32,), num_classes=8), num_classes=8)
    dataset = tiny_loader(n=64).dataset
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=Interleaved(64))
    checkpoint = out / "checkpoints" / "epoch0.ckpt" if part == "resume" else None
    trainer.fit(model, loader, loader, ckpt_path=str(checkpoint) if checkpoint else None)


if __name__ == "__main__":
    main()
