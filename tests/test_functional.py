"""fastnn.functional against the NumPy reference, for every fast backend present.

The reference itself is checked against direct loops in test_numpy_ref.py; here
each other backend must agree with it on random shapes (odd sizes, strides,
padding, dilation, groups, batch 1, float32 and float64, non-contiguous input).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import NATIVE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastnn
import fastnn.functional as F

FAST_BACKENDS = ["cpu"] if NATIVE else []
pytestmark = pytest.mark.skipif(not FAST_BACKENDS, reason="fastnn._C is not built")

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
DTYPES = st.sampled_from([np.float32, np.float64])


def tol(dtype) -> dict:
    return {"rtol": 2e-4, "atol": 2e-4} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-10}


def on(backend: str, fn, *args, **kwargs):
    with fastnn.backend(backend):
        return fn(*args, **kwargs)


def assert_same(got, want, dtype) -> None:
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w, dtype)
        return
    assert got.dtype == want.dtype == dtype, (got.dtype, want.dtype, dtype)
    assert got.shape == want.shape
    assert got.flags.c_contiguous
    np.testing.assert_allclose(got, want, equal_nan=True, **tol(dtype))


def maybe_noncontig(draw, a: np.ndarray) -> np.ndarray:
    """Sometimes return ``a`` as a non-contiguous view with the same values."""
    kind = draw(st.sampled_from(["c", "fortran", "strided", "negative"]))
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "strided":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if kind == "negative":
        return np.flip(np.flip(a, -1).copy(), -1)
    return a


@st.composite
def conv_case(draw):
    dtype = draw(DTYPES)
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    n = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 11))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 11))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x = rng.standard_normal((n, cin, h, w)).astype(dtype)
    wt = rng.standard_normal((cout, cin // groups, kh, kw)).astype(dtype)
    bias = rng.standard_normal(cout).astype(dtype) if draw(st.booleans()) else None
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return maybe_noncontig(draw, x), wt, bias, kwargs, dtype


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@SETTINGS
@given(case=conv_case())
def test_conv2d_forward_and_backward_match_reference(backend, case):
    x, w, b, kw, dtype = case
    want = on("numpy", F.conv2d, x, w, b, **kw)
    got = on(backend, F.conv2d, x, w, b, **kw)
    assert_same(got, want, dtype)
    gy = np.random.default_rng(0).standard_normal(want.shape).astype(dtype)
    want_g = on("numpy", F.conv2d_backward, gy, x, w, **kw)
    got_g = on(backend, F.conv2d_backward, gy, x, w, **kw)
    assert_same(got_g, want_g, dtype)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    "n,cin,cout,h,w,pad", [(32, 1, 32, 28, 28, 0), (4, 32, 64, 13, 13, 1), (1, 3, 8, 7, 9, 0)]
)
def test_conv2d_layer_shapes(backend, n, cin, cout, h, w, pad, rng):
    x = rng.standard_normal((n, cin, h, w)).astype(np.float32)
    wt = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    want = on("numpy", F.conv2d, x, wt, b, padding=pad)
    assert_same(on(backend, F.conv2d, x, wt, b, padding=pad), want, np.float32)
    gy = rng.standard_normal(want.shape).astype(np.float32)
    assert_same(
        on(backend, F.conv2d_backward, gy, x, wt, padding=pad),
        on("numpy", F.conv2d_backward, gy, x, wt, padding=pad),
        np.float32,
    )


@pytest.mark.parametrize("backend", ["numpy", *FAST_BACKENDS])
@pytest.mark.parametrize("k,d", [(3, 1), (4, 1), (2, 3), (5, 2)])
def test_conv2d_same_and_valid_padding(backend, k, d, rng):
    x = rng.standard_normal((2, 3, 9, 8))
    w = rng.standard_normal((4, 3, k, k))
    y = on(backend, F.conv2d, x, w, padding="same", dilation=d)
    assert y.shape == (2, 4, 9, 8)
    total = d * (k - 1)
    lo, hi = total // 2, total - total // 2  # torch puts the extra zero at the end
    xp = np.pad(x, ((0, 0), (0, 0), (lo, hi), (lo, hi)))
    np.testing.assert_allclose(y, on("numpy", F.conv2d, xp, w, dilation=d), rtol=1e-10)
    gy = rng.standard_normal(y.shape)
    gx, gw, gb = on(backend, F.conv2d_backward, gy, x, w, padding="same", dilation=d)
    gxp, gwp, gbp = on("numpy", F.conv2d_backward, gy, xp, w, dilation=d)
    np.testing.assert_allclose(gx, gxp[:, :, lo : lo + 9, lo : lo + 8], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gw, gwp, rtol=1e-9)
    np.testing.assert_allclose(gb, gbp, rtol=1e-9)
    if d * (k - 1) < 8:
        valid = on(backend, F.conv2d, x, w, padding="valid", dilation=d)
        np.testing.assert_allclose(valid, on("numpy", F.conv2d, x, w, dilation=d), rtol=1e-10)


@pytest.mark.parametrize("backend", ["numpy", *FAST_BACKENDS])
def test_unbatched_inputs(backend, rng):
    x = rng.standard_normal((3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    y = on(backend, F.conv2d, x, w, padding=1)
    assert y.shape == (5, 8, 8)
    np.testing.assert_allclose(y, on(backend, F.conv2d, x[None], w, padding=1)[0], rtol=1e-6)
    gx, gw, gb = on(backend, F.conv2d_backward, y, x, w, padding=1)
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == (5,)
    p = on(backend, F.max_pool2d, x, 2)
    assert p.shape == (3, 4, 4)
    assert on(backend, F.max_pool2d_backward, p, x, 2).shape == x.shape
    a = on(backend, F.avg_pool2d, x, 3, 2, 1, ceil_mode=True)
    assert a.shape == (3, 5, 5)
    assert on(backend, F.avg_pool2d_backward, a, x, 3, 2, 1, ceil_mode=True).shape == x.shape


@st.composite
def pool_case(draw, with_dilation: bool):
    dtype = draw(DTYPES)
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3))) if draw(st.booleans()) else None
    p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if with_dilation else (1, 1)
    h = draw(st.integers(max(1, d[0] * (k[0] - 1) + 1 - 2 * p[0]), 12))
    w = draw(st.integers(max(1, d[1] * (k[1] - 1) + 1 - 2 * p[1]), 12))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    if draw(st.booleans()):  # small integers make ties common
        x = rng.integers(-2, 3, (n, c, h, w)).astype(dtype)
    else:
        x = rng.standard_normal((n, c, h, w)).astype(dtype)
    kw = dict(kernel_size=k, stride=s, padding=p, ceil_mode=draw(st.booleans()))
    if with_dilation:
        kw["dilation"] = d
    return maybe_noncontig(draw, x), kw, dtype


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@SETTINGS
@given(case=pool_case(with_dilation=True))
def test_max_pool2d_matches_reference(backend, case):
    x, kw, dtype = case
    want = on("numpy", F.max_pool2d, x, **kw)
    assert_same(on(backend, F.max_pool2d, x, **kw), want, dtype)
    gy = np.random.default_rng(1).standard_normal(want.shape).astype(dtype)
    assert_same(
        on(backend, F.max_pool2d_backward, gy, x, **kw),
        on("numpy", F.max_pool2d_backward, gy, x, **kw),
        dtype,
    )


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@SETTINGS
@given(case=pool_case(with_dilation=False), cip=st.booleans(),
       div=st.sampled_from([None, None, 1, 3, -2]))
def test_avg_pool2d_matches_reference(backend, case, cip, div):
    x, kw, dtype = case
    kw.update(count_include_pad=cip, divisor_override=div)
    want = on("numpy", F.avg_pool2d, x, **kw)
    assert_same(on(backend, F.avg_pool2d, x, **kw), want, dtype)
    gy = np.random.default_rng(2).standard_normal(want.shape).astype(dtype)
    assert_same(
        on(backend, F.avg_pool2d_backward, gy, x, **kw),
        on("numpy", F.avg_pool2d_backward, gy, x, **kw),
        dtype,
    )


@st.composite
def matmul_case(draw):
    dtype = draw(DTYPES)
    m, k, n = (draw(st.integers(1, 70)) for _ in range(3))
    batch = draw(st.sampled_from([None, 1, 3]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    sa = (m, k) if batch is None else (batch, m, k)
    sb = (k, n) if batch is None or draw(st.booleans()) else (batch, k, n)
    a = rng.standard_normal(sa).astype(dtype)
    b = rng.standard_normal(sb).astype(dtype)
    return maybe_noncontig(draw, a), maybe_noncontig(draw, b), dtype


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@SETTINGS
@given(case=matmul_case())
def test_matmul_matches_reference_and_numpy(backend, case):
    a, b, dtype = case
    got = on(backend, F.matmul, a, b)
    assert_same(got, on("numpy", F.matmul, a, b), dtype)
    np.testing.assert_allclose(got, a @ b, **tol(dtype))
    gy = np.random.default_rng(3).standard_normal(got.shape).astype(dtype)
    assert_same(
        on(backend, F.matmul_backward, gy, a, b), on("numpy", F.matmul_backward, gy, a, b), dtype
    )


@pytest.mark.parametrize("backend", ["numpy", *FAST_BACKENDS])
@pytest.mark.parametrize("shape", [(128, 5408), (7, 3), (2, 4, 6)])
def test_linear_and_backward(backend, shape, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((10, shape[-1])).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    y = on(backend, F.linear, x, w, b)
    np.testing.assert_allclose(y, x @ w.T + b, rtol=1e-4, atol=1e-3)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    gx, gw, gb = on(backend, F.linear_backward, gy, x, w)
    gy2, x2 = gy.reshape(-1, 10), x.reshape(-1, shape[-1])
    np.testing.assert_allclose(gx, (gy2 @ w).reshape(x.shape), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gw, gy2.T @ x2, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gb, gy2.sum(0), rtol=1e-4, atol=1e-4)
    assert gx.dtype == gw.dtype == gb.dtype == np.float32


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_elementwise_and_loss_match_reference(backend, dtype, rng):
    x = rng.standard_normal((37, 11)).astype(dtype)
    x[0, 0] = np.nan
    assert_same(on(backend, F.relu, x), on("numpy", F.relu, x), dtype)
    y = on("numpy", F.relu, x)
    gy = rng.standard_normal(x.shape).astype(dtype)
    assert_same(on(backend, F.relu_backward, gy, y), on("numpy", F.relu_backward, gy, y), dtype)
    logits = (10 * rng.standard_normal((37, 10))).astype(dtype)
    labels = rng.integers(0, 10, 37)
    loss, grad = on(backend, F.softmax_cross_entropy, logits, labels)
    rloss, rgrad = on("numpy", F.softmax_cross_entropy, logits, labels)
    np.testing.assert_allclose(float(loss), float(rloss), **tol(dtype))
    assert_same(grad, rgrad, dtype)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    "nesterov,wd,mom", [(False, 0.0, 0.0), (True, 0.01, 0.9), (False, 0.1, 0.5)]
)
def test_sgd_step_matches_reference(backend, nesterov, wd, mom, rng):
    p0 = rng.standard_normal(1000).astype(np.float32)
    states = {}
    for name in ("numpy", backend):
        p, buf = p0.copy(), np.zeros_like(p0)
        for i in range(3):
            g = np.random.default_rng(i).standard_normal(1000).astype(np.float32)
            on(name, F.sgd_step, p, g, buf if mom else None, 0.1, mom, wd, nesterov)
        states[name] = p
    np.testing.assert_allclose(states[backend], states["numpy"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("decoupled,wd", [(False, 0.0), (False, 0.01), (True, 0.01)])
def test_adam_step_matches_reference(backend, decoupled, wd, rng):
    p0 = rng.standard_normal(777).astype(np.float32)
    states = {}
    for name in ("numpy", backend):
        p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
        for i in range(1, 4):
            g = np.random.default_rng(i).standard_normal(777).astype(np.float32)
            on(name, F.adam_step, p, g, m, v, i, 1e-2, 0.9, 0.999, 1e-8, wd, decoupled)
        states[name] = (p, m, v)
    for got, want in zip(states[backend], states["numpy"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["numpy", *FAST_BACKENDS])
def test_nan_and_inf_propagate_like_reference(backend, rng):
    x = rng.standard_normal((2, 2, 6, 6))
    x[0, 0, 1, 1] = np.nan
    x[1, 1, 3, 2] = np.inf
    x[1, 0, 0, 0] = -np.inf
    w = rng.standard_normal((3, 2, 3, 3))
    for fn, args in [
        (F.conv2d, (x, w)),
        (F.max_pool2d, (x, 2)),
        (F.avg_pool2d, (x, 2)),
        (F.relu, (x,)),
    ]:
        got = on(backend, fn, *args)
        want = on("numpy", fn, *args)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=1e-10, equal_nan=True)
    y = on(backend, F.max_pool2d, x, 2)
    assert np.isnan(y[0, 0, 0, 0]) and np.isinf(y[1, 1, 1, 1])


@pytest.mark.parametrize("backend", ["numpy", *FAST_BACKENDS])
def test_empty_batch(backend):
    x = np.zeros((0, 3, 8, 8), np.float32)
    w = np.zeros((4, 3, 3, 3), np.float32)
    assert on(backend, F.conv2d, x, w, np.ones(4, np.float32)).shape == (0, 4, 6, 6)
    gx, gw, gb = on(backend, F.conv2d_backward, np.zeros((0, 4, 6, 6), np.float32), x, w)
    assert gx.shape == x.shape and gw.shape == w.shape and not gw.any() and not gb.any()
    assert on(backend, F.max_pool2d, x, 2).shape == (0, 3, 4, 4)
    assert on(backend, F.avg_pool2d, x, 2).shape == (0, 3, 4, 4)
    assert on(backend, F.max_pool2d_backward, np.zeros((0, 3, 4, 4), np.float32), x, 2).shape == (
        0, 3, 8, 8)
    assert on(backend, F.linear, np.zeros((0, 5), np.float32), np.ones((2, 5), np.float32)).shape \
        == (0, 2)
    assert on(backend, F.matmul, np.zeros((3, 0)), np.zeros((0, 4))).tolist() == [[0.0] * 4] * 3


def test_default_dispatch_uses_cpu_backend(monkeypatch):
    from fastnn.backends import cpu

    calls = []
    real = cpu.conv2d
    monkeypatch.setattr(cpu, "conv2d", lambda *a: calls.append(1) or real(*a))
    F.conv2d(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 3, 3), np.float32))
    assert calls == [1]
    with fastnn.backend("numpy"):
        F.conv2d(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 3, 3), np.float32))
    assert calls == [1]
