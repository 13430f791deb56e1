"""Tests of the NumPy reference backend (the oracle) against obviously-correct loops.

Every op of ``fastnn.backends.numpy_ref`` is checked against a nested-loop
implementation written here from torch.nn.functional's definitions, on tiny
shapes (hypothesis draws the geometry), and the backward ops additionally
against float64 central finite differences. The loop references accumulate in
Python floats (float64), so they are independent of NumPy's summation order.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastnn.backends import numpy_ref as R

DTYPES = [np.float32, np.float64]
SETTINGS = settings(max_examples=30, deadline=None)


def tol(dtype) -> dict:
    """Comparison tolerance of a backend result in ``dtype`` vs a float64 reference."""
    return dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)


def assert_result(y: np.ndarray, expected: np.ndarray, dtype, *inputs: np.ndarray) -> None:
    """y has the contract's form (dtype, C order, fresh memory) and matches expected."""
    assert isinstance(y, np.ndarray)
    assert y.dtype == dtype, f"dtype {y.dtype}, expected {np.dtype(dtype)}"
    assert y.flags.c_contiguous
    for a in inputs:
        assert not np.shares_memory(y, a), "result aliases an input"
    assert y.shape == expected.shape, f"shape {y.shape}, expected {expected.shape}"
    np.testing.assert_allclose(y, expected, equal_nan=True, **tol(dtype))


# --------------------------------------------------------------------------- #
# Loop references (torch semantics, one output element at a time)
# --------------------------------------------------------------------------- #


