"""The multi-tensor optimizer steps (``F.sgd_step_multi``, ``F.adam_step_multi``):
the same arrays, bit for bit, as one single-tensor call per parameter, on every
host backend; every array checked before any is updated; errors that name the
list and the position."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HOST_BACKENDS

import fastnn
import fastnn.functional as F

SHAPES = [(32, 1, 3, 3), (32,), (0,), (17, 5), (1,), (130,)]


def arrays(rng, dtype, shapes=SHAPES) -> list[np.ndarray]:
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def copies(xs: list[np.ndarray]) -> list[np.ndarray]:
    return [x.copy() for x in xs]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (0.05, False), (0.05, True)])
def test_adam_step_multi_equals_single_calls(backend, dtype, wd, decoupled, rng) -> None:
    params = arrays(rng, dtype)
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    want_p, want_m, want_v = copies(params), copies(m), copies(v)
    init = copies(params)
    with fastnn.backend(backend):
        for step in (1, 2, 3):
            grads = arrays(rng, dtype)
            # Each parameter at its own step count, as an optimizer can have them.
            steps = [step + i % 2 for i in range(len(params))]
            F.adam_step_multi(params, grads, m, v, steps, 1e-2, 0.8, 0.99, 1e-6, wd, decoupled)
            for i in range(len(params)):
                F.adam_step(want_p[i], grads[i], want_m[i], want_v[i], steps[i], 1e-2, 0.8,
                            0.99, 1e-6, wd, decoupled)
    for got, want in zip(params + m + v, want_p + want_m + want_v):
        np.testing.assert_array_equal(got, want)
    assert all(not np.array_equal(p, q) for p, q in zip(params, init) if p.size)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mom,wd,nesterov", [(0.0, 0.0, False), (0.9, 0.01, True),
                                             (0.5, 0.0, False)])
def test_sgd_step_multi_equals_single_calls(backend, dtype, mom, wd, nesterov, rng) -> None:
    params = arrays(rng, dtype)
    bufs = [np.zeros_like(p) for p in params] if mom else None
    want_p, want_b = copies(params), copies(bufs) if bufs else None
    with fastnn.backend(backend):
        for _ in range(3):
            grads = arrays(rng, dtype)
            F.sgd_step_multi(params, grads, bufs, 0.1, mom, wd, nesterov)
            for i in range(len(params)):
                F.sgd_step(want_p[i], grads[i], want_b[i] if want_b else None, 0.1, mom, wd,
                           nesterov)
    for got, want in zip(params + (bufs or []), want_p + (want_b or [])):
        np.testing.assert_array_equal(got, want)


def test_multi_steps_accept_empty_lists_and_tuples(rng) -> None:
    F.adam_step_multi([], [], [], [], [], 1e-3)
    F.sgd_step_multi((), (), None, 0.1)
    p, g = arrays(rng, np.float32, [(3,)]), arrays(rng, np.float32, [(3,)])
    before = p[0].copy()
    F.sgd_step_multi(tuple(p), tuple(g), None, 0.5)
    np.testing.assert_array_equal(p[0], before - np.float32(0.5) * g[0])


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_adam_step_multi_checks_every_array_before_any_update(backend, rng) -> None:
    params = arrays(rng, np.float32, [(4,), (5,), (6,)])
    grads = arrays(rng, np.float32, [(4,), (5,), (6,)])
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    before = copies(params)
    ro = np.zeros(6, np.float32)
    ro.flags.writeable = False
    # Entry errors come from the backend (its own wording: the cpu backend's checks
    # are native); they must name the entry. List and option errors are fastnn's.
    either = (TypeError, ValueError)
    cases = [
        (dict(exp_avgs=[m[0], m[1], np.zeros(7, np.float32)]), either, r"exp_avgs\[2\]"),
        (dict(grads=[grads[0], grads[1].astype(np.float64), grads[2]]), either, r"grads\[1\]"),
        (dict(params=[params[0], params[1], params[2].tolist()]), TypeError, r"params\[2\]"),
        (dict(exp_avg_sqs=[v[0], v[1], ro]), ValueError,
         r"exp_avg_sqs\[2\].*(read-only|writeable)"),
        (dict(exp_avgs=[m[0], None, m[2]]), TypeError, r"exp_avgs\[1\]"),
        (dict(grads=[grads[0], params[1], grads[2]]), ValueError,
         r"params\[1\] and grads\[1\] must not share memory"),
        (dict(steps=[1, 0, 1]), ValueError, r"steps\[1\] must be >= 1"),
        (dict(steps=[1, 1.0, 1]), TypeError, r"steps\[1\] must be an int"),
        (dict(exp_avg_sqs=v[:2]), ValueError, "exp_avg_sqs has 2 entries, params has 3"),
        (dict(grads=np.stack([g[:4] for g in grads])), TypeError, "grads must be a list"),
        (dict(lr=float("nan")), ValueError, "lr must be a finite number"),
    ]
    for change, exc, match in cases:
        args = dict(params=params, grads=grads, exp_avgs=m, exp_avg_sqs=v, steps=[1, 1, 1],
                    lr=1e-3)
        args.update(change)
        with fastnn.backend(backend), pytest.raises(exc, match=match):
            F.adam_step_multi(**args)
    for got, want in zip(params + m + v, before + [np.zeros_like(p) for p in params] * 2):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_sgd_step_multi_errors_name_the_entry(backend, rng) -> None:
    params = arrays(rng, np.float32, [(4,), (5,)])
    grads = arrays(rng, np.float32, [(4,), (5,)])
    before = copies(params)
    with fastnn.backend(backend):
        with pytest.raises(ValueError, match=r"momentum_bufs\[1\] is required when momentum"):
            F.sgd_step_multi(params, grads, [np.zeros(4, np.float32), None], 0.1, momentum=0.9)
        with pytest.raises(ValueError, match="momentum_bufs is required when momentum"):
            F.sgd_step_multi(params, grads, None, 0.1, momentum=0.9)
        with pytest.raises(ValueError, match=r"params\[0\] must be C-contiguous"):
            F.sgd_step_multi([np.zeros((4, 2), np.float32).T, params[1]],
                             [np.zeros((2, 4), np.float32), grads[1]], None, 0.1)
        with pytest.raises(ValueError, match="momentum_bufs has 1 entries, params has 2"):
            F.sgd_step_multi(params, grads, [np.zeros(4, np.float32)], 0.1, momentum=0.9)
    for got, want in zip(params, before):
        np.testing.assert_array_equal(got, want)


def test_cpu_binding_checks_entries_itself(rng) -> None:
    """The native multi steps are reachable without fastnn.functional (fastnn._C):
    their own checks must stop every bad entry before any update, never crash."""
    cpu = pytest.importorskip("fastnn.backends.cpu")
    if not cpu.is_available():
        pytest.skip("fastnn._C is not built")
    p, g = arrays(rng, np.float32, [(4,), (5,)]), arrays(rng, np.float32, [(4,), (5,)])
    m, v = [np.zeros_like(a) for a in p], [np.zeros_like(a) for a in p]
    before = copies(p)
    bad = [
        ((p, g, m, v, [1, True]), TypeError, r"steps\[1\] must be an int"),
        ((p, g, m, v, [1, -2]), ValueError, r"steps\[1\] must be >= 1"),
        ((p, g, m, [v[0]], [1, 1]), ValueError, "exp_avg_sqs has 1 entries"),
        ((p, g, m, [v[0], v[1][:4]], [1, 1]), ValueError, r"exp_avg_sqs\[1\]"),
        ((p, [g[0], g[1].astype(np.float64)], m, v, [1, 1]), TypeError, r"grads\[1\]"),
        ((p, g, [m[0], p[1]], v, [1, 1]), ValueError, r"params\[1\] and exp_avgs\[1\]"),
        ((p, g, m, v, {1, 2}), TypeError, "steps must be a list or tuple"),
    ]
    for lists, exc, match in bad:
        with pytest.raises(exc, match=match):
            cpu.adam_step_multi(*lists, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    with pytest.raises(ValueError, match=r"momentum_bufs\[0\] is required"):
        cpu.sgd_step_multi(p, g, None, 0.1, 0.9, 0.0, False)
    for got, want in zip(p, before):
        np.testing.assert_array_equal(got, want)
