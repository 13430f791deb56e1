"""Checkpoints: round trip, no pickle, atomic saves, corrupt files, exact resume."""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fastnn
from fastnn import checkpoint as ckpt
from fastnn import functional as F
from fastnn import optim
from fastnn.autograd import Tensor
from fastnn.models import build_model

DEVICE = "cpu" if "cpu" in fastnn.available_backends() else "numpy"


def _trained_strong(steps: int = 2):
    """A strong model plus an Adam optimizer and a scheduler after a few steps."""
    model = build_model("strong", seed=1)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    sched = optim.CosineAnnealingLR(opt, T_max=5)
    rng = np.random.default_rng(0)
    with fastnn.backend("numpy"):
        for _ in range(steps):
            x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
            loss = F.cross_entropy(model(Tensor(x)), rng.integers(0, 10, 4))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model, opt, sched


def test_round_trip_model_optimizer_scheduler(tmp_path: Path) -> None:
    model, opt, sched = _trained_strong()
    path = tmp_path / "run.npz"
    states = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
    }
    meta = {
        "model": "strong",
        "epoch": 3,
        "optimizer": {"name": "adam", "lr": 1e-3},
        "metrics": {"epochs": [{"epoch": 1, "test_accuracy": 0.5}]},
    }
    ckpt.save(path, states, meta)
    loaded = ckpt.load(path)
    assert loaded.metadata == meta

    model2, opt2, sched2 = build_model("strong", seed=2), None, None
    opt2 = optim.Adam(model2.parameters(), lr=0.5)
    sched2 = optim.CosineAnnealingLR(opt2, T_max=5)
    model2.load_state_dict(loaded.model_state)
    opt2.load_state_dict(loaded.optimizer_state)
    sched2.load_state_dict(loaded.states["scheduler"])
    for (k, a), (k2, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b), k
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert sched2.last_epoch == sched.last_epoch

    # The restored optimizer continues exactly like the original one.
    x = np.random.default_rng(5).standard_normal((4, 1, 28, 28)).astype(np.float32)
    y = np.arange(4)
    for m, o in ((model, opt), (model2, opt2)):
        m.eval()  # no dropout randomness, BN running stats
        with fastnn.backend("numpy"):
            loss = F.cross_entropy(m(Tensor(x)), y)
            o.zero_grad()
            loss.backward()
            o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert np.array_equal(a.data, b.data)


def test_tree_types_survive(tmp_path: Path) -> None:
    tree = {
        "a": {
            "zero_d": np.array(7, np.int64),
            "f32": np.ones((2, 3), np.float32),
            "flag": np.array([True, False]),
        },
        "opt": {
            "state": {0: {"step": 3, "buf": np.arange(3.0)}, 5: None},
            "betas": (0.9, 0.999),
            "names": ["x", "y"],
            "lr": 0.1,
            "nan": float("nan"),
        },
    }
    ckpt.save(tmp_path / "t.npz", tree)
    back = ckpt.load(tmp_path / "t.npz").states
    assert back["a"]["zero_d"].shape == () and back["a"]["zero_d"].dtype == np.int64
    assert back["a"]["f32"].dtype == np.float32 and back["a"]["flag"].dtype == np.bool_
    assert back["opt"]["state"][0]["step"] == 3 and back["opt"]["state"][5] is None
    assert np.array_equal(back["opt"]["state"][0]["buf"], np.arange(3.0))
    assert back["opt"]["betas"] == (0.9, 0.999) and isinstance(back["opt"]["betas"], tuple)
    assert back["opt"]["names"] == ["x", "y"] and np.isnan(back["opt"]["nan"])


