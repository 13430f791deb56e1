"""Fused conv2d + ReLU + max_pool2d: the op, its autograd node and nn.Sequential's use of it.

The fused forward must equal ``max_pool2d(relu(conv2d(x)))`` bit for bit on every
backend; gradients must match backpropagation through the separate ops (up to the
summation order of grad_weight / grad_bias) and finite differences.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastnn
import fastnn.functional as F
from fastnn import nn
from fastnn.autograd import Tensor
from fastnn.gradcheck import gradcheck

# (N, C, H, W, O, conv kwargs, pool kwargs)
CASES = [
    (5, 1, 12, 12, 4, {}, {"pool_kernel_size": 2}),  # the MNIST block, small
    (64, 1, 10, 10, 8, {}, {"pool_kernel_size": 2}),  # N >= 2 * threads: per-image path
    (3, 4, 9, 11, 6, {"padding": 1}, {"pool_kernel_size": 3, "pool_stride": 2}),
    (2, 4, 8, 8, 4, {"groups": 2, "stride": 2, "padding": 2},
     {"pool_kernel_size": 2, "pool_padding": 1, "pool_ceil_mode": True}),
    (3, 2, 9, 9, 3, {"padding": "same", "dilation": 2},
     {"pool_kernel_size": 3, "pool_stride": 1, "pool_dilation": 2}),
    (20, 8, 12, 12, 16, {"padding": 1}, {"pool_kernel_size": 2}),  # Winograd conv path
    # 13-wide rows: F(4x4) per image (AVX-512 float32) inside the per-image sums
    (8, 8, 13, 13, 16, {"padding": 1}, {"pool_kernel_size": 2}),
]
IDS = ["mnist-like", "per-image", "pad-k3s2", "groups-ceil", "same-dil", "winograd",
       "winograd-f4"]

POOL_KEYS = ("pool_kernel_size", "pool_stride", "pool_padding", "pool_dilation",
             "pool_ceil_mode")


def _unfused_pool_kwargs(pk: dict) -> dict:
    return {k[len("pool_"):]: v for k, v in pk.items()}


def _data(rng, case, dtype):
    n, c, h, w, o, ck, _ = case
    g = ck.get("groups", 1)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = (rng.standard_normal((o, c // g, 3, 3)) * 0.4).astype(dtype)
    b = (rng.standard_normal(o) * 0.2).astype(dtype)
    return x, wt, b


def _unfused(x, wt, b, ck, pk):
    return F.max_pool2d(F.relu(F.conv2d(x, wt, b, **ck)), **_unfused_pool_kwargs(pk))


def _unfused_grads(gy, x, wt, b, ck, pk):
    r = F.relu(F.conv2d(x, wt, b, **ck))
    g = F.relu_backward(F.max_pool2d_backward(gy, r, **_unfused_pool_kwargs(pk)), r)
    return F.conv2d_backward(g, x, wt, **ck)


def _close(got, want, dtype, name=""):
    # Sums of many terms in another order: compare against the array's scale.
    eps = 1e-5 if dtype == np.float32 else 1e-12
    scale = max(float(np.abs(want).max(initial=0.0)), 1.0)
    np.testing.assert_allclose(got, want, rtol=eps, atol=eps * scale, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_bit_identical(host_backend, rng, case, dtype):
    x, wt, b = _data(rng, case, dtype)
    ck, pk = case[5], case[6]
    with fastnn.backend(host_backend):
        want = _unfused(x, wt, b, ck, pk)
        got = F.conv2d_relu_max_pool2d(x, wt, b, **ck, **pk)
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_matches_unfused(host_backend, rng, case, dtype):
    x, wt, b = _data(rng, case, dtype)
    ck, pk = case[5], case[6]
    with fastnn.backend(host_backend):
        y = F.conv2d_relu_max_pool2d(x, wt, b, **ck, **pk)
        gy = rng.standard_normal(y.shape).astype(dtype)
        want = _unfused_grads(gy, x, wt, b, ck, pk)
        got = F.conv2d_relu_max_pool2d_backward(gy, x, wt, b, **ck, **pk)
    for name, g, w in zip(("grad_x", "grad_w", "grad_b"), got, want):
        assert g.shape == w.shape and g.dtype == dtype, name
        _close(g, w, dtype, name)


def test_backward_output_mask_and_no_bias(host_backend, rng):
    case = CASES[0]
    x, wt, _ = _data(rng, case, np.float64)
    with fastnn.backend(host_backend):
        y = F.conv2d_relu_max_pool2d(x, wt, None, pool_kernel_size=2)
        gy = rng.standard_normal(y.shape)
        gx, gw, gb = F.conv2d_relu_max_pool2d_backward(
            gy, x, wt, None, pool_kernel_size=2, output_mask=(False, True, False))
        want = _unfused_grads(gy, x, wt, None, {}, {"pool_kernel_size": 2})
    assert gx is None and gb is None
    np.testing.assert_allclose(gw, want[1], rtol=1e-12, atol=1e-12)


def test_ties_and_dead_units(host_backend, rng):
    """All-negative windows (relu ties at 0) and exact ties among positives: the
    first maximum gets the gradient, and only where the pooled value is > 0."""
    x = np.zeros((4, 1, 6, 6))
    x[:, :, ::2, ::2] = 1.0  # ties inside each 2x2 window of the conv output below
    x[1] = -1.0
    wt = np.zeros((2, 1, 1, 1))
    wt[0] = 1.0
    wt[1] = -1.0
    b = np.array([0.0, 0.0])
    gy = rng.standard_normal((4, 2, 3, 3))
    with fastnn.backend(host_backend):
        np.testing.assert_array_equal(F.conv2d_relu_max_pool2d(x, wt, b, pool_kernel_size=2),
                                      _unfused(x, wt, b, {}, {"pool_kernel_size": 2}))
        got = F.conv2d_relu_max_pool2d_backward(gy, x, wt, b, pool_kernel_size=2)
        want = _unfused_grads(gy, x, wt, b, {}, {"pool_kernel_size": 2})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_nan_propagates_and_gets_no_gradient(host_backend):
    x = np.ones((2, 1, 4, 4), dtype=np.float32)
    x[0, 0, 1, 1] = np.nan
    wt = np.ones((1, 1, 1, 1), dtype=np.float32)
    with fastnn.backend(host_backend):
        y = F.conv2d_relu_max_pool2d(x, wt, None, pool_kernel_size=2)
        gx, _, _ = F.conv2d_relu_max_pool2d_backward(np.ones_like(y), x, wt, None,
                                                     pool_kernel_size=2)
        want = _unfused_grads(np.ones_like(y), x, wt, None, {}, {"pool_kernel_size": 2})[0]
    assert np.isnan(y[0, 0, 0, 0]) and not np.isnan(y[1]).any()
    np.testing.assert_array_equal(gx, want)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("ow", [1, 13, 16, 17])
def test_backward_special_values_per_image(host_backend, rng, ow, threads):
    """On the per-image path (N >= 2 x threads) the forward equals relu -> max_pool2d
    bit for bit and the backward routes each window's gradient exactly as
    relu -> max_pool2d_backward -> relu_backward do, for float32 rows up to a vector
    wide (the one-pass AVX-512 kernels) and past it: NaN, +-inf, ties, all-negative
    windows, -0.0. A 1x1 identity conv makes grad_x that routing."""
    n, c, oh = 6, 3, 5
    x = rng.standard_normal((n, c, 2 * oh, 2 * ow)).astype(np.float32)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 2.0, -1.0], dtype=np.float32)
    mask = rng.random(x.shape) < 0.25
    x[mask] = rng.choice(specials, size=int(mask.sum()))
    x[0, 0, :2, :2] = [[np.inf, -np.inf], [1.0, 2.0]]  # inf wins; no NaN from inf + -inf
    x[0, 1, :2, :2] = [[3.0, 3.0], [3.0, 3.0]]  # ties: the first tap
    x[0, 2, :2, :2] = [[-1.0, -0.0], [-2.0, -3.0]]  # max <= 0: no gradient
    x[1, 0, :2, :2] = [[5.0, np.nan], [1.0, 2.0]]  # a NaN anywhere: no gradient
    wt = np.eye(c, dtype=np.float32).reshape(c, c, 1, 1)
    b = np.zeros(c, dtype=np.float32)
    gy = rng.standard_normal((n, c, oh, ow)).astype(np.float32)
    old = fastnn.get_num_threads()
    fastnn.set_num_threads(threads)
    try:
        # inf * 0 in the NumPy reference's products is NaN on purpose here.
        with fastnn.backend(host_backend), np.errstate(invalid="ignore"):
            y = F.conv2d_relu_max_pool2d(x, wt, b, pool_kernel_size=2)
            y_want = _unfused(x, wt, b, {}, {"pool_kernel_size": 2})
            gx, gw, gb = F.conv2d_relu_max_pool2d_backward(gy, x, wt, b, pool_kernel_size=2)
            want = _unfused_grads(gy, x, wt, b, {}, {"pool_kernel_size": 2})
            y2, codes = F.conv2d_relu_max_pool2d(x, wt, b, pool_kernel_size=2,
                                                 return_argmax=True)
            by_codes = F.conv2d_relu_max_pool2d_backward(gy, x, wt, b, pool_kernel_size=2,
                                                         argmax=codes)
        with fastnn.backend("numpy"), np.errstate(invalid="ignore"):
            _, codes_ref = F.conv2d_relu_max_pool2d(x, wt, b, pool_kernel_size=2,
                                                    return_argmax=True)
    finally:
        fastnn.set_num_threads(old)
    np.testing.assert_array_equal(y.view(np.uint32), y_want.view(np.uint32))  # -0.0 too
    np.testing.assert_array_equal(y2.view(np.uint32), y.view(np.uint32))
    np.testing.assert_array_equal(codes, codes_ref)
    for got, recomputed in zip(by_codes, (gx, gw, gb)):
        np.testing.assert_array_equal(got, recomputed)
    np.testing.assert_array_equal(gx, want[0])
    np.testing.assert_array_equal(np.isnan(gw), np.isnan(want[1]))
    _close(np.nan_to_num(gw), np.nan_to_num(want[1]), np.float32)
    _close(gb, want[2], np.float32)


# First layers: one input channel, 3x3, no padding, the exact 2x2 pool. The AVX-512
# float32 build runs conv, relu and pool in registers, and (without grad_x) the
# weight and bias gradients straight from the codes. (N, H, W): MNIST's 28x28; 16
# pooled columns (a whole vector); 2 and 3 columns; one pooled row; batch 1.
CONV1_SHAPES = [(6, 28, 28), (3, 34, 34), (4, 6, 8), (2, 4, 6), (1, 10, 12)]


def _conv1_data(rng, shape, specials):
    n, h, w = shape
    x = rng.standard_normal((n, 1, h, w)).astype(np.float32)
    if specials:  # image 0 only, so the other images' gradients stay finite
        vals = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0], dtype=np.float32)
        mask = rng.random((h, w)) < 0.1
        x[0, 0][mask] = rng.choice(vals, size=int(mask.sum()))
        x[-1, 0, :4, :4] = 0.0  # zero taps: +-0.0 outputs from the bias below
    wt = (rng.standard_normal((8, 1, 3, 3)) * 0.4).astype(np.float32)
    wt[2] = 0.0
    b = (rng.standard_normal(8) * 0.2).astype(np.float32)
    b[0] = -1e3  # nothing > 0: no gradient anywhere in channel 0
    b[1] = -0.0
    b[2] = -0.0
    return x, wt, b


def _codes_2x2(r):
    """Window codes of the 2x2 stride-2 pool over r = relu(conv) (N, C, 2*POH, 2*POW),
    by their definition: the first maximum's tap, 255 where it is not > 0 or a
    NaN is in the window."""
    n, c, h, w = r.shape
    t = r.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    t = t.reshape(n, c, h // 2, w // 2, 4)
    nan = np.isnan(t).any(axis=-1)
    code = np.argmax(np.where(np.isnan(t), -np.inf, t), axis=-1)
    best = np.take_along_axis(t, code[..., None], axis=-1)[..., 0]
    return np.where(nan | ~(best > 0), 255, code).astype(np.uint8)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("specials", [False, True], ids=["finite", "specials"])
@pytest.mark.parametrize("shape", CONV1_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_first_layer_path(host_backend, rng, shape, specials, threads):
    """The one-input-channel fused kernels: the forward equals relu -> max_pool2d of
    the conv bit for bit (-0.0 and NaN too) with the reference's codes, and the
    weight and bias gradients without grad_x are the same bits whether routed by
    the codes or recomputed, and match backpropagation through the separate ops."""
    x, wt, b = _conv1_data(rng, shape, specials)
    old = fastnn.get_num_threads()
    fastnn.set_num_threads(threads)
    mask = (False, True, True)
    try:
        with fastnn.backend(host_backend), np.errstate(invalid="ignore", over="ignore"):
            y, codes = F.conv2d_relu_max_pool2d(x, wt, b, pool_kernel_size=2,
                                                return_argmax=True)
            y_want = _unfused(x, wt, b, {}, {"pool_kernel_size": 2})
            codes_want = _codes_2x2(F.relu(F.conv2d(x, wt, b)))
            gy = rng.standard_normal(y.shape).astype(np.float32)
            by_codes = F.conv2d_relu_max_pool2d_backward(gy, x, wt, b, pool_kernel_size=2,
                                                         argmax=codes, output_mask=mask)
            recomputed = F.conv2d_relu_max_pool2d_backward(gy, x, wt, b, pool_kernel_size=2,
                                                           output_mask=mask)
            want = _unfused_grads(gy, x, wt, b, {}, {"pool_kernel_size": 2})
        with fastnn.backend("numpy"), np.errstate(invalid="ignore", over="ignore"):
            _, codes_ref = F.conv2d_relu_max_pool2d(x, wt, b, pool_kernel_size=2,
                                                    return_argmax=True)
    finally:
        fastnn.set_num_threads(old)
    if host_backend == "cpu":  # the numpy backend's own ops are the oracle here
        np.testing.assert_array_equal(y.view(np.uint32), y_want.view(np.uint32))
    else:
        np.testing.assert_array_equal(y, y_want)
    np.testing.assert_array_equal(codes, codes_want)
    if not specials:  # with inf inputs the Winograd and direct convs differ
        np.testing.assert_array_equal(codes, codes_ref)
    assert by_codes[0] is None and recomputed[0] is None
    for got, again in zip(by_codes[1:], recomputed[1:]):
        np.testing.assert_array_equal(got, again)
    gw, gb = by_codes[1:]
    assert specials or gb[0] == 0.0  # an inf input can beat the bias
    _close(gb, want[2], np.float32, "grad_b")
    if specials:
        # A non-finite input reaches the weight gradient through different products
        # in the Winograd and direct sums; where the input is finite they agree.
        assert not np.isfinite(gw).all()
    else:
        _close(gw, want[1], np.float32, "grad_w")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_argmax_codes_and_backward_by_them(host_backend, rng, case, dtype):
    """return_argmax gives the reference's codes (the first maximum's window tap,
    255 where no gradient passes), and the backward routed by them equals the
    recomputing backward: bit for bit on one backend, as the codes are the
    same decisions."""
    x, wt, b = _data(rng, case, dtype)
    ck, pk = case[5], case[6]
    b[0] = -1e3  # channel 0: nothing > 0, no gradient anywhere
    with fastnn.backend(host_backend):
        y, codes = F.conv2d_relu_max_pool2d(x, wt, b, **ck, **pk, return_argmax=True)
        np.testing.assert_array_equal(y, F.conv2d_relu_max_pool2d(x, wt, b, **ck, **pk))
        gy = rng.standard_normal(y.shape).astype(dtype)
        want = F.conv2d_relu_max_pool2d_backward(gy, x, wt, b, **ck, **pk)
        got = F.conv2d_relu_max_pool2d_backward(gy, x, wt, b, **ck, **pk, argmax=codes)
    with fastnn.backend("numpy"):
        _, codes_ref = F.conv2d_relu_max_pool2d(x, wt, b, **ck, **pk, return_argmax=True)
    assert codes.dtype == np.uint8 and codes.shape == y.shape
    np.testing.assert_array_equal(codes, codes_ref)
    assert (codes == 255).any() and (codes != 255).any()
    np.testing.assert_array_equal(codes == 255, ~(y > 0))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_argmax_codes_by_hand():
    """Codes are kh * KW + kw of the first maximum, on a window small enough to read."""
    x = np.array([[[[1.0, 3.0, -1.0, -2.0],
                    [3.0, 2.0, -3.0, -4.0],
                    [0.0, 0.0, 5.0, 1.0],
                    [0.0, 7.0, 1.0, 4.0]]]])
    wt = np.ones((1, 1, 1, 1))
    for backend in ("numpy", "cpu"):
        with fastnn.backend(backend):
            _, codes = F.conv2d_relu_max_pool2d(x, wt, None, pool_kernel_size=2,
                                                return_argmax=True)
        np.testing.assert_array_equal(codes[0, 0], [[1, 255], [3, 0]], err_msg=backend)


def test_argmax_bad_values_raise(host_backend, rng):
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    wt = rng.standard_normal((3, 1, 3, 3)).astype(np.float32)
    with fastnn.backend(host_backend):
        y, codes = F.conv2d_relu_max_pool2d(x, wt, None, pool_kernel_size=2, pool_padding=1,
                                            return_argmax=True)
        gy = np.ones_like(y)

        def bwd(argmax):
            return F.conv2d_relu_max_pool2d_backward(gy, x, wt, None, pool_kernel_size=2,
                                                     pool_padding=1, argmax=argmax)

        with pytest.raises(TypeError, match="argmax must be uint8"):
            bwd(codes.astype(np.int64))
        with pytest.raises(TypeError, match="argmax"):
            bwd(codes.tolist())
        with pytest.raises(ValueError, match="argmax must have the output's shape"):
            bwd(codes[:1])
        with pytest.raises(ValueError, match="pool window of at most 255 taps"):
            F.conv2d_relu_max_pool2d(np.zeros((1, 1, 20, 20), np.float32), wt, None,
                                     pool_kernel_size=(16, 16), return_argmax=True)
    if host_backend == "cpu":
        forged = codes.copy()
        forged[0, 0, 0, 0] = 4  # not a tap of a 2x2 window
        with fastnn.backend("cpu"), pytest.raises(ValueError, match="argmax holds codes"):
            bwd(forged)
        # Tap 0 of the first window is in the padding: ignored, never written.
        forged = codes.copy()
        forged[:, :, 0, 0] = 0
        with fastnn.backend("cpu"):
            gx, gw, gb = bwd(forged)
        assert np.isfinite(gx).all() and np.isfinite(gw).all()


def test_unbatched_and_empty(host_backend, rng):
    x = rng.standard_normal((2, 7, 7))
    wt = rng.standard_normal((3, 2, 3, 3))
    with fastnn.backend(host_backend):
        y = F.conv2d_relu_max_pool2d(x, wt, None, pool_kernel_size=2)
        assert y.shape == (3, 2, 2)
        np.testing.assert_array_equal(y, _unfused(x, wt, None, {}, {"pool_kernel_size": 2}))
        gx, gw, gb = F.conv2d_relu_max_pool2d_backward(np.ones_like(y), x, wt, None,
                                                       pool_kernel_size=2)
        assert gx.shape == x.shape and gw.shape == wt.shape and gb.shape == (3,)
        e = F.conv2d_relu_max_pool2d(np.zeros((0, 2, 7, 7)), wt, None, pool_kernel_size=2)
        assert e.shape == (0, 3, 2, 2)
        gx, gw, gb = F.conv2d_relu_max_pool2d_backward(
            np.zeros((0, 3, 2, 2)), np.zeros((0, 2, 7, 7)), wt, None, pool_kernel_size=2)
        assert gx.shape == (0, 2, 7, 7) and not gw.any() and not gb.any()


def test_bad_arguments_name_them():
    x = np.zeros((1, 1, 6, 6), dtype=np.float32)
    wt = np.zeros((2, 1, 3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="pool_kernel_size"):
        F.conv2d_relu_max_pool2d(x, wt, pool_kernel_size=0)
    with pytest.raises(ValueError, match="pool_padding"):
        F.conv2d_relu_max_pool2d(x, wt, pool_kernel_size=2, pool_padding=2)
    with pytest.raises(ValueError, match="pool_kernel_size"):
        F.conv2d_relu_max_pool2d(x, wt, pool_kernel_size=5)
    with pytest.raises(TypeError, match="pool_ceil_mode"):
        F.conv2d_relu_max_pool2d(x, wt, pool_kernel_size=2, pool_ceil_mode=1)
    with pytest.raises(ValueError, match="bias"):
        F.conv2d_relu_max_pool2d(x, wt, np.zeros(3, np.float32), pool_kernel_size=2)
    with pytest.raises(ValueError, match="grad_out"):
        F.conv2d_relu_max_pool2d_backward(np.zeros((1, 2, 3, 3), np.float32), x, wt,
                                          pool_kernel_size=2)
    with pytest.raises(TypeError, match="grad_out"):
        F.conv2d_relu_max_pool2d_backward(np.zeros((1, 2, 2, 2)), x, wt, pool_kernel_size=2)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=[IDS[0], IDS[2], IDS[3]])
def test_gradcheck_float64(host_backend, case):
    rng = np.random.default_rng(7)
    n, c, h, w, o, ck, pk = case
    n = min(n, 2)
    x, wt, b = _data(rng, (n, c, h, w, o, ck, pk), np.float64)
    # Keep conv outputs away from 0 and from each other so finite differences do not
    # cross a relu kink or swap a window's argmax.
    inputs = [Tensor(x, requires_grad=True), Tensor(wt, requires_grad=True),
              Tensor(b, requires_grad=True)]
    with fastnn.backend(host_backend):
        gradcheck(lambda a, bw, bb: F.conv2d_relu_max_pool2d(a, bw, bb, **ck, **pk), inputs,
                  eps=1e-7, atol=1e-6, rtol=1e-4)


def _seed_like(rng, fuse):
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, rng=rng, dtype=np.float64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 5 * 5, 7, rng=rng, dtype=np.float64), nn.ReLU(),
        nn.Linear(7, 3, rng=rng, dtype=np.float64),
    )
    model.fuse = fuse
    return model


def test_sequential_fuses_and_matches_unfused(host_backend):
    x = np.random.default_rng(3).standard_normal((6, 1, 12, 12))
    labels = np.array([0, 1, 2, 0, 1, 2])
    outs, grads = [], []
    for fuse in (True, False):
        model = _seed_like(np.random.default_rng(0), fuse)
        with fastnn.backend(host_backend):
            out = model(Tensor(x))
            node_names = set()
            stack = [out.grad_fn]
            while stack:
                node = stack.pop()
                node_names.add(node.fn.__name__)
                stack.extend(p for p in node.parents if p is not None and hasattr(p, "fn"))
            assert ("Conv2dReLUMaxPool2d" in node_names) == fuse
            assert ("MaxPool2d" in node_names) == (not fuse)
            F.cross_entropy(out, labels).backward()
        outs.append(out.data)
        grads.append([p.grad for p in model.parameters()])
    np.testing.assert_array_equal(outs[0], outs[1])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_sequential_does_not_fuse_subclasses(host_backend):
    calls = []

    class LoudReLU(nn.ReLU):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, rng=rng), LoudReLU(), nn.MaxPool2d(2))
    with fastnn.backend(host_backend):
        out = model(Tensor(np.ones((1, 1, 6, 6), np.float32)))
    assert calls == [1] and out.grad_fn.fn.__name__ == "MaxPool2d"
