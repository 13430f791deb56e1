"""Kill-safety of training, checkpoints and data files, through the real CLI.

* ``python -m fastnn train`` killed mid-epoch (SIGINT or SIGKILL) never loses the
  checkpoint of the last finished epoch, and ``--resume`` continues from it.
* SIGKILL at random moments of a run that checkpoints many times per second
  (so some kills land inside a save) always leaves a loadable checkpoint whose
  epoch never goes backwards.
* Loading a checkpoint never unpickles: a crafted ``.npz`` holding an object
  array whose unpickling would create a file is rejected with a clear error and
  the file is not created.
* A truncated, bit-flipped, empty or foreign checkpoint, and a truncated or
  corrupt MNIST file, give one ``fastnn: error: ...`` line on stderr, a non-zero
  exit status and no traceback.

Every subprocess has a timeout, so a hang fails the test instead of blocking.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import PKG_ROOT

from fastnn import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
HAVE_CLI = importlib.util.find_spec("fastnn.cli") is not None

pytestmark = [
    pytest.mark.mnist,
    pytest.mark.skipif(not HAVE_CLI, reason="fastnn.cli is not there yet (owned by helper E)"),
]


def _device() -> str:
    import fastnn

    return "cpu" if "cpu" in fastnn.available_backends() else "numpy"


DEVICE = _device()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


@pytest.fixture
def env(mnist_dir: Path, tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.update(
        PYTHONPATH=str(PKG_ROOT) + os.pathsep + e.get("PYTHONPATH", ""),
        FASTNN_DATA_DIR=str(mnist_dir),
        XDG_CACHE_HOME=str(tmp_path / "xdg"),  # never fall back to a user cache
        FASTNN_MNIST_MIRRORS=_closed_port_url(),  # and never download
        OMP_NUM_THREADS="1",  # this 2-core machine is shared
    )
    e.pop("FASTNN_DEBUG", None)
    return e


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastnn", *args],
        env=env, cwd=PKG_ROOT, capture_output=True, text=True, timeout=timeout,
    )


def start(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fastnn", *args],
        env=env, cwd=PKG_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def stop(proc: subprocess.Popen, sig: int, timeout: float = 60) -> tuple[str, str]:
    try:
        proc.send_signal(sig)
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for(pred, proc: subprocess.Popen, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"training exited ({proc.returncode}) before {what}: {err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0, f"expected failure, got 0; stdout: {r.stdout[-500:]}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{r.stderr}"
    assert lines[0].startswith("fastnn: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def ckpt_epoch(path: Path) -> int:
    return int(ckpt.load(path).metadata["epoch"])


# --------------------------------------------------------------------------
# killed mid-epoch, then resumed
# --------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_killed_mid_epoch_keeps_checkpoint_and_resumes(env, tmp_path: Path, sig: int) -> None:
    ck = tmp_path / "run.npz"
    # Big enough that an epoch takes a while, so the signal lands mid-epoch.
    common = ["--device", DEVICE, "--limit-train", "1024", "--limit-test", "64",
              "--batch-size", "32", "--checkpoint", str(ck), "--no-progress"]
    proc = start(env, "train", "--epochs", "1000", *common)
    wait_for(ck.exists, proc, what="the first checkpoint")
    first = ckpt_epoch(ck)
    time.sleep(0.2)  # now inside the next epoch
    _, err = stop(proc, sig)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "Traceback" not in err and "interrupted" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    done = ckpt_epoch(ck)  # the finished epoch's checkpoint still loads
    assert first <= done < 1000

    r = cli(env, "train", "--epochs", str(done + 1), "--resume", *common)
    assert r.returncode == 0, r.stderr
    assert f"at epoch {done}/{done + 1}" in r.stdout
    assert ckpt_epoch(ck) == done + 1


def test_sigkill_storm_never_corrupts_checkpoint(env, tmp_path: Path) -> None:
    """Tiny epochs checkpoint many times a second; random SIGKILLs hit some saves."""
    ck = tmp_path / "storm.npz"
    common = ["--device", DEVICE, "--limit-train", "32", "--limit-test", "16",
              "--batch-size", "32", "--checkpoint", str(ck), "--no-progress"]
    rng = np.random.default_rng(7)
    last = 0
    for round_ in range(4):
        resume = ["--resume"] if ck.exists() else []
        mtime = ck.stat().st_mtime_ns if ck.exists() else None
        proc = start(env, "train", "--epochs", "100000", *resume, *common)
        # Wait until this process has written at least one checkpoint itself.
        wait_for(lambda m=mtime: ck.exists() and ck.stat().st_mtime_ns != m, proc,
                 what=f"a checkpoint in round {round_}")
        time.sleep(float(rng.uniform(0.0, 0.4)))
        stop(proc, signal.SIGKILL)
        epoch = ckpt_epoch(ck)  # must load: the rename is atomic
        assert epoch >= max(last, 1), f"checkpoint went back from epoch {last} to {epoch}"
        last = epoch
    # The last state resumes and trains one more epoch.
    r = cli(env, "train", "--epochs", str(last + 1), "--resume", *common)
    assert r.returncode == 0, r.stderr
    assert ckpt_epoch(ck) == last + 1


# --------------------------------------------------------------------------
# checkpoints never execute code; corrupt ones are one-line errors
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, mnist_dir: Path) -> Path:
    """A real one-epoch checkpoint (module-scoped: trained once)."""
    d = tmp_path_factory.mktemp("good")
    e = dict(os.environ, PYTHONPATH=str(PKG_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
             FASTNN_DATA_DIR=str(mnist_dir), XDG_CACHE_HOME=str(d / "xdg"),
             FASTNN_MNIST_MIRRORS=_closed_port_url(), OMP_NUM_THREADS="1")
    e.pop("FASTNN_DEBUG", None)
    path = d / "good.npz"
    r = cli(e, "train", "--device", DEVICE, "--epochs", "1", "--limit-train", "64",
            "--limit-test", "32", "--batch-size", "32", "--checkpoint", str(path),
            "--no-progress")
    assert r.returncode == 0, r.stderr
    return path


class _CreatesFile:
    """Unpickling this creates ``path`` (what a malicious checkpoint would do)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _npz_with_object_array(src: Path, dst: Path, marker: Path) -> None:
    """Copy checkpoint ``src`` to ``dst`` with one array replaced by a pickled object array."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    victim = next(k for k in arrays if not k.startswith("__"))
    arrays[victim] = np.array([_CreatesFile(marker)], dtype=object)
    np.savez(dst, **arrays)  # np.savez pickles object arrays


def test_object_array_checkpoint_is_rejected_without_unpickling(
    env, tmp_path: Path, good_checkpoint: Path
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.npz"
    _npz_with_object_array(good_checkpoint, evil, marker)
    # Sanity: the payload is live, i.e. allow_pickle=True would run it.
    with zipfile.ZipFile(evil) as z:
        assert any(b"pwned" in z.read(n) for n in z.namelist())

    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load(evil)
    assert str(evil) in str(info.value)
    assert "\n" not in str(info.value)
    assert not marker.exists(), "loading a checkpoint executed pickled code"

    for args in (["evaluate", "--checkpoint", str(evil), "--device", DEVICE],
                 ["train", "--device", DEVICE, "--checkpoint", str(evil), "--resume"]):
        assert_one_line_error(cli(env, *args), str(evil))
        assert not marker.exists(), "the CLI executed pickled code"


def test_plain_pickle_named_npz_is_rejected(env, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "pickle.npz"
    evil.write_bytes(pickle.dumps(_CreatesFile(marker)))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(evil)
    assert_one_line_error(cli(env, "evaluate", "--checkpoint", str(evil), "--device", DEVICE),
                          str(evil))
    assert not marker.exists()


def _corruptions(data: bytes) -> dict[str, bytes]:
    mid = len(data) // 2
    flipped = bytearray(data)
    flipped[mid] ^= 0xFF
    # A data byte of the first array member (CRC must catch it).
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if not i.filename.startswith("__"))
    off = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 128 + 1
    in_member = bytearray(data)
    in_member[min(off, len(data) - 1)] ^= 0x01
    return {
        "empty": b"",
        "truncated_1_byte": data[:-1],
        "truncated_half": data[:mid],
        "truncated_header": data[:10],
        "bit_flip_middle": bytes(flipped),
        "bit_flip_in_array": bytes(in_member),
        "not_a_zip": b"hello, world\n" * 10,
    }


@pytest.mark.parametrize("kind", ["empty", "truncated_1_byte", "truncated_half",
                                  "truncated_header", "bit_flip_middle", "bit_flip_in_array",
                                  "not_a_zip"])
def test_corrupt_checkpoint_is_one_line_error(env, tmp_path: Path, good_checkpoint: Path,
                                              kind: str) -> None:
    bad = tmp_path / f"{kind}.npz"
    bad.write_bytes(_corruptions(good_checkpoint.read_bytes())[kind])
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(bad)
    assert_one_line_error(cli(env, "evaluate", "--checkpoint", str(bad), "--device", DEVICE),
                          str(bad))
    if kind in ("truncated_half", "bit_flip_in_array"):
        assert_one_line_error(
            cli(env, "train", "--device", DEVICE, "--checkpoint", str(bad), "--resume",
                "--limit-train", "32", "--limit-test", "16"),
            str(bad),
        )


def test_missing_checkpoint_is_one_line_error(env, tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    assert_one_line_error(cli(env, "evaluate", "--checkpoint", str(missing), "--device", DEVICE),
                          str(missing))


# --------------------------------------------------------------------------
# corrupt data files
# --------------------------------------------------------------------------

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _data_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in MNIST_FILES:
        for cand in (src / f"{name}.gz", src / name):
            if cand.exists():
                shutil.copyfile(cand, dst / cand.name)
                break
    return dst


def _file(d: Path, name: str) -> Path:
    return d / f"{name}.gz" if (d / f"{name}.gz").exists() else d / name


@pytest.mark.parametrize("kind", ["truncated_gzip", "bit_flip_gzip", "empty", "bad_magic",
                                  "truncated_raw"])
def test_corrupt_data_file_is_one_line_error(env, tmp_path: Path, mnist_dir: Path,
                                             kind: str) -> None:
    d = _data_copy(mnist_dir, tmp_path / "data")
    target = _file(d, "train-labels-idx1-ubyte")
    data = target.read_bytes()
    if kind == "truncated_gzip":
        target.write_bytes(data[: len(data) // 2])
    elif kind == "bit_flip_gzip":
        b = bytearray(data)
        b[len(b) // 2] ^= 0x10
        target.write_bytes(bytes(b))
    elif kind == "empty":
        target.write_bytes(b"")
    else:
        import gzip

        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        target.unlink()
        target = d / "train-labels-idx1-ubyte"  # stored uncompressed
        if kind == "bad_magic":
            raw = b"\x00\x00\x09\x09" + raw[4:]
        else:
            raw = raw[: len(raw) // 3]
        target.write_bytes(raw)
    env = dict(env, FASTNN_DATA_DIR=str(d))
    r = cli(env, "train", "--device", DEVICE, "--epochs", "1", "--limit-train", "32",
            "--limit-test", "16", "--data-dir", str(d), "--no-progress")
    assert_one_line_error(r, "train-labels-idx1-ubyte")


def test_ctrl_c_during_epoch_end_writes_is_held_until_both_are_written() -> None:
    # The checkpoint and the metrics JSON are written back to back; a Ctrl-C
    # between them must not leave the two files an epoch apart.
    from fastnn.train import _sigint_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with _sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal is delivered here, between the writes
            done.append("checkpoint")
            done.append("metrics")
    assert done == ["checkpoint", "metrics"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_ctrl_c_means_no_interrupt() -> None:
    from fastnn.train import _sigint_deferred

    with _sigint_deferred():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
