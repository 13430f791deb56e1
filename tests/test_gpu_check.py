"""benchmarks/gpu_check.sh without a GPU: syntax, its time budget, and a dry run.

The script is meant for one command on a lent GPU machine (600 s at most per
command), so its stage limits must add up, kill grace included, to 8 minutes
or less, and a stage that fails or is cut short must still leave its files.
The dry run (``FASTNN_GPU_CHECK_DRY_RUN=1``: no pip install, no nvidia-smi on
PATH) runs every stage for real on this GPU-less machine, where each one must
fail fast and cleanly, writing what it is documented to write.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STAGES = ["env", "install", "jit", "pytest", "bench", "train"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def test_script_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_stage_limits_add_up_to_at_most_eight_minutes() -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "--budget"], capture_output=True, text=True,
                          timeout=30, env={k: v for k, v in os.environ.items()
                                           if not k.startswith("T_")})
    assert proc.returncode == 0, proc.stderr
    lines = [ln.split() for ln in proc.stdout.splitlines()]
    limits = {ln[1]: int(ln[2]) for ln in lines if ln[0] == "stage"}
    grace = next(int(ln[1]) for ln in lines if ln[0] == "kill_grace")
    total = next(int(ln[1]) for ln in lines if ln[0] == "total")
    assert list(limits) == STAGES
    assert all(v > 0 for v in limits.values()), limits
    assert total == sum(limits.values()) + grace * len(limits)
    assert total <= 480, f"{limits} + {grace} s grace each = {total} s > 8 minutes"


def test_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_dry_run_without_gpu_fails_fast_and_writes_every_stage(tmp_path: Path) -> None:
    # PATH without nvidia-smi, so the env stage takes its "not found" branch.
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not (Path(d) / "nvidia-smi").exists())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("T_", "NUMBA_"))}
    env.update(PATH=path, PYTHON=sys.executable, FASTNN_GPU_CHECK_DRY_RUN="1",
               FASTNN_DATA_DIR=str(tmp_path / "no-mnist"), OUT=str(tmp_path / "ignored"))
    out = tmp_path / "results"
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True,
                          env=env, timeout=400, cwd=tmp_path)
    elapsed = time.monotonic() - start
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-4000:]
    assert not (tmp_path / "ignored").exists(), "the first argument must win over $OUT"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] is True
    assert [s["stage"] for s in summary["stages"]] == STAGES
    assert summary["install_mode"] == "source-tree"
    assert summary["failed"] == STAGES, summary  # no GPU: nothing can pass
    for s in summary["stages"]:
        # Failed on its own, not stopped by its time limit.
        assert s["rc"] not in (124, 137) and s["seconds"] < s["limit_s"], s

    for name in STAGES:
        assert (out / f"{name}.log").stat().st_size > 0, name
    assert "nvidia-smi: not found" in (out / "env.log").read_text()
    assert "dry run: pip install skipped" in (out / "install.log").read_text()
    jit = json.loads((out / "jit.json").read_text())
    assert "no GPU runtime" in jit["error"] and "nvvm" in jit, jit
    assert "no gpu test ran" in (out / "pytest.log").read_text()
    bench = json.loads((out / "bench_gpu.json").read_text())
    assert bench["complete"] is False and bench["error"], bench
    assert "not found" in (out / "train.log").read_text()
    gpu_log = (out / "gpu_check.log").read_text()
    assert "=== FAILED stages:" in gpu_log and str(out) in gpu_log
    stage_secs = [(s["stage"], s["seconds"]) for s in summary["stages"]]
    print(f"dry run: {elapsed:.0f} s, stages {stage_secs}")
