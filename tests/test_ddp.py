"""Distributed data parallel on the CPU (gloo, two processes): every rank tracks the same ranges."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qat_lightning import FakeLinearQuantization

ROOT = Path(__file__).resolve().parents[1]


def _track(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    fq = FakeLinearQuantization(8, "asymmetric_unsigned", ema_decay=0.5)
    for step in range(3):
        fq(torch.full((4,), float(rank + step)) * torch.tensor([1.0, -1.0, 0.5, 2.0]))  # ranks differ
    torch.save(fq.state_dict(), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_min_max_are_reduced_over_ranks_before_the_ema(tmp_path: Path) -> None:
    mp.spawn(_track, args=(_free_port(), str(tmp_path)), nprocs=2)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    single = FakeLinearQuantization(8, "asymmetric_unsigned", ema_decay=0.5)
    for step in range(3):  # the global min / max: -(1 + step) and 2 (1 + step)
        single(torch.tensor([-(1.0 + step), 2.0 * (1 + step)]))
    for key, value in single.state_dict().items():
        assert torch.equal(states[0][key], value), key


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("mode", ["ema", "lsq"])
def test_lightning_ddp_ranks_hold_identical_ranges_and_steps(tmp_path: Path, mode: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_run.py"), str(tmp_path), mode],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    steps = sorted({int(p.stem.split("step")[1]) for p in tmp_path.glob("rank0_step*.pt")})
    assert steps == [1, 2, 3, 4]  # 64 samples, batch 8, two ranks
    for step in steps:
        rank0 = torch.load(tmp_path / f"rank0_step{step}.pt", weights_only=True)
        rank1 = torch.load(tmp_path / f"rank1_step{step}.pt", weights_only=True)
        quant_keys = [k for k in rank0 if "fake_quant" in k]
        assert quant_keys
        for key in rank0:  # ranges, LSQ steps and weights alike
            assert torch.equal(rank0[key], rank1[key]), (step, key)
