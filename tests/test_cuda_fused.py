"""The fused cuda training step, the multi-tensor optimizer, launch counting and
CUDA graph replay: in Numba's CUDA simulator against the numpy_ref autograd path.

As in ``test_cuda_sim.py``, the simulator tests run in a child process with
``NUMBA_ENABLE_CUDASIM=1`` (:func:`test_fused_simulator_suite`); run them
directly with::

    NUMBA_ENABLE_CUDASIM=1 PYTHONPATH=. python -m pytest tests/test_cuda_fused.py -q

GPU-only checks (real capture and replay, the bound-launch fast path) carry the
``gpu`` marker.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import PKG_ROOT
from test_cuda_sim import SIM, _child_env, _numba_installed

import fastnn
from fastnn import nn, optim

pytestmark = pytest.mark.cudasim
sim = pytest.mark.sim_only


@pytest.mark.skipif(SIM, reason="already running under the simulator")
@pytest.mark.skipif(not _numba_installed(), reason="numba is not installed")
def test_fused_simulator_suite() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider"],
        cwd=PKG_ROOT, env=_child_env(NUMBA_ENABLE_CUDASIM="1"),
        capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert " passed" in out and " failed" not in out, out[-2000:]


def test_cuda_graph_flag_needs_cuda_device() -> None:
    from fastnn.cli import main

    err = io.StringIO()
    sys_err, sys.stderr = sys.stderr, err
    try:
        rc = main(["train", "--device", "numpy", "--cuda-graph", "--epochs", "1"])
    finally:
        sys.stderr = sys_err
    assert rc != 0 and "--cuda-graph needs --device cuda" in err.getvalue()


# --------------------------------------------------------------------------- #
# Simulator tests
# --------------------------------------------------------------------------- #


def _conv_model(seed: int = 0, bias: bool = True) -> nn.Module:
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, bias=bias, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(27, 5, rng=rng), nn.ReLU(),
                         nn.Linear(5, 4, rng=rng))


def _mlp_model(seed: int = 0) -> nn.Module:
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 6, rng=rng), nn.ReLU(),
                         nn.Linear(6, 5, bias=False, rng=rng), nn.ReLU(),
                         nn.Linear(5, 4, rng=rng))


OPTS = {
    "adam": lambda ps: optim.Adam(ps, lr=0.05),
    "adam_l2": lambda ps: optim.Adam(ps, lr=0.05, weight_decay=0.1),
    "adamw": lambda ps: optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    "sgd": lambda ps: optim.SGD(ps, lr=0.1),
    "sgd_nesterov_wd": lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                            weight_decay=0.01),
}


def _steps(backend, make_model, make_opt, batches):
    from fastnn.training import train_step

    model = make_model()
    opt = make_opt(model.parameters())
    losses = []
    for x, y in batches:
        with fastnn.backend(backend):
            losses.append(float(train_step(model, opt, x, y).data))
    return model, opt, np.array(losses)


def _batches(rng, n_steps=3, n=3):
    return [(rng.standard_normal((n, 1, 8, 8)).astype(np.float32), rng.integers(0, 4, n))
            for _ in range(n_steps)]


def _assert_same(m_got, m_want, l_got, l_want):
    np.testing.assert_allclose(l_got, l_want, rtol=1e-5, atol=1e-6)
    for a, b in zip(m_got.parameters(), m_want.parameters()):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-4, atol=1e-5)


@sim
@pytest.mark.parametrize(("model_name", "opt_name"), [
    ("conv", "adam"), ("conv", "sgd_nesterov_wd"), ("conv_nobias", "adamw"),
    ("mlp", "adam_l2"), ("mlp", "sgd"),
])
def test_fused_step_matches_autograd_reference(opt_name, model_name) -> None:
    from fastnn.backends._cuda.launch import runtime
    from fastnn.training.cuda_step import fused_step_for

    make = {"conv": _conv_model, "conv_nobias": lambda: _conv_model(bias=False),
            "mlp": _mlp_model}[model_name]
    batches = _batches(np.random.default_rng(1))
    m_got, o_got, l_got = _steps("cuda", make, OPTS[opt_name], batches)
    m_want, _, l_want = _steps("numpy", make, OPTS[opt_name], batches)
    _assert_same(m_got, m_want, l_got, l_want)
    with fastnn.backend("cuda"):
        assert fused_step_for(m_got, o_got) is not None
        x, y = batches[0]
        with runtime().recording(execute=True) as rec:
            from fastnn.training import train_step

            train_step(m_got, o_got, x, y)
    layers = 3 if model_name == "mlp" else 2
    # forward + backward per linear layer, CE, optimizer (+ conv forward and backward)
    assert len(rec) == 2 * layers + 2 + (0 if model_name == "mlp" else 2)


@sim
def test_flat_optimizer_state_dict_round_trip_and_repair() -> None:
    from fastnn.autograd import Tensor

    rng = np.random.default_rng(3)
    shapes = [(3, 4), (5,), (2, 2, 3)]

    def run(backend, steps, opt=None, ps=None):
        if ps is None:
            ps = [nn.Parameter(np.random.default_rng(7).standard_normal(s).astype(np.float32))
                  for s in shapes]
            opt = optim.Adam(ps, lr=0.1)
        for g in steps:
            for p, gi in zip(ps, g):
                p.grad = gi.copy()
            with fastnn.backend(backend):
                opt.step()
        return ps, opt

    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(4)]
    ps, opt = run("cuda", grads[:2])
    assert opt.__dict__.get("_flat"), "the cuda step did not build the flat layout"
    sd = opt.state_dict()
    ref_ps, ref_opt = run("numpy", grads[:2])
    for k, v in ref_opt.state_dict().items():
        np.testing.assert_allclose(sd[k], v, rtol=1e-6)
    # A fresh optimizer loading the state replaces the flat views: they are repaired.
    ps2 = [nn.Parameter(p.data.copy()) for p in ps]
    opt2 = optim.Adam(ps2, lr=0.1)
    with fastnn.backend("cuda"):
        for p in ps2:
            p.grad = np.zeros_like(p.data)
        opt2.flat_layout()
    opt2.load_state_dict(sd)
    run("cuda", grads[2:], opt2, ps2)
    run("numpy", grads[2:], ref_opt, ref_ps)
    for a, b in zip(ps2, ref_ps):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-6)
    # A parameter without a gradient is skipped, as torch does (per-parameter path).
    ps[1].grad = None
    before = ps[1].data.copy()
    ps[0].grad = grads[0][0]
    ps[2].grad = grads[0][2]
    with fastnn.backend("cuda"):
        opt.step()
    np.testing.assert_array_equal(ps[1].data, before)
    assert isinstance(ps[0], Tensor)


def _loader_data(n=10, seed=5):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), rng.integers(0, 4, n)


def _epochs(backend, epochs=1, cuda_graph=False, api=None, opt_name="adam"):
    from fastnn.data import DataLoader
    from fastnn.training import run_epoch
    from fastnn.training.cuda_graph import fused_graph_step
    from fastnn.training.cuda_step import fused_step_for

    images, labels = _loader_data()
    loader = DataLoader(images, labels, 4, shuffle=True, seed=2)
    model = _conv_model()
    opt = OPTS[opt_name](model.parameters())
    if api is not None:
        with fastnn.backend("cuda"):
            fused_graph_step(fused_step_for(model, opt, loader), api)
    losses = [run_epoch(model, opt, loader, backend, epoch=e, cuda_graph=cuda_graph).loss
              for e in range(epochs)]
    return model, opt, np.array(losses)


@sim
def test_run_epoch_reads_uint8_batches_in_the_first_kernel() -> None:
    from fastnn.backends._cuda.launch import runtime

    m_want, _, l_want = _epochs("numpy")
    with runtime().recording(execute=True) as rec:
        m_got, _, l_got = _epochs("cuda")
    _assert_same(m_got, m_want, l_got, l_want)
    steps = 3  # 10 images in batches of 4: 3 steps
    assert len(rec) == 8 * steps
    assert rec.copies == steps  # the batch's row indices into the static buffer


@sim
def test_cuda_graph_falls_back_with_one_line_in_the_simulator(capsys) -> None:
    m_want, _, l_want = _epochs("numpy")
    m_got, _, l_got = _epochs("cuda", cuda_graph=True)
    _assert_same(m_got, m_want, l_got, l_want)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cuda-graph" in err[0] and "simulator" in err[0], err


class FakeCapture:
    """Stream capture in the simulator: capture records the bound launches
    without running them; replay runs the recorded launches."""

    def __init__(self) -> None:
        self.captures = self.replays = 0
        self._rec = None

    def unavailable(self):
        return None

    def new_stream(self):
        return "stream"

    def on(self, stream):
        return contextlib.nullcontext()

    def begin(self, stream):
        from fastnn.backends._cuda.launch import runtime

        self._ctx = runtime().recording(execute=False)
        self._rec = self._ctx.__enter__()

    def end(self, stream):
        self._ctx.__exit__(None, None, None)
        assert None not in self._rec.bound, "an unbound launch cannot be replayed"
        self.captures += 1
        return list(self._rec.bound)

    def replay(self, graph, stream):
        self.replays += 1
        for f in graph:
            f()


@sim
@pytest.mark.parametrize("opt_name", ["adam", "sgd_nesterov_wd"])
def test_cuda_graph_replay_with_a_faked_capture_api(opt_name) -> None:
    m_want, _, l_want = _epochs("numpy", epochs=2, opt_name=opt_name)
    api = FakeCapture()
    m_got, opt, l_got = _epochs("cuda", epochs=2, cuda_graph=True, api=api, opt_name=opt_name)
    _assert_same(m_got, m_want, l_got, l_want)
    # batch sizes 4 and 2: one eager warm-up each, then captured and replayed
    assert api.captures == 2
    assert api.replays == 2 * 3 - 2
    if opt_name == "adam":
        assert {st["step"] for st in opt.state.values()} == {6}


@sim
def test_cuda_graph_replay_sees_lr_changes_and_recaptures_on_new_flags() -> None:
    from fastnn.data import DataLoader
    from fastnn.training import run_epoch
    from fastnn.training.cuda_graph import fused_graph_step
    from fastnn.training.cuda_step import fused_step_for

    images, labels = _loader_data(n=8)

    def train(backend, api=None):
        loader = DataLoader(images, labels, 4)
        model = _conv_model()
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        if api is not None:
            with fastnn.backend("cuda"):
                fused_graph_step(fused_step_for(model, opt, loader), api)
        for e, (lr, wd) in enumerate([(0.1, 0.0), (0.02, 0.0), (0.02, 0.05)]):
            opt.param_groups[0]["lr"] = lr
            opt.param_groups[0]["weight_decay"] = wd
            run_epoch(model, opt, loader, backend, epoch=e, cuda_graph=api is not None)
        return model

    api = FakeCapture()
    got, want = train("cuda", api), train("numpy")
    for a, b in zip(got.parameters(), want.parameters()):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-4, atol=1e-5)
    assert api.captures == 2  # the weight decay flag changed the optimizer's kernel


@sim
def test_count_launches_of_the_seed_model_step() -> None:
    from fastnn.bench.launches import count_train_launches, format_counts

    doc = count_train_launches(n=128, steps=3)
    fused, autograd = doc["paths"]
    assert fused["path"] == "fused" and not fused["executed"]
    assert fused["launches_per_step"] <= 10
    assert fused["kernels"]["_adam_kernel"] == 1
    assert autograd["launches_per_step"] > fused["launches_per_step"]
    assert "launches/step" in format_counts(doc)


@sim
def test_models_outside_the_pattern_use_autograd() -> None:
    from fastnn.models import build_model
    from fastnn.training.cuda_step import Unsupported, fused_step_for, parse_pattern

    strong = build_model("strong", 0)
    with fastnn.backend("cuda"):
        assert fused_step_for(strong, optim.Adam(strong.parameters())) is None
        m = _conv_model()
        m.eval()
        assert fused_step_for(m, optim.Adam(m.parameters())) is None
        m = _conv_model()
        assert fused_step_for(m, optim.Adam(list(m.parameters())[:2])) is None
    with pytest.raises(Unsupported, match="Linear"):
        parse_pattern(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(Unsupported, match="stride"):
        parse_pattern(nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(2, 2)))
    os.environ["FASTNN_FUSED_STEP"] = "0"
    try:
        with fastnn.backend("cuda"):
            m = _conv_model()
            assert fused_step_for(m, optim.Adam(m.parameters())) is None
    finally:
        del os.environ["FASTNN_FUSED_STEP"]


# --------------------------------------------------------------------------- #
# GPU only
# --------------------------------------------------------------------------- #


@pytest.mark.gpu
def test_gpu_graph_replay_matches_eager_and_reference() -> None:
    import cupy

    from fastnn.data import DataLoader
    from fastnn.training import run_epoch

    images, labels = _loader_data(n=600)
    out = {}
    for mode in ("numpy", "eager", "graph"):
        loader = DataLoader(images, labels, 128, shuffle=True, seed=1,
                            device="cpu" if mode == "numpy" else "cuda")
        model = _conv_model()
        if mode != "numpy":
            model.to("cuda")
        opt = optim.Adam(model.parameters(), lr=0.01)
        err = io.StringIO()
        sys_err, sys.stderr = sys.stderr, err
        try:
            losses = [run_epoch(model, opt, loader, "numpy" if mode == "numpy" else "cuda",
                                epoch=e, cuda_graph=mode == "graph").loss for e in range(2)]
        finally:
            sys.stderr = sys_err
        assert "note" not in err.getvalue(), err.getvalue()
        out[mode] = (losses, [cupy.asnumpy(p.data) if mode != "numpy" else p.data
                              for p in model.parameters()])
    for mode in ("eager", "graph"):
        np.testing.assert_allclose(out[mode][0], out["numpy"][0], rtol=1e-4)
        for a, b in zip(out[mode][1], out["numpy"][1]):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