def out_size(size, k, s, p, d=1, ceil_mode=False):
    """torch's pooling/conv output length, including the ceil_mode rule."""
    span = size + 2 * p - d * (k - 1) - 1
    n = (-(-span // s) if ceil_mode else span // s) + 1
    # With ceil_mode the last window must start inside the input or left padding.
    if ceil_mode and (n - 1) * s >= size + p:
        n -= 1
    return n


def loop_conv2d(x, w, b, stride, padding, dilation, groups):
    n_, c_, h_, w_ = x.shape
    o_, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh_, ow_ = out_size(h_, kh, sh, ph, dh), out_size(w_, kw, sw, pw, dw)
    og = o_ // groups
    y = np.zeros((n_, o_, oh_, ow_))
    for n in range(n_):
        for o in range(o_):
            g = o // og
            for oh in range(oh_):
                for ow in range(ow_):
                    acc = 0.0 if b is None else float(b[o])
                    for ci in range(cg):
                        for i in range(kh):
                            for j in range(kw):
                                hh, ww = oh * sh - ph + i * dh, ow * sw - pw + j * dw
                                if 0 <= hh < h_ and 0 <= ww < w_:
                                    acc += float(x[n, g * cg + ci, hh, ww]) * float(w[o, ci, i, j])
                    y[n, o, oh, ow] = acc
    return y


def loop_conv2d_backward(gy, x_shape, w, stride, padding, dilation, groups, x=None):
    """(grad_x, grad_w) by scattering every output's gradient through its taps."""
    n_, c_, h_, w_ = x_shape
    o_, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    og = o_ // groups
    gx = np.zeros(x_shape)
    gw = np.zeros(w.shape)
    for n in range(n_):
        for o in range(o_):
            g = o // og
            for oh in range(gy.shape[2]):
                for ow in range(gy.shape[3]):
                    go = float(gy[n, o, oh, ow])
                    for ci in range(cg):
                        for i in range(kh):
                            for j in range(kw):
                                hh, ww = oh * sh - ph + i * dh, ow * sw - pw + j * dw
                                if 0 <= hh < h_ and 0 <= ww < w_:
                                    c = g * cg + ci
                                    gx[n, c, hh, ww] += go * float(w[o, ci, i, j])
                                    if x is not None:
                                        gw[o, ci, i, j] += go * float(x[n, c, hh, ww])
    return gx, gw


def loop_matmul(a, b):
    m, k = a.shape
    n = b.shape[1]
    c = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            c[i, j] = sum(float(a[i, t]) * float(b[t, j]) for t in range(k))
    return c


def max_window_cells(h_, w_, oh, ow, k, s, p, d):
    """The real input cells of one max-pool window, in row-major window order."""
    cells = []
    for i in range(k[0]):
        for j in range(k[1]):
            hh, ww = oh * s[0] - p[0] + i * d[0], ow * s[1] - p[1] + j * d[1]
            if 0 <= hh < h_ and 0 <= ww < w_:
                cells.append((hh, ww))
    return cells


def loop_max_pool2d(x, k, s, p, d, out_hw):
    """(y, argmax) with the contract's (torch's) rule: scanning in row-major window
    order, a cell wins when it is greater than the running max or is NaN, so the
    first maximum wins and the last NaN beats all."""
    n_, c_, h_, w_ = x.shape
    y = np.full((n_, c_) + tuple(out_hw), -np.inf)
    arg = {}
    for n in range(n_):
        for c in range(c_):
            for oh in range(out_hw[0]):
                for ow in range(out_hw[1]):
                    best, where = -math.inf, None
                    for hh, ww in max_window_cells(h_, w_, oh, ow, k, s, p, d):
                        v = float(x[n, c, hh, ww])
                        if where is None or v > best or math.isnan(v):
                            best, where = v, (hh, ww)
                    y[n, c, oh, ow] = best
                    arg[n, c, oh, ow] = where
    return y, arg


def loop_max_pool2d_backward(gy, x, k, s, p, d):
    _, arg = loop_max_pool2d(x, k, s, p, d, gy.shape[2:])
    gx = np.zeros(x.shape)
    for (n, c, oh, ow), where in arg.items():
        if where is not None:
            gx[n, c, where[0], where[1]] += float(gy[n, c, oh, ow])
    return gx


def avg_window(h_, w_, oh, ow, k, s, p, count_include_pad, divisor_override):
    """(real cells, divisor) of one avg-pool window, following torch's CPU kernel."""
    h0, w0 = oh * s[0] - p[0], ow * s[1] - p[1]
    h1, w1 = min(h0 + k[0], h_ + p[0]), min(w0 + k[1], w_ + p[1])
    pool_size = (h1 - h0) * (w1 - w0)
    h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, h_), min(w1, w_)
    cells = [(hh, ww) for hh in range(h0, h1) for ww in range(w0, w1)]
    if divisor_override is not None:
        div = divisor_override
    elif count_include_pad:
        div = pool_size
    else:
        div = len(cells)
    return cells, div


def loop_avg_pool2d(x, k, s, p, out_hw, cip, dov):
    n_, c_, h_, w_ = x.shape
    y = np.zeros((n_, c_) + tuple(out_hw))
    for n in range(n_):
        for c in range(c_):
            for oh in range(out_hw[0]):
                for ow in range(out_hw[1]):
                    cells, div = avg_window(h_, w_, oh, ow, k, s, p, cip, dov)
                    if cells:
                        y[n, c, oh, ow] = sum(float(x[n, c, a, b]) for a, b in cells) / div
    return y


def loop_avg_pool2d_backward(gy, x_shape, k, s, p, cip, dov):
    n_, c_, h_, w_ = x_shape
    gx = np.zeros(x_shape)
    for n in range(n_):
        for c in range(c_):
            for oh in range(gy.shape[2]):
                for ow in range(gy.shape[3]):
                    cells, div = avg_window(h_, w_, oh, ow, k, s, p, cip, dov)
                    for a, b in cells:
                        gx[n, c, a, b] += float(gy[n, c, oh, ow]) / div
    return gx


def loop_softmax_ce(logits, labels):
    n_, k_ = logits.shape
    total, grad = 0.0, np.zeros((n_, k_))
    for n in range(n_):
        row = [float(v) for v in logits[n]]
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        total += lse - row[labels[n]]
        for j in range(k_):
            grad[n, j] = (math.exp(row[j] - lse) - (j == labels[n])) / n_
    return total / n_, grad


# --------------------------------------------------------------------------- #
# Finite differences
# --------------------------------------------------------------------------- #


def numeric_grad(f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of the scalar f at float64 x."""
    x = x.astype(np.float64).copy()
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        up = f(x)
        x[idx] = old - eps
        down = f(x)
        x[idx] = old
        g[idx] = (up - down) / (2 * eps)
    return g


def assert_fd(analytic: np.ndarray, numeric: np.ndarray) -> None:
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- #
# Strategies
# --------------------------------------------------------------------------- #


@st.composite
def conv_geometry(draw):
    groups = draw(st.integers(1, 3))
    cg, og = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    n = draw(st.integers(0, 2))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    hw = tuple(
        max(1, d[a] * (k[a] - 1) + 1 - 2 * p[a]) + draw(st.integers(0, 4)) for a in range(2)
    )
    return dict(n=n, c=groups * cg, o=groups * og, cg=cg, hw=hw, k=k, s=s, p=p, d=d,
                groups=groups, seed=draw(st.integers(0, 2**31)))


@st.composite
def pool_geometry(draw, dilation: bool):
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    # torch requires padding <= kernel_size / 2.
    p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if dilation else (1, 1)
    ceil = draw(st.booleans())
    hw = tuple(
        max(1, d[a] * (k[a] - 1) + 1 - 2 * p[a]) + draw(st.integers(0, 4)) for a in range(2)
    )
    out_hw = tuple(out_size(hw[a], k[a], s[a], p[a], d[a], ceil) for a in range(2))
    return dict(n=draw(st.integers(0, 2)), c=draw(st.integers(1, 2)), hw=hw, k=k, s=s, p=p,
                d=d, ceil=ceil, out_hw=out_hw, seed=draw(st.integers(0, 2**31)))


# --------------------------------------------------------------------------- #
# conv2d
# --------------------------------------------------------------------------- #


def test_is_available():
    assert R.is_available() is True


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(g=conv_geometry(), with_bias=st.booleans())
def test_conv2d_matches_loops(dtype, g, with_bias):
    rng = np.random.default_rng(g["seed"])
    x = rng.standard_normal((g["n"], g["c"]) + g["hw"]).astype(dtype)
    w = rng.standard_normal((g["o"], g["cg"]) + g["k"]).astype(dtype)
    b = rng.standard_normal(g["o"]).astype(dtype) if with_bias else None
    y = R.conv2d(x, w, b, g["s"], g["p"], g["d"], g["groups"])
    expected = loop_conv2d(x, w, b, g["s"], g["p"], g["d"], g["groups"])
    assert_result(y, expected, dtype, x, w)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(g=conv_geometry())
def test_conv2d_backward_matches_loops(dtype, g):
    rng = np.random.default_rng(g["seed"])
    x = rng.standard_normal((g["n"], g["c"]) + g["hw"]).astype(dtype)
    w = rng.standard_normal((g["o"], g["cg"]) + g["k"]).astype(dtype)
    oh = out_size(g["hw"][0], g["k"][0], g["s"][0], g["p"][0], g["d"][0])
    ow = out_size(g["hw"][1], g["k"][1], g["s"][1], g["p"][1], g["d"][1])
    gy = rng.standard_normal((g["n"], g["o"], oh, ow)).astype(dtype)
    geo = (g["s"], g["p"], g["d"], g["groups"])
    gx = R.conv2d_backward_input(gy, w, g["hw"], *geo)
    gw = R.conv2d_backward_weight(gy, x, g["k"], *geo)
    ex_gx, ex_gw = loop_conv2d_backward(gy, x.shape, w, *geo, x=x)
    assert_result(gx, ex_gx, dtype, gy, w)
    assert_result(gw, ex_gw, dtype, gy, x)


@pytest.mark.parametrize(
    "stride,padding,dilation,groups",
    [((1, 1), (0, 0), (1, 1), 1), ((2, 1), (1, 2), (1, 2), 2), ((3, 2), (2, 1), (2, 1), 4)],
)
def test_conv2d_backward_finite_differences(stride, padding, dilation, groups):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, 7, 6))
    w = rng.standard_normal((4, 4 // groups, 3, 2))
    geo = (stride, padding, dilation, groups)
    y = R.conv2d(x, w, None, *geo)
    gy = rng.standard_normal(y.shape)

    gx = R.conv2d_backward_input(gy, w, (7, 6), *geo)
    gw = R.conv2d_backward_weight(gy, x, (3, 2), *geo)
    assert_fd(gx, numeric_grad(lambda v: float((R.conv2d(v, w, None, *geo) * gy).sum()), x))
    assert_fd(gw, numeric_grad(lambda v: float((R.conv2d(x, v, None, *geo) * gy).sum()), w))


def test_conv2d_batch1_odd_sizes_and_bias_broadcast():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 9, 5)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 1)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    y = R.conv2d(x, w, b, (2, 1), (1, 0), (1, 1), 1)
    assert_result(y, loop_conv2d(x, w, b, (2, 1), (1, 0), (1, 1), 1), np.float32, x, w, b)
    # The bias is per output channel: the difference with and without it is b[o].
    y0 = R.conv2d(x, w, None, (2, 1), (1, 0), (1, 1), 1)
    np.testing.assert_allclose(y - y0, np.broadcast_to(b[None, :, None, None], y.shape),
                               rtol=1e-5, atol=1e-5)


def test_conv2d_empty_batch():
    x = np.zeros((0, 2, 5, 5), np.float32)
    w = np.ones((3, 2, 3, 3), np.float32)
    geo = ((1, 1), (1, 1), (1, 1), 1)
    y = R.conv2d(x, w, np.ones(3, np.float32), *geo)
    assert y.shape == (0, 3, 5, 5) and y.dtype == np.float32
    gx = R.conv2d_backward_input(y, w, (5, 5), *geo)
    assert gx.shape == (0, 2, 5, 5) and gx.dtype == np.float32
    gw = R.conv2d_backward_weight(y, x, (3, 3), *geo)
    assert gw.shape == w.shape and gw.dtype == np.float32 and not gw.any()


# --------------------------------------------------------------------------- #
# matmul
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("batch", [None, 1, 3])
@pytest.mark.parametrize("mkn", [(1, 1, 1), (3, 5, 2), (4, 0, 3), (0, 2, 3), (7, 6, 5)])
def test_matmul_matches_loops(dtype, transpose_a, transpose_b, batch, mkn):
    m, k, n = mkn
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    lead = () if batch is None else (batch,)
    a_logical = rng.standard_normal(lead + (m, k)).astype(dtype)
    b_logical = rng.standard_normal(lead + (k, n)).astype(dtype)
    # Store the operands the way the flags say: transposed and C-contiguous.
    a = np.ascontiguousarray(a_logical.swapaxes(-1, -2)) if transpose_a else a_logical
    b = np.ascontiguousarray(b_logical.swapaxes(-1, -2)) if transpose_b else b_logical
    c = R.matmul(a, b, transpose_a, transpose_b)
    if batch is None:
        expected = loop_matmul(a_logical, b_logical)
    else:
        expected = np.stack([loop_matmul(a_logical[i], b_logical[i]) for i in range(batch)])
    assert_result(c, expected, dtype, a, b)


def test_matmul_default_flags():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert_result(R.matmul(a, b), loop_matmul(a, b), np.float32, a, b)


# --------------------------------------------------------------------------- #
# max_pool2d
# --------------------------------------------------------------------------- #


def pool_input(g, dtype, special: str):
    """Random input: 'ties' rounds to few values, 'nonfinite' sprinkles NaN/-inf/inf."""
    rng = np.random.default_rng(g["seed"])
    x = rng.standard_normal((g["n"], g["c"]) + g["hw"])
    if special == "ties":
        x = np.round(x)
    elif special == "nonfinite" and x.size:
        for v in (np.nan, -np.inf, np.inf, np.nan):
            x.flat[rng.integers(0, x.size)] = v
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(g=pool_geometry(dilation=True), special=st.sampled_from(["none", "ties", "nonfinite"]))
def test_max_pool2d_matches_loops(dtype, g, special):
    x = pool_input(g, dtype, special)
    geo = (g["k"], g["s"], g["p"], g["d"])
    y = R.max_pool2d(x, *geo, g["out_hw"])
    expected, _ = loop_max_pool2d(x, *geo, g["out_hw"])
    assert_result(y, expected, dtype, x)

    gy = np.random.default_rng(g["seed"] + 1).standard_normal(y.shape).astype(dtype)
    gx = R.max_pool2d_backward(gy, x, *geo)
    assert_result(gx, loop_max_pool2d_backward(gy, x, *geo), dtype, x, gy)


def test_max_pool2d_backward_finite_differences():
    rng = np.random.default_rng(11)
    # Distinct, well-separated values so the argmax is stable under +-eps.
    x = (rng.permutation(2 * 3 * 7 * 6) * 0.1).reshape(2, 3, 7, 6).astype(np.float64)
    for geo, ceil in [
        (((2, 2), (2, 2), (0, 0), (1, 1)), False),
        (((3, 2), (2, 1), (1, 1), (1, 2)), True),
        (((3, 3), (1, 2), (1, 0), (2, 1)), True),
    ]:
        k, s, p, d = geo
        out_hw = tuple(out_size(x.shape[2 + a], k[a], s[a], p[a], d[a], ceil) for a in range(2))
        gy = rng.standard_normal((2, 3) + out_hw)
        gx = R.max_pool2d_backward(gy, x, *geo)
        num = numeric_grad(lambda v, geo=geo, out_hw=out_hw, gy=gy: float(
            (R.max_pool2d(v, *geo, out_hw) * gy).sum()), x, eps=1e-4)
        assert_fd(gx, num)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool2d_ties_go_to_first_maximum(dtype):
    x = np.array([[[[1, 3, 3, 2]]]], dtype)
    gx = R.max_pool2d_backward(np.ones((1, 1, 1, 1), dtype), x, (1, 4), (1, 4), (0, 0), (1, 1))
    np.testing.assert_array_equal(gx, [[[[0, 1, 0, 0]]]])
    # 2-D window of equal values: row-major first, i.e. the top-left cell.
    x = np.full((1, 1, 2, 2), 5, dtype)
    gx = R.max_pool2d_backward(np.full((1, 1, 1, 1), 2, dtype), x, (2, 2), (2, 2), (0, 0), (1, 1))
    np.testing.assert_array_equal(gx, [[[[2, 0], [0, 0]]]])
    # Row-major means a tie on a later row loses to an earlier row, even further left.
    x = np.array([[[[0, 4], [4, 0]]]], dtype)
    gx = R.max_pool2d_backward(np.ones((1, 1, 1, 1), dtype), x, (2, 2), (2, 2), (0, 0), (1, 1))
    np.testing.assert_array_equal(gx, [[[[0, 1], [0, 0]]]])
    # Overlapping windows accumulate on their shared winner.
    x = np.array([[[[1, 9, 2]]]], dtype)
    gx = R.max_pool2d_backward(np.array([[[[2, 3]]]], dtype), x, (1, 2), (1, 1), (0, 0), (1, 1))
    np.testing.assert_array_equal(gx, [[[[0, 5, 0]]]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool2d_nan_propagates_and_last_nan_wins(dtype):
    nan = np.nan
    x = np.array([[[[nan, 1, nan, 2], [0, 7, 1, 1]]]], dtype)
    geo = ((2, 2), (2, 2), (0, 0), (1, 1))
    y = R.max_pool2d(x, *geo, (1, 2))
    assert np.isnan(y[0, 0, 0, 0]) and np.isnan(y[0, 0, 0, 1])
    gx = R.max_pool2d_backward(np.array([[[[1, 2]]]], dtype), x, *geo)
    # The contract's (torch's) rule: the last NaN in row-major window order gets
    # the gradient, and is the index max_pool2d_with_indices returns.
    np.testing.assert_array_equal(gx, [[[[1, 0, 2, 0], [0, 0, 0, 0]]]])
    x[0, 0, 1, 0] = nan
    gx = R.max_pool2d_backward(np.array([[[[1, 2]]]], dtype), x, *geo)
    np.testing.assert_array_equal(gx, [[[[0, 0, 2, 0], [1, 0, 0, 0]]]])
    _, ind = R.max_pool2d_with_indices(x, *geo, (1, 2))
    np.testing.assert_array_equal(ind, [[[[4, 2]]]])
    # A NaN after a larger finite value still wins.
    x = np.array([[[[5, nan]]]], dtype)
    gx = R.max_pool2d_backward(np.ones((1, 1, 1, 1), dtype), x, (1, 2), (1, 2), (0, 0), (1, 1))
    np.testing.assert_array_equal(gx, [[[[0, 1]]]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool2d_padding_never_wins(dtype):
    # All-(-inf) input: padded cells are -inf too, but only real cells may win.
    x = np.full((1, 1, 1, 3), -np.inf, dtype)
    geo = ((1, 2), (1, 1), (0, 1), (1, 1))
    y = R.max_pool2d(x, *geo, (1, 4))
    np.testing.assert_array_equal(y, np.full((1, 1, 1, 4), -np.inf))
    gx = R.max_pool2d_backward(np.ones((1, 1, 1, 4), dtype), x, *geo)
    np.testing.assert_array_equal(gx, [[[[2, 1, 1]]]])
    # Negative inputs beside zero padding: the max is a real (negative) value.
    x = -np.arange(1, 5, dtype=dtype).reshape(1, 1, 2, 2)
    y = R.max_pool2d(x, (2, 2), (1, 1), (1, 1), (1, 1), (3, 3))
    np.testing.assert_array_equal(y, [[[[-1, -1, -2], [-1, -1, -2], [-3, -3, -4]]]])


def test_max_pool2d_ceil_mode_clips_windows():
    x = np.arange(25, dtype=np.float64).reshape(1, 1, 5, 5)
    geo = ((2, 2), (2, 2), (0, 0), (1, 1))
    y = R.max_pool2d(x, *geo, (3, 3))
    # The last row/column of windows hold only row/column 4 of the input.
    np.testing.assert_array_equal(y[0, 0], [[6, 8, 9], [16, 18, 19], [21, 23, 24]])
    gx = R.max_pool2d_backward(np.ones((1, 1, 3, 3)), x, *geo)
    assert gx.sum() == 9 and gx[0, 0, 4, 4] == 1 and gx[0, 0, 4, 0] == 0


def test_max_pool2d_empty_batch():
    x = np.zeros((0, 3, 6, 6), np.float32)
    geo = ((2, 2), (2, 2), (1, 1), (1, 1))
    y = R.max_pool2d(x, *geo, (4, 4))
    assert y.shape == (0, 3, 4, 4) and y.dtype == np.float32
    gx = R.max_pool2d_backward(y, x, *geo)
    assert gx.shape == x.shape and gx.dtype == np.float32


# --------------------------------------------------------------------------- #
# avg_pool2d
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(g=pool_geometry(dilation=False), cip=st.booleans(),
       dov=st.sampled_from([None, None, 1, 3, 7]))
def test_avg_pool2d_matches_loops(dtype, g, cip, dov):
    x = pool_input(g, dtype, "none")
    geo = (g["k"], g["s"], g["p"])
    y = R.avg_pool2d(x, *geo, g["out_hw"], cip, dov)
    assert_result(y, loop_avg_pool2d(x, *geo, g["out_hw"], cip, dov), dtype, x)

    gy = np.random.default_rng(g["seed"] + 1).standard_normal(y.shape).astype(dtype)
    gx = R.avg_pool2d_backward(gy, g["hw"], *geo, cip, dov)
    assert_result(gx, loop_avg_pool2d_backward(gy, x.shape, *geo, cip, dov), dtype, gy)


@pytest.mark.parametrize("cip,dov", [(True, None), (False, None), (True, 5), (False, 2)])
def test_avg_pool2d_backward_finite_differences(cip, dov):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 2, 7, 6))
    k, s, p = (3, 2), (2, 2), (1, 1)
    out_hw = (out_size(7, 3, 2, 1, 1, True), out_size(6, 2, 2, 1, 1, True))
    gy = rng.standard_normal((2, 2) + out_hw)
    gx = R.avg_pool2d_backward(gy, (7, 6), k, s, p, cip, dov)
    num = numeric_grad(lambda v: float((R.avg_pool2d(v, k, s, p, out_hw, cip, dov) * gy).sum()), x)
    assert_fd(gx, num)


def test_avg_pool2d_divisor_rules():
    # 5x5 ramp, 3x3 windows, stride 2, padding 1, ceil_mode -> 3x3 outputs.
    x = np.arange(25, dtype=np.float64).reshape(1, 1, 5, 5)
    geo = ((3, 3), (2, 2), (1, 1), (3, 3))
    corner_sum = 0 + 1 + 5 + 6  # window at (0, 0) holds 4 real cells and 5 padded ones
    y = R.avg_pool2d(x, *geo, count_include_pad=True, divisor_override=None)
    assert y[0, 0, 0, 0] == pytest.approx(corner_sum / 9)
    y = R.avg_pool2d(x, *geo, count_include_pad=False, divisor_override=None)
    assert y[0, 0, 0, 0] == pytest.approx(corner_sum / 4)
    y = R.avg_pool2d(x, *geo, count_include_pad=True, divisor_override=2)
    assert y[0, 0, 0, 0] == pytest.approx(corner_sum / 2)
    # ceil_mode with no padding: the last window runs past the input and its
    # divisor is clipped to the input even with count_include_pad.
    geo = ((2, 2), (2, 2), (0, 0), (3, 3))
    y = R.avg_pool2d(x, *geo, count_include_pad=True, divisor_override=None)
    assert y[0, 0, 2, 2] == 24 and y[0, 0, 0, 2] == pytest.approx((4 + 9) / 2)
    # 6x6 input, 3x3 windows, stride 2, padding 1, ceil_mode -> 4x4 outputs. The
    # last window starts at h0 = 5 and reaches row 7: row 6 is padding (counted),
    # row 7 lies past the padded input (not counted), so the divisor is 2 * 2.
    x = np.arange(36, dtype=np.float64).reshape(1, 1, 6, 6)
    assert out_size(6, 3, 2, 1, 1, ceil_mode=True) == 4
    y = R.avg_pool2d(x, (3, 3), (2, 2), (1, 1), (4, 4), True, None)
    assert y[0, 0, 3, 3] == pytest.approx(35 / 4)
    assert y[0, 0, 1, 1] == pytest.approx(x[0, 0, 1:4, 1:4].mean())


def test_avg_pool2d_empty_batch():
    x = np.zeros((0, 2, 4, 4), np.float32)
    y = R.avg_pool2d(x, (2, 2), (2, 2), (0, 0), (2, 2), True, None)
    assert y.shape == (0, 2, 2, 2) and y.dtype == np.float32
    gx = R.avg_pool2d_backward(y, (4, 4), (2, 2), (2, 2), (0, 0), True, None)
    assert gx.shape == x.shape and gx.dtype == np.float32


# --------------------------------------------------------------------------- #
# relu and softmax cross-entropy
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_and_backward(dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 5)).astype(dtype)
    x[0, 0, :3] = [0.0, np.nan, -np.inf]
    y = R.relu(x)
    expected = np.array([max(float(v), 0.0) if not math.isnan(v) else v for v in x.ravel()])
    assert_result(y, expected.reshape(x.shape), dtype, x)
    gy = rng.standard_normal(x.shape).astype(dtype)
    gx = R.relu_backward(gy, y)
    expected = np.array([g if v > 0 else 0.0 for g, v in zip(gy.ravel(), y.ravel())])
    assert_result(gx, expected.reshape(x.shape), dtype, gy, y)
    # All-positive input still gives a new array, never the input itself.
    pos = np.abs(x[1:]) + 1
    assert not np.shares_memory(R.relu(pos), pos)
    empty = np.zeros((0, 3), dtype)
    assert R.relu(empty).shape == (0, 3) and R.relu_backward(empty, empty).shape == (0, 3)


def test_relu_backward_finite_differences():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 6))
    x[np.abs(x) < 1e-2] = 0.5  # keep away from the kink
    gy = rng.standard_normal(x.shape)
    gx = R.relu_backward(gy, R.relu(x))
    assert_fd(gx, numeric_grad(lambda v: float((R.relu(v) * gy).sum()), x))


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(n=st.integers(1, 6), k=st.integers(1, 6), scale=st.sampled_from([1.0, 30.0, 1e4]),
       seed=st.integers(0, 2**31))
def test_softmax_cross_entropy_matches_loops(dtype, n, k, scale, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, k)) * scale).astype(dtype)
    labels = rng.integers(0, k, n).astype(np.int64)
    loss, grad = R.softmax_cross_entropy(logits, labels)
    ex_loss, ex_grad = loop_softmax_ce(logits, labels)
    assert isinstance(loss, np.ndarray) and loss.shape == () and loss.dtype == dtype
    assert np.isfinite(loss)
    # log(sum(exp)) rounds to ~K ulps of 1, an absolute error that dominates a tiny loss.
    np.testing.assert_allclose(loss, ex_loss, **tol(dtype))
    assert_result(grad, ex_grad, dtype, logits)


def test_softmax_cross_entropy_finite_differences():
    rng = np.random.default_rng(9)
    logits = rng.standard_normal((5, 4)) * 3
    labels = rng.integers(0, 4, 5)
    _, grad = R.softmax_cross_entropy(logits, labels)
    num = numeric_grad(lambda v: float(R.softmax_cross_entropy(v, labels)[0]), logits)
    assert_fd(grad, num)
    # Each row of softmax - onehot sums to zero.
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_empty_batch(dtype):
    loss, grad = R.softmax_cross_entropy(np.zeros((0, 10), dtype), np.zeros(0, np.int64))
    # torch: the mean over an empty batch is NaN.
    assert loss.shape == () and loss.dtype == dtype and np.isnan(loss)
    assert grad.shape == (0, 10) and grad.dtype == dtype


# --------------------------------------------------------------------------- #
# Optimizer steps
# --------------------------------------------------------------------------- #


def loop_sgd(p, grads, lr, momentum, wd, nesterov):
    """torch.optim.SGD (dampening 0), element by element, in Python floats."""
    p = [float(v) for v in p]
    buf = None
    for grad in grads:
        for i in range(len(p)):
            g = float(grad[i]) + wd * p[i]
            if momentum:
                if buf is None:
                    buf = [0.0] * len(p)
                buf[i] = momentum * buf[i] + g
                g = g + momentum * buf[i] if nesterov else buf[i]
            p[i] -= lr * g
    return np.array(p), (None if buf is None else np.array(buf))


def loop_adam(p, grads, lr, b1, b2, eps, wd, decoupled):
    p = [float(v) for v in p]
    m, v = [0.0] * len(p), [0.0] * len(p)
    for t, grad in enumerate(grads, start=1):
        for i in range(len(p)):
            g = float(grad[i])
            if decoupled:
                p[i] *= 1 - lr * wd
            else:
                g += wd * p[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            p[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return np.array(p), np.array(m), np.array(v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "momentum,wd,nesterov",
    [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.05, True), (0.5, 0.1, False), (0.0, 0.1, False)],
)
def test_sgd_step_matches_loops(dtype, momentum, wd, nesterov):
    rng = np.random.default_rng(21)
    p0 = rng.standard_normal(7)
    grads = [rng.standard_normal(7) for _ in range(3)]
    param = p0.astype(dtype)
    buf = np.zeros(7, dtype) if momentum else None
    for g in grads:
        assert R.sgd_step(param, g.astype(dtype), buf, 0.1, momentum, wd, nesterov) is None
    ex_p, ex_buf = loop_sgd(p0.astype(dtype), [g.astype(dtype) for g in grads],
                            0.1, momentum, wd, nesterov)
    assert param.dtype == dtype
    np.testing.assert_allclose(param, ex_p, **tol(dtype))
    if momentum:
        assert buf.dtype == dtype
        np.testing.assert_allclose(buf, ex_buf, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (0.1, False), (0.1, True), (0.0, True)])
def test_adam_step_matches_loops(dtype, wd, decoupled):
    rng = np.random.default_rng(22)
    p0 = rng.standard_normal((2, 3))
    grads = [rng.standard_normal((2, 3)) for _ in range(3)]
    param = p0.astype(dtype)
    m, v = np.zeros((2, 3), dtype), np.zeros((2, 3), dtype)
    hyper = (0.01, 0.9, 0.99, 1e-8, wd, decoupled)
    for step, g in enumerate(grads, start=1):
        assert R.adam_step(param, g.astype(dtype), m, v, step, *hyper) is None
    ex_p, ex_m, ex_v = loop_adam(p0.astype(dtype).ravel(),
                                 [g.astype(dtype).ravel() for g in grads], *hyper)
    for got, ex in ((param, ex_p), (m, ex_m), (v, ex_v)):
        assert got.dtype == dtype
        np.testing.assert_allclose(got.ravel(), ex, **tol(dtype))


@pytest.mark.parametrize("row, winners", [
    ([np.nan, 1.0, np.nan], [0, 2]),   # each window's only NaN
    ([np.nan, np.nan, 1.0], [1, 1]),   # the last NaN of the first window
    ([1.0, np.nan, np.nan], [1, 2]),
    ([2.0, 2.0, 1.0], [0, 1]),         # ties: the first maximum
])
def test_max_pool2d_nan_and_tie_winners(row, winners):
    """Worked cases of the winner rule (each checked against torch 2.13 by hand)."""
    x = np.array(row, np.float32).reshape(1, 1, 1, 3)
    geo = ((1, 2), (1, 1), (0, 0), (1, 1))
    _, idx = R.max_pool2d_with_indices(x, *geo, (1, 2))
    assert idx.ravel().tolist() == winners
    _, arg = loop_max_pool2d(x, *geo, (1, 2))
    assert [arg[0, 0, 0, j][1] for j in range(2)] == winners
    gy = np.ones((1, 1, 1, 2), np.float32)
    expected = np.bincount(winners, minlength=3).astype(np.float32)
    np.testing.assert_array_equal(R.max_pool2d_backward(gy, x, *geo).ravel(), expected)
