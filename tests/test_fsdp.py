"""FSDP2 (Lightning's ``ModelParallelStrategy`` with ``fully_shard``) on the CPU, gloo, two processes:
the training callbacks quantize the gathered full tensors in each forward, so every step equals a
DDP run of the same batches (tests/fsdp_run.py)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, mode: str, strategy: str, *part: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fsdp_run.py"), str(out), mode, strategy, *part],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def format_and_lsq_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both modes trained in one launch per strategy (two processes each)."""
    out = tmp_path_factory.mktemp("fsdp_modes")
    _run(out, "int4_ema,lsq,diffq", "fsdp2")
    _run(out, "int4_ema,lsq,diffq", "ddp")
    return out


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("mode", ["int4_ema", "lsq", "diffq"])
def test_fsdp2_trains_like_ddp_with_the_same_batches(format_and_lsq_runs: Path, mode: str) -> None:
    """Per-step losses, validation on the quantized weights, the whole final state (weights, EMA
    ranges, LSQ steps, DiffQ bits on the reference grid) and the plain quantized state dict equal
    DDP's; both FSDP2 ranks gather the same state."""
    fsdp = [torch.load(format_and_lsq_runs / f"{mode}_fsdp2_rank{r}.pt", weights_only=True) for r in range(2)]
    ddp = torch.load(format_and_lsq_runs / f"{mode}_ddp_rank0.pt", weights_only=True)
    assert len(fsdp[0]["losses"]) == 4 and len(fsdp[0]["val_losses"]) == 2
    assert fsdp[0]["losses"] == pytest.approx(ddp["losses"], rel=1e-4, abs=0)
    assert fsdp[0]["val_losses"] == pytest.approx(ddp["val_losses"], rel=1e-4, abs=0)
    assert set(fsdp[0]["state"]) == set(ddp["state"])
    for key, value in ddp["state"].items():
        assert torch.allclose(fsdp[0]["state"][key].float(), value.float(), rtol=1e-4, atol=1e-6), key
        assert torch.equal(fsdp[0]["state"][key], fsdp[1]["state"][key]), key
    # the plain quantized state dict (save_pretrained after QAT), gathered from the shards
    assert set(fsdp[0]["plain"]) == set(ddp["plain"]) and not any("fake_quant" in k or k.endswith("_diffq") for k in ddp["plain"])
    for key, value in ddp["plain"].items():
        assert torch.allclose(fsdp[0]["plain"][key], value, rtol=1e-4, atol=1e-6), key
    if mode == "lsq":  # initialised in the first forward, on the gathered copies: written back to the shards
        steps = [k for k in ddp["state"] if k.endswith(".step")]
        assert steps and all(not torch.all(fsdp[0]["state"][k] == 1) for k in steps)



@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_fsdp2_diffq_equals_ddp_and_its_distributed_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    """DiffQ on per-channel ranges with a clipping search and a straight-through last quarter (its
    noise generator's state, the sharded bits) with LSQ activations (EMA ranges, sharded steps), two
    epochs: equal to DDP (losses, state, the packed file written from the
    shards); and the distributed checkpoint (a folder of shards) the run wrote after its first epoch,
    a second epoch from it in new processes: the losses and the whole state of the uninterrupted run."""
    for part in ("full", "resume"):
        _run(tmp_path, "stack", "fsdp2", part)
    _run(tmp_path, "stack", "ddp", "full")
    fsdp, ddp = (torch.load(tmp_path / f"{tag}full_rank0.pt", weights_only=True) for tag in ("fsdp2", "ddp"))
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-4, abs=0)
    assert fsdp["val_losses"] == pytest.approx(ddp["val_losses"], rel=1e-4, abs=0) and len(ddp["val_losses"]) == 2
    for key, value in ddp["state"].items():
        assert torch.allclose(fsdp["state"][key].float(), value.float(), rtol=1e-4, atol=1e-6), key
    for key, value in ddp["plain"].items():  # the plain model: DiffQ's quantized weights, gathered
        assert torch.allclose(fsdp["plain"][key], value, rtol=1e-4, atol=1e-6), key
    from safetensors.torch import load_file

    ours, reference = load_file(tmp_path / "fsdp2.safetensors"), load_file(tmp_path / "ddp.safetensors")
    assert set(ours) == set(reference) and all(torch.equal(ours[k], reference[k]) for k in reference)
    checkpoint = tmp_path / "checkpoints" / "epoch0.ckpt"
    assert checkpoint.is_dir() and any(checkpoint.glob("*.distcp"))
    full, resumed = (torch.load(tmp_path / f"fsdp2{part}_rank0.pt", weights_only=True) for part in ("full", "resume"))
    assert len(full["losses"]) == 8 and len(resumed["losses"]) == 4 and full["losses"][:4] + resumed["losses"] == full["losses"]
    for key, value in full["state"].items():
        assert torch.equal(resumed["state"][key], value), key