def test_file_is_plain_npz_without_pickles(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    ckpt.save(path, {"model": {"w": np.zeros(2, np.float32)}}, {"model": "seed", "epoch": 1})
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == {"__meta__", "__tree__", "model/w"}
        meta = json.loads(str(npz["__meta__"][0]))
        assert npz["__meta__"].dtype.kind == "U"
    assert meta["model"] == "seed" and meta["format"] == ckpt.FORMAT
    with pytest.raises(TypeError, match="object array"):
        ckpt.save(path, {"x": np.array([{}, 1], dtype=object)})
    with pytest.raises(TypeError, match="cannot store set"):
        ckpt.save(path, {"x": {1, 2}})
    with pytest.raises(TypeError, match="JSON"):
        ckpt.save(path, {}, {"bad": object()})


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "c.npz"
    ckpt.save(path, {"model": {"w": np.ones(3)}}, {"epoch": 1})
    before = path.read_bytes()

    real_savez = np.savez

    def crash_midway(f, **arrays):
        real_savez(f, **arrays)
        f.truncate(100)  # half-written file ...
        raise KeyboardInterrupt  # ... then the user hits Ctrl-C

    monkeypatch.setattr(ckpt.np, "savez", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(path, {"model": {"w": np.zeros(3)}}, {"epoch": 2})
    assert path.read_bytes() == before
    assert ckpt.load(path).metadata["epoch"] == 1
    assert os.listdir(tmp_path) == ["c.npz"], "no temporary files left behind"


def test_save_replaces_atomically(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "c.npz"
    ckpt.save(path, {"model": {"w": np.ones(3)}}, {"epoch": 1})
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        # At rename time the new file is complete and the old one still in place.
        seen.append((ckpt.load(src).metadata["epoch"], ckpt.load(dst).metadata["epoch"]))
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", spy)
    ckpt.save(path, {"model": {"w": np.ones(3)}}, {"epoch": 2})
    assert seen == [(2, 1)] and ckpt.load(path).metadata["epoch"] == 2


def _good(tmp_path: Path) -> Path:
    path = tmp_path / "good.npz"
    model = build_model("seed", 0)
    ckpt.save(path, {"model": model.state_dict()}, {"model": "seed", "epoch": 1})
    return path


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    data = _good(tmp_path).read_bytes()
    bad = tmp_path / "bad.npz"
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        mid = bytearray(data)
        for i in range(len(data) // 3, len(data) // 3 + 64):
            mid[i] ^= 0xFF  # inside the weights: the CRC check catches it
        bad.write_bytes(bytes(mid))
    elif damage == "garbage":
        bad.write_bytes(b"not a checkpoint at all" * 10)
    else:
        bad.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load(bad)
    msg = str(info.value)
    assert str(bad) in msg and "\n" not in msg


def test_foreign_npz_and_missing_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", a=np.ones(2))
    with pytest.raises(ckpt.CheckpointError, match="not a fastnn checkpoint"):
        ckpt.load(tmp_path / "other.npz")
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load(tmp_path / "nope.npz")
    # A newer format version is refused rather than misread.
    path = _good(tmp_path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    with np.load(path) as npz:
        meta = json.loads(str(npz["__meta__"][0]))
    meta["format_version"] = 99
    np.savez(
        tmp_path / "v99.npz",
        __meta__=np.array([json.dumps(meta)]),
        __tree__=np.array(['{"model": {}}']),
    )
    assert members  # sanity: the original archive had members
    with pytest.raises(ckpt.CheckpointError, match="version 99"):
        ckpt.load(tmp_path / "v99.npz")


class _Stop(Exception):
    pass


def _stop_after(n_epochs: int):
    def hook(record: dict) -> None:
        if record["epoch"] >= n_epochs:
            raise _Stop  # an interruption right after the epoch's checkpoint was written

    return hook


@pytest.mark.mnist
def test_resume_matches_uninterrupted_run(mnist_dir: Path, tmp_path: Path) -> None:
    """2 epochs straight == 1 epoch, interrupt, resume for the 2nd (strong model: BN +
    dropout, shuffling, augmentation and a cosine schedule all carry state over)."""
    from fastnn.train import TrainConfig, train

    cfg = TrainConfig(
        model="strong",
        device=DEVICE,
        epochs=2,
        batch_size=16,
        limit_train=32,
        limit_test=16,
        augment=2,
        schedule="cosine",
        data_dir=str(mnist_dir),
        seed=3,
    )
    with open(os.devnull, "w") as quiet:
        full = train(cfg, checkpoint=tmp_path / "full.npz", progress=False, out=quiet)
        with pytest.raises(_Stop):
            train(
                cfg,
                checkpoint=tmp_path / "part.npz",
                progress=False,
                out=quiet,
                on_epoch_end=_stop_after(1),
            )
        assert ckpt.load(tmp_path / "part.npz").metadata["epoch"] == 1
        resumed = train(
            cfg, checkpoint=tmp_path / "part.npz", resume=True, progress=False, out=quiet
        )
    a, b = ckpt.load(tmp_path / "full.npz"), ckpt.load(tmp_path / "part.npz")
    assert a.metadata["epoch"] == b.metadata["epoch"] == 2
    assert a.model_state.keys() == b.model_state.keys()
    for k in a.model_state:
        np.testing.assert_allclose(
            a.model_state[k], b.model_state[k], rtol=1e-5, atol=1e-6, err_msg=k
        )
    assert [e["epoch"] for e in resumed.epochs] == [1, 2]
    assert resumed.epochs[0] == full.epochs[0] or resumed.epochs[0]["train_loss"] == (
        pytest.approx(full.epochs[0]["train_loss"], 1e-6)
    )
    assert resumed.epochs[1]["train_loss"] == pytest.approx(full.epochs[1]["train_loss"], 1e-5)
    assert resumed.epochs[1]["lr"] == full.epochs[1]["lr"] < full.epochs[0]["lr"]
    assert resumed.test_accuracy == full.test_accuracy


def _lrs(metrics: Path) -> list[float]:
    return [e["lr"] for e in json.loads(metrics.read_text())["epochs"]]


@pytest.mark.mnist
@pytest.mark.parametrize(("schedule", "planned", "total"), [("cosine", 2, 4), ("step", 3, 6)])
def test_resume_with_more_epochs_replans_the_schedule(
    mnist_dir: Path, tmp_path: Path, schedule: str, planned: int, total: int
) -> None:
    """A finished ``planned``-epoch run resumed with ``epochs=total`` trains the new
    epochs at the rates a run planned for ``total`` from the start has (cosine 2 -> 4:
    epoch 3 would otherwise run at lr 0 and epoch 4 climb back up); the extended
    checkpoint then resumes exactly with the same total."""
    import io

    from fastnn.train import TrainConfig, train

    cfg = TrainConfig(
        model="seed", device=DEVICE, epochs=planned, batch_size=64, limit_train=256,
        limit_test=64, schedule=schedule, data_dir=str(mnist_dir), seed=1,
    )
    quiet = io.StringIO()
    fresh_metrics, ext_metrics = tmp_path / "fresh.json", tmp_path / "ext.json"
    train(dataclasses.replace(cfg, epochs=total), metrics_json=fresh_metrics, progress=False,
          out=quiet)
    train(cfg, checkpoint=tmp_path / "run.npz", progress=False, out=quiet)
    # The lr the shorter plan set for its next epoch (cosine 2: 0.0), which extending must replace.
    old_next = float(ckpt.load(tmp_path / "run.npz").optimizer_state["param_groups.0.lr"])
    log = io.StringIO()
    with pytest.raises(_Stop):  # interrupted one epoch into the extension
        train(dataclasses.replace(cfg, epochs=total), checkpoint=tmp_path / "run.npz",
              resume=True, metrics_json=ext_metrics, progress=False, out=log,
              on_epoch_end=_stop_after(planned + 1))
    fresh = _lrs(fresh_metrics)
    assert fresh[planned] > 0 and fresh[planned] != old_next
    assert _lrs(ext_metrics)[planned] == fresh[planned]
    notes = [line for line in log.getvalue().splitlines() if line.startswith("resume:")]
    assert len(notes) == 1 and f"from {planned} to {total} epochs" in notes[0], log.getvalue()
    # The rest runs with the same total: no second re-plan, the saved plan continues.
    log = io.StringIO()
    train(dataclasses.replace(cfg, epochs=total), checkpoint=tmp_path / "run.npz", resume=True,
          metrics_json=ext_metrics, progress=False, out=log)
    assert "resume:" not in log.getvalue()
    extended = _lrs(ext_metrics)
    assert len(extended) == total
    assert extended[planned:] == fresh[planned:]
    # The first epochs keep the rates the shorter plan gave them.
    shorter = [e["lr"] for e in ckpt.load(tmp_path / "run.npz").metadata["metrics"]["epochs"]]
    assert shorter[:planned] == extended[:planned]


@pytest.mark.mnist
def test_resume_with_fewer_epochs_keeps_the_plan(mnist_dir: Path, tmp_path: Path) -> None:
    """A 4-epoch cosine run interrupted after epoch 1 and resumed with epochs=2 stops
    early on the 4-epoch schedule; resumed again with epochs=3 (still within the
    plan) it goes on with that schedule, without re-planning."""
    import io

    from fastnn.train import TrainConfig, train

    cfg = TrainConfig(
        model="seed", device=DEVICE, epochs=4, batch_size=64, limit_train=128, limit_test=64,
        schedule="cosine", data_dir=str(mnist_dir), seed=2,
    )
    quiet, log = io.StringIO(), io.StringIO()
    fresh = train(cfg, progress=False, out=quiet)
    path, metrics = tmp_path / "run.npz", tmp_path / "m.json"
    with pytest.raises(_Stop):
        train(cfg, checkpoint=path, progress=False, out=quiet, on_epoch_end=_stop_after(1))
    for total in (2, 3):
        train(dataclasses.replace(cfg, epochs=total), checkpoint=path, resume=True,
              metrics_json=metrics, progress=False, out=log)
    assert "resume:" not in log.getvalue()
    assert ckpt.load(path).metadata["planned_epochs"] == 4
    assert _lrs(metrics) == [e["lr"] for e in fresh.epochs[:3]]


def test_saved_files_get_normal_permissions(tmp_path: Path) -> None:
    path = ckpt.save(tmp_path / "c.npz", {"model": {}})
    ckpt.write_atomic(tmp_path / "m.json", lambda f: f.write(b"{}"))
    mask = os.umask(0)
    os.umask(mask)
    # mkstemp creates 0o600; the result should look like any file open() creates.
    for p in (path, tmp_path / "m.json"):
        assert (p.stat().st_mode & 0o777) == 0o666 & ~mask
    assert (tmp_path / "m.json").read_bytes() == b"{}"


def test_write_atomic_bytes_mode_and_bad_content(tmp_path: Path) -> None:
    """The one atomic-write helper (checkpoints, metrics JSON, downloads): bytes or a
    writer callable, missing parents created, explicit permission bits, and nothing
    written for content it cannot write."""
    from fastnn._io import write_atomic

    path = write_atomic(tmp_path / "sub" / "a.bin", b"abc", mode=0o640, suffix=".part")
    assert path.read_bytes() == b"abc" and (path.stat().st_mode & 0o777) == 0o640
    write_atomic(path, lambda f: f.write(b"xyz"))
    assert path.read_bytes() == b"xyz"
    with pytest.raises(TypeError, match="content"):
        write_atomic(tmp_path / "sub" / "b.bin", "text")  # type: ignore[arg-type]
    assert os.listdir(tmp_path / "sub") == ["a.bin"]
