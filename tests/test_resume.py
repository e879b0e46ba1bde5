"""Crash and resume: a run killed with SIGKILL mid-epoch and resumed from its last checkpoint ends
exactly where an uninterrupted run ends."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "tests" / "resume_run.py")


def _run(*args: str) -> None:
    result = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    _run(str(whole))
    process = subprocess.Popen([sys.executable, SCRIPT, str(crashed), "--pause-at", "6"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (crashed / "paused").exists():  # step 6: two batches into the second epoch (4 per epoch)
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before pausing"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not (crashed / "final.pt").exists() and (crashed / "ckpt" / "last.ckpt").exists()
    saved = torch.load(crashed / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4 and "noise_rng" in saved["callbacks"]["DiffQ"]

    _run(str(crashed), "--resume")
    expected = torch.load(whole / "final.pt", weights_only=True)
    got = torch.load(crashed / "final.pt", weights_only=True)
    assert set(got) == set(expected) and any(k.endswith("_diffq") for k in got) and any("fake_quant" in k for k in got)
    for key in expected:  # weights, bits, EMA buffers: bit for bit
        assert torch.equal(got[key], expected[key]), key
    assert torch.load(crashed / "metrics.pt") == torch.load(whole / "metrics.pt")


def test_checkpoint_written_during_quantized_validation_holds_the_float_weights(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from qat_lightning import DiffQ

    from .helpers import tiny_loader, tiny_model, tiny_trainer

    class SaveInsideValidation(pl.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
            self.quantized = pl_module.net[0].weight.detach().clone()  # what validation runs on
            trainer.save_checkpoint(tmp_path / "inside.ckpt")

    saver = SaveInsideValidation()
    diffq = DiffQ(min_size=0, exclude=["*.bias"])
    model = tiny_model()
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[diffq, saver], limit_val_batches=1)
    trainer.fit(model, tiny_loader(), tiny_loader(seed=1))
    saved = torch.load(tmp_path / "inside.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(saved["net.0.weight"], model.net[0].weight.detach())  # float, as restored after validation
    assert not torch.equal(saved["net.0.weight"], saver.quantized)
