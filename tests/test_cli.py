"""The ``fastnn`` command line: train/evaluate smoke runs in subprocesses, an
interrupted run resumed, one-line errors, ``config`` and ``bench`` delegation."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import PKG_ROOT

import fastnn
from fastnn import checkpoint as ckpt
from fastnn.cli import main

REPO = Path(__file__).resolve().parents[1]
NATIVE = "cpu" in fastnn.available_backends()
DEVICE = "cpu" if NATIVE else "numpy"
# The NumPy reference is slow; keep the smoke run short when it is all there is.
SMOKE_TRAIN = 2000 if NATIVE else 1000


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


@pytest.fixture
def cli_env(mnist_dir: Path, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(PKG_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        FASTNN_DATA_DIR=str(mnist_dir),
        XDG_CACHE_HOME=str(tmp_path / "xdg"),
        # Belt and braces: if anything tried to download, it would hit a dead local port.
        FASTNN_MNIST_MIRRORS=_closed_port_url(),
    )
    env.pop("FASTNN_DEBUG", None)
    return env


def run_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastnn", *args],
        env=env,
        cwd=PKG_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.mnist
def test_train_then_evaluate(cli_env: dict[str, str], tmp_path: Path) -> None:
    ck, metrics = tmp_path / "seed.npz", tmp_path / "m.json"
    r = run_cli(
        cli_env,
        "train",
        "--model",
        "seed",
        "--device",
        DEVICE,
        "--epochs",
        "1",
        "--limit-train",
        str(SMOKE_TRAIN),
        "--limit-test",
        "500",
        "--batch-size",
        "64",
        "--checkpoint",
        str(ck),
        "--metrics-json",
        str(metrics),
    )
    assert r.returncode == 0, r.stderr
    assert "epoch   1/1" in r.stdout and "img/s" in r.stdout
    for row in (
        "precision",
        "recall",
        "f1-score",
        "support",
        "accuracy",
        "macro avg",
        "weighted avg",
    ):
        assert row in r.stdout
    assert "\r" not in r.stderr, "no progress bar when not on a terminal"

    doc = json.loads(metrics.read_text())
    (epoch,) = doc["epochs"]
    assert {"epoch", "train_loss", "test_accuracy", "seconds", "images_per_second"} <= set(epoch)
    assert epoch["epoch"] == 1 and epoch["test_images"] == 500
    assert epoch["test_accuracy"] > 0.6, "one epoch on a subset must learn well above chance"
    assert epoch["images_per_second"] == pytest.approx(SMOKE_TRAIN / epoch["seconds"], rel=1e-6)

    meta = ckpt.load(ck).metadata
    assert meta["model"] == "seed" and meta["epoch"] == 1 and meta["seed"] == 0
    assert meta["optimizer"]["name"] == "adam" and meta["config"]["lr"] == 1e-3
    assert meta["config"]["schedule"] == "cosine"  # the default: decays to 0 over the run
    assert meta["fastnn_version"] == fastnn.__version__
    assert meta["metrics"]["epochs"][0]["test_accuracy"] == epoch["test_accuracy"]

    r = run_cli(
        cli_env, "evaluate", "--checkpoint", str(ck), "--device", DEVICE, "--limit-test", "500"
    )
    assert r.returncode == 0, r.stderr
    assert f"test accuracy {100 * epoch['test_accuracy']:.2f}%" in r.stdout
    lines = r.stdout.splitlines()
    start = lines.index("confusion matrix (rows: true, columns: predicted)")
    rows = [list(map(int, ln.split()[1:])) for ln in lines[start + 2 : start + 12]]
    assert len(rows) == 10 and all(len(row) == 10 for row in rows)
    assert sum(map(sum, rows)) == 500
    assert sum(rows[i][i] for i in range(10)) == round(500 * epoch["test_accuracy"])


@pytest.mark.mnist
def test_interrupted_run_resumes(cli_env: dict[str, str], tmp_path: Path) -> None:
    ck, metrics = tmp_path / "run.npz", tmp_path / "m.json"
    common = [
        "--device",
        DEVICE,
        "--limit-train",
        "256",
        "--limit-test",
        "100",
        "--batch-size",
        "64",
        "--checkpoint",
        str(ck),
        "--metrics-json",
        str(metrics),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastnn", "train", "--epochs", "50", *common],
        env=cli_env,
        cwd=PKG_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ck.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ck.exists(), "no checkpoint after the first epoch"
        proc.send_signal(signal.SIGINT)  # Ctrl-C in the middle of a later epoch
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err

    done = ckpt.load(ck).metadata["epoch"]  # the checkpoint survived the interruption
    assert 1 <= done < 50
    before = json.loads(metrics.read_text())["epochs"]
    assert [e["epoch"] for e in before] == list(range(1, done + 1))

    r = run_cli(cli_env, "train", "--epochs", str(done + 1), "--resume", *common)
    assert r.returncode == 0, r.stderr
    assert f"resuming seed from {ck} at epoch {done}/{done + 1}" in r.stdout
    after = json.loads(metrics.read_text())["epochs"]
    assert [e["epoch"] for e in after] == list(range(1, done + 2))
    assert after[:done] == before, "earlier epochs' metrics carry over unchanged"
    assert ckpt.load(ck).metadata["epoch"] == done + 1


@pytest.mark.mnist
def test_corrupt_checkpoint_is_one_line_error(cli_env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a whole zip file")
    for args in (
        ["evaluate", "--checkpoint", str(bad), "--device", DEVICE],
        ["train", "--device", DEVICE, "--checkpoint", str(bad), "--resume"],
    ):
        r = run_cli(cli_env, *args)
        assert r.returncode == 1
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastnn: error: ")
        assert str(bad) in lines[0] and "corrupt" in lines[0]


def test_config_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "version" in out and fastnn.__version__ in out and "backends" in out


def test_python_dash_m_runs(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(PKG_ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "fastnn", "--help"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0
    for cmd in ("train", "evaluate", "config", "bench"):
        assert cmd in r.stdout


def test_bench_is_delegated(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    fake = types.ModuleType("fastnn.bench.cli")
    fake.main = lambda argv=None: calls.append(argv) or 7
    monkeypatch.setitem(sys.modules, "fastnn.bench.cli", fake)
    assert main(["bench", "--quick", "--ops", "matmul"]) == 7
    assert calls == [["--quick", "--ops", "matmul"]]


def test_bad_options_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["train", "--epochs", "0"],
        ["train", "--device", "tpu"],
        ["train", "--lr", "-1"],
        ["evaluate"],
        [],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    capsys.readouterr()
    assert main(["train", "--resume"]) == 1
    assert capsys.readouterr().err.strip() == "fastnn: error: --resume needs --checkpoint PATH"


def test_offline_without_data_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("FASTNN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("FASTNN_MNIST_MIRRORS", _closed_port_url())
    code = main(["train", "--device", "numpy", "--data-dir", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "fastnn: error: could not download" in err
    assert "--data-dir" in err and "FASTNN_DATA_DIR" in err
