"""Run by tests/test_ddp.py: two-process CPU DDP (gloo) fit with a callback; each rank saves its state.

    python tests/ddp_run.py OUT_DIR {ema,lsq}
"""
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qat_lightning import EMAFakeQuant  # noqa: E402
from tests.helpers import tiny_loader, tiny_model  # noqa: E402


class SaveState(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.out / f"rank{trainer.global_rank}_step{trainer.global_step}.pt")


def main() -> None:
    warnings.filterwarnings("ignore")
    out, mode = Path(sys.argv[1]), sys.argv[2]
    callback = EMAFakeQuant(learned_step=mode == "lsq", ema_decay=0.9)
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, SaveState(out)],
    )  # fmt: skip
    trainer.fit(tiny_model(), tiny_loader(n=64, batch_size=8))
    if torch.distributed.is_initialized():  # tear gloo down before exit: its threads abort the process otherwise
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
