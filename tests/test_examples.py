"""Examples run in a shortened form."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs() -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--epochs", "1", "--batches", "5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MB ->" in result.stdout and "bits/weight" in result.stdout


def test_readme_usage_matches_quickstart() -> None:
    source = (ROOT / "examples" / "quickstart.py").read_text()
    usage = source.split("# --8<-- [start:usage]\n")[1].split("# --8<-- [end:usage]")[0]
    readme = (ROOT / "README.md").read_text()
    body = [line for line in usage.splitlines() if line.strip()]
    for line in body:
        assert line.replace("args.epochs", "30").replace(", limit_train_batches=args.batches", "") in readme, line


def test_step_benchmark_smoke(tmp_path: Path) -> None:
    """Tiny sizes, no timing assertion: the benchmark runs and writes its JSON."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "benchmarks/step_overhead.py", "--steps", "4", "--warmup", "2", "--rounds", "1",
         "--hidden", "64", "64", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    data = json.loads(out.read_text())
    assert data["diffq_ratio"] > 0 and data["noise_floor_ratio"] >= 1


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_calibration_search_benchmark_smoke() -> None:
    result = _run("benchmarks/calibration_search.py", "--bins", "256", "--repeats", "1")
    assert result.stdout.count("(same)") == 3  # ours picks the reference's bin for all three methods


def test_adascale_evaluation_smoke(tmp_path: Path) -> None:
    import json

    out = tmp_path / "adascale.json"
    _run("benchmarks/adascale_eval.py", "--models", "mlp", "--epochs", "1", "--batches", "2", "--iterations", "3",
         "--bits", "4", "--samples", "4000", "--json", str(out))  # fmt: skip
    row = json.loads(out.read_text())["mlp"]
    assert "float" in row and {"round_to_nearest", "adascale", "blocks"} <= set(row["w4"])


def test_onnx_check_smoke(tmp_path: Path) -> None:
    import importlib.util

    import pytest

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        pytest.skip("onnx / onnxruntime not installed (extra qat-lightning[onnx])")
    result = _run("benchmarks/onnx_check.py", "--epochs", "1", "--out", str(tmp_path / "m.onnx"))
    assert "ONNX Runtime" in result.stdout and (tmp_path / "m.onnx").exists()


def test_benchmark_suite_smoke(tmp_path: Path) -> None:
    import json

    out = tmp_path / "suite.json"
    _run("benchmarks/run.py", "--smoke", "--models", "mlp", "--rounds", "1", "--steps", "3", "--warmup", "1", "--no-memory", "--json", str(out))
    entry = json.loads(out.read_text())["mlp"]
    assert {"diffq", "ema", "diffq_ema", "torch_ao"} <= set(entry["step_ratio"]) and entry["swap"]["val_batch_ms"] > 0


def test_char_lm_example_smoke() -> None:
    result = _run("examples/char_lm.py", "--smoke")
    assert "validation bits per character: float" in result.stdout and "bits/weight" in result.stdout


def test_plain_torch_example_smoke() -> None:
    result = _run("examples/plain_torch.py", "--epochs", "1", "--batches", "3")
    assert "fresh model loaded from it" in result.stdout and "(same as the quantized model)" in result.stdout


def test_sweep_report_example_smoke(tmp_path: Path) -> None:
    result = _run("examples/sweep_report.py", "--epochs", "1", "--penalties", "0,10", "--group-sizes", "8",
                  "--dir", str(tmp_path / "sweep"), "--extra", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
                  "data.num_samples=500")  # fmt: skip
    assert "2 configurations" in result.stdout and (tmp_path / "sweep" / "report.png").exists()


def test_llama_qat_example_smoke() -> None:
    result = _run("examples/llama_qat.py", "--smoke")
    table = result.stdout.split("| scheme |")[1]
    assert "int4_g32 + int8_per_token | 5.00 |" in table and "LSQ W4" in table and "DiffQ" in table


def test_diffq_lm_benchmark_smoke() -> None:
    result = _run("benchmarks/diffq_lm.py", "--recipes", "lm_diffq", "lm_lsq_w4", "--threads", "1", "pretrain.steps=2",
                  "trainer.max_steps=2", "data.val_windows=32", "data.test_windows=32", "model.layers=1")  # fmt: skip
    table = result.stdout.split("| recipe (experiment=) |")[1]
    assert "| lm_diffq |" in table and "| lm_lsq_w4 | 4.22 |" in table
    import platform

    from qat_lightning.demo.charlm import pydoc_text

    # which text the numbers were measured on: it changes between Python patch releases
    assert f"Python {platform.python_version()}, pydoc text {len(pydoc_text())} characters, sha256 " in result.stdout
    assert "characters, sha256 " in result.stdout and ", 1 torch thread(s)" in result.stdout  # and on how many threads


def test_grid_ops_benchmark_smoke() -> None:
    result = _run("benchmarks/grid_ops.py", "--rows", "16", "--cols", "64", "--repeats", "2")
    assert result.stdout.count("ratio") == 2 and "differ" in result.stdout
