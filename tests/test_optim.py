"""optim: SGD/Adam/AdamW against hand-written updates, state_dict round-trips via
npz, parameter groups, l1_penalty, and the LR schedules' values."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastnn
from fastnn import nn, optim
from fastnn.autograd import Tensor


@pytest.fixture
def backend(host_backend):
    with fastnn.backend(host_backend):
        yield host_backend


def make_params(rng, dtype=np.float64):
    return [nn.Parameter(rng.standard_normal(s).astype(dtype)) for s in [(3, 4), (5,)]]


def grads_for(rng, params, steps):
    return [[rng.standard_normal(p.shape).astype(p.dtype) for p in params] for _ in range(steps)]


def run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.copy()
        opt.step()


def sgd_ref(p, grads, lr, momentum, nesterov, wd):
    p = p.copy()
    buf = None
    for g in grads:
        g = g + wd * p
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + g
            g = g + momentum * buf if nesterov else buf
        p -= lr * g
    return p


def adam_ref(p, grads, lr, b1, b2, eps, wd, decoupled):
    p = p.copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        if decoupled:
            p *= 1 - lr * wd
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1**t)
        vhat = v / (1 - b2**t)
        p -= lr * mhat / (np.sqrt(vhat) + eps)
    return p


# --------------------------------------------------------------------------
# update rules
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        dict(momentum=0.0, nesterov=False, weight_decay=0.0),
        dict(momentum=0.9, nesterov=False, weight_decay=0.0),
        dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
        dict(momentum=0.0, nesterov=False, weight_decay=0.1),
    ],
)
def test_sgd_matches_hand_written(backend, rng, cfg):
    params = make_params(rng)
    start = [p.data.copy() for p in params]
    grads = grads_for(rng, params, 4)
    opt = optim.SGD(params, lr=0.1, **cfg)
    run(opt, params, grads)
    for i, p in enumerate(params):
        ref = sgd_ref(start[i], [g[i] for g in grads], 0.1, cfg["momentum"], cfg["nesterov"],
                      cfg["weight_decay"])
        np.testing.assert_allclose(p.data, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adam_matches_hand_written(backend, rng, cls, wd):
    params = make_params(rng)
    start = [p.data.copy() for p in params]
    grads = grads_for(rng, params, 5)
    opt = getattr(optim, cls)(params, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd)
    run(opt, params, grads)
    for i, p in enumerate(params):
        ref = adam_ref(start[i], [g[i] for g in grads], 1e-2, 0.8, 0.99, 1e-6, wd,
                       decoupled=(cls == "AdamW"))
        np.testing.assert_allclose(p.data, ref, rtol=1e-10, atol=1e-12)
    assert opt.state[params[0]]["step"] == 5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls", ["Adam", "SGD"])
def test_state_decaying_to_subnormal_is_stored_as_zero(backend, dtype, cls):
    """A moment whose gradient stays 0 decays geometrically; once below the smallest
    normal number it is stored as 0 (subnormals cost x86 a microcode assist per
    operation), the same on every backend, and the other elements are untouched."""
    tiny = np.finfo(dtype).tiny
    p = nn.Parameter(np.ones(4, dtype=dtype))
    opt = optim.Adam([p], lr=1e-3) if cls == "Adam" else optim.SGD([p], lr=1e-3, momentum=0.5)
    state_key = "exp_avg" if cls == "Adam" else "momentum_buffer"
    grad = np.array([1.0, 0.0, 0.0, 1.0], dtype=dtype)
    p.grad = grad.copy()
    opt.step()
    opt.state[p][state_key][1] = tiny * 1.05  # normal; one decay makes it subnormal
    opt.state[p][state_key][2] = tiny / 4  # already subnormal (e.g. a loaded state)
    before = np.asarray(opt.state[p][state_key]).copy()
    p.grad = grad.copy()
    opt.step()
    state = np.asarray(opt.state[p][state_key])
    assert state[1] == 0 and state[2] == 0
    assert state[0] > 0 and state[3] > 0 and state[0] != before[0]


def test_defaults_and_float32(backend, rng):
    assert optim.AdamW([nn.Parameter(np.zeros(2))]).param_groups[0]["weight_decay"] == 1e-2
    assert optim.Adam([nn.Parameter(np.zeros(2))]).param_groups[0]["lr"] == 1e-3
    params = make_params(rng, np.float32)
    start = params[0].data.copy()
    grads = grads_for(rng, params, 3)
    run(optim.SGD(params, lr=0.1, momentum=0.9), params, grads)
    assert params[0].dtype == np.float32
    ref = sgd_ref(start.astype(np.float64), [g[0].astype(np.float64) for g in grads], 0.1, 0.9,
                  False, 0.0)
    np.testing.assert_allclose(params[0].data, ref, rtol=1e-5, atol=1e-6)


def test_params_without_grad_are_skipped_and_zero_grad(rng):
    a, b = make_params(rng)
    before = b.data.copy()
    opt = optim.SGD([a, b], lr=1.0, momentum=0.5)
    a.grad = np.ones_like(a.data)
    opt.step()
    np.testing.assert_array_equal(b.data, before)
    assert b not in opt.state
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_param_groups_use_their_own_options(rng):
    a, b = make_params(rng)
    a0, b0 = a.data.copy(), b.data.copy()
    opt = optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    a.grad, b.grad = np.ones_like(a0), np.ones_like(b0)
    opt.step()
    np.testing.assert_allclose(a.data, a0 - 0.1)
    np.testing.assert_allclose(b.data, b0 - 0.5)


def test_trains_with_autograd(backend, rng):
    w = nn.Parameter(np.zeros(3))
    target = np.array([1.0, -2.0, 0.5])
    opt = optim.Adam([w], lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        loss = ((w - target) ** 2).sum()
        loss.backward()
        opt.step()
    np.testing.assert_allclose(w.data, target, atol=1e-2)


def test_validation_errors():
    p = nn.Parameter(np.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match="single Tensor"):
        optim.SGD(p, lr=0.1)
    with pytest.raises(TypeError, match=r"params\[0\]"):
        optim.SGD([np.zeros(2)], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        optim.SGD([p], lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="more than one"):
        optim.SGD([p, p], lr=0.1)
    with pytest.raises(ValueError, match="leaf"):
        optim.SGD([Tensor(np.zeros(2), requires_grad=True) * 2.0], lr=0.1)


# --------------------------------------------------------------------------
# state_dict
# --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    lambda ps: optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95)),
    lambda ps: optim.AdamW(ps, lr=1e-2),
])
def test_state_dict_round_trip_through_npz(tmp_path, rng, make):
    params = make_params(rng)
    grads = grads_for(rng, params, 6)
    opt = make(params)
    run(opt, params, grads[:3])
    sd = opt.state_dict()
    assert all(isinstance(v, (np.ndarray, int, float, bool)) for v in sd.values())
    np.savez(tmp_path / "opt.npz", **sd)
    snapshot = [p.data.copy() for p in params]

    clone = [nn.Parameter(s.copy()) for s in snapshot]
    opt2 = make(clone)
    opt2.param_groups[0]["lr"] = 123.0  # must be overwritten by the load
    opt2.load_state_dict(dict(np.load(tmp_path / "opt.npz")))
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    run(opt, params, grads[3:])
    run(opt2, clone, grads[3:])
    for p, q in zip(params, clone):
        np.testing.assert_array_equal(p.data, q.data)
    sd2 = opt2.state_dict()
    assert set(sd2) == set(opt.state_dict())


def test_state_dict_holds_copies_and_load_checks_shapes(rng):
    params = make_params(rng)
    opt = optim.SGD(params, lr=0.1, momentum=0.9)
    run(opt, params, grads_for(rng, params, 1))
    sd = opt.state_dict()
    sd["state.0.momentum_buffer"][...] = 99
    assert not np.any(opt.state[params[0]]["momentum_buffer"] == 99)
    other = optim.SGD([nn.Parameter(np.zeros((4, 3))), params[1]], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"state.0.momentum_buffer.*\(3, 4\)"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="parameters"):
        optim.SGD(params[:1], lr=0.1, momentum=0.9).load_state_dict(sd)


# --------------------------------------------------------------------------
# l1_penalty
# --------------------------------------------------------------------------


def test_l1_penalty_value_and_grad(rng):
    params = make_params(rng)
    pen = optim.l1_penalty(params, 0.01)
    assert isinstance(pen, Tensor)
    np.testing.assert_allclose(pen.item(), 0.01 * sum(np.abs(p.data).sum() for p in params))
    pen.backward()
    for p in params:
        np.testing.assert_allclose(p.grad, 0.01 * np.sign(p.data))


# --------------------------------------------------------------------------
# schedulers
# --------------------------------------------------------------------------


def test_step_lr_values():
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=1.0)
    sched = optim.StepLR(opt, step_size=3, gamma=0.5)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(7):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert sched.get_last_lr() == [0.25]


def test_cosine_lr_values():
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1)
    sched = optim.CosineAnnealingLR(opt, T_max=4, eta_min=0.01)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(4):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    expected = [0.01 + 0.09 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    assert lrs[0] == pytest.approx(0.1) and lrs[2] == pytest.approx(0.055)
    assert lrs[4] == pytest.approx(0.01)


def test_scheduler_per_group_and_state_dict(tmp_path):
    a, b = nn.Parameter(np.zeros(1)), nn.Parameter(np.zeros(1))
    opt = optim.SGD([{"params": [a]}, {"params": [b], "lr": 1.0}], lr=0.1)
    sched = optim.StepLR(opt, step_size=2, gamma=0.1)
    for _ in range(3):
        sched.step()
    np.testing.assert_allclose(sched.get_last_lr(), [0.01, 0.1])
    np.savez(tmp_path / "s.npz", **sched.state_dict())

    opt2 = optim.SGD([{"params": [a]}, {"params": [b], "lr": 1.0}], lr=0.1)
    sched2 = optim.StepLR(opt2, step_size=5, gamma=0.5)
    sched2.load_state_dict(dict(np.load(tmp_path / "s.npz")))
    assert sched2.step_size == 2 and sched2.gamma == 0.1 and sched2.last_epoch == 3
    sched2.step()
    sched.step()
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([0.001, 0.01])


def test_scheduler_validation():
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="step_size"):
        optim.StepLR(opt, step_size=0)
    with pytest.raises(ValueError, match="T_max"):
        optim.CosineAnnealingLR(opt, T_max=0)
    with pytest.raises(TypeError, match="Optimizer"):
        optim.StepLR(object(), step_size=1)


@pytest.mark.parametrize("n", [10, 33])
@pytest.mark.parametrize("decoupled", [False, True])
def test_cpu_adam_does_not_depend_on_alignment(n, decoupled):
    """An element's update must not depend on where the arrays' alignment puts it (a
    vectorized body and a scalar peel that round differently did: AdamW results then
    changed between runs with the memory layout)."""
    from fastnn.backends import get_backend

    try:
        cpu = get_backend("cpu")
    except ImportError:
        pytest.skip("fastnn._C is not built")
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n).astype(np.float32)
    g0 = (rng.standard_normal(n) * 1e-2).astype(np.float32)

    def at(a, off):
        v = np.zeros(a.size + 32, a.dtype)[off:off + a.size]
        v[...] = a
        return v

    def run(op, og):
        p, g = at(p0, op), at(g0, og)
        m, v = at(np.abs(g0) * 0.1, og), at(g0 ** 2, op)
        cpu.adam_step(p, g, m, v, 3, 1e-2, 0.9, 0.999, 1e-8, 0.1, decoupled)
        return p

    ref = run(0, 0)
    for op in range(16):
        for og in (0, 4, 8, 12):
            np.testing.assert_array_equal(run(op, og), ref, err_msg=f"offsets {op}, {og}")
