"""BatchNorm fused with the ReLU and the max pool after it
(``batch_norm2d_relu_max_pool2d``): bit for bit the separate ops (forward,
statistics, running stats, window codes and gradients) on every ISA this CPU
runs and on numpy_ref, over random shapes and pool geometries (odd sizes,
overlapping and padded windows, dilation, ceil mode, batch 1, float32/float64,
NaN); the same bits for any thread count; float64 gradcheck through the autograd
Function; argument checks that name the op; and nn.Sequential fusing
BatchNorm2d -> ReLU -> MaxPool2d into one node with the same values as running
them apart."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import NATIVE
from hypothesis import given, settings
from hypothesis import strategies as st
from test_batchnorm import _tol, isa  # noqa: F401 - the plain kernels' ISA fixture
from test_batchnorm_relu import EPS, MASKS, check_fused_as_apart, native
from test_batchnorm_relu import _args as _args_with_grad

import fastnn
import fastnn.functional as F
from fastnn import nn
from fastnn.autograd import BatchNorm2dReLU, BatchNorm2dReLUMaxPool2d, Tensor
from fastnn.backends import numpy_ref as ref
from fastnn.backends._composed import window_codes
from fastnn.gradcheck import gradcheck

if NATIVE:
    from fastnn import _C


def _args(rng, shape, dtype, affine, training):
    """test_batchnorm_relu's inputs without its full-size gradient."""
    x, _, w, b, stats = _args_with_grad(rng, shape, dtype, affine, training)
    return x, w, b, stats


def _out(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _pool(shape, k, s, p, d):
    """The backend's pool arguments and output size (floor mode)."""
    ohw = (_out(shape[2], k, s, p, d), _out(shape[3], k, s, p, d))
    return ((k, k), (s, s), (p, p), (d, d)), ohw


def _unfused(mod, x, w, b, stats, training, pool, ohw, g, mask):
    """max_pool2d(batch_norm2d_relu) and its backward from ``mod``'s separate ops."""
    r, mean, var = mod.batch_norm2d_relu(x, w, b, *stats, EPS, training)
    y = mod.max_pool2d(r, *pool, ohw)
    gr = mod.max_pool2d_backward(g, r, *pool)
    grads = mod.batch_norm2d_relu_backward(gr, x, w, b, mean, var, EPS, training, *mask)
    return (y, mean, var), grads


def _equal(got, want):
    for a, e in zip(got, want):
        assert (a is None) == (e is None)
        if e is not None:
            assert a.dtype == e.dtype and a.flags.c_contiguous
            np.testing.assert_array_equal(a, e)


# (kernel, stride, padding, dilation): the exact 2x2 the models use, overlapping
# windows, padding and dilation.
GEOMS = [(2, 2, 0, 1), (3, 2, 1, 1), (2, 1, 0, 1), (3, 3, 1, 2), (3, 1, 1, 1)]
shapes = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(5, 19),
                   st.integers(5, 23))


@pytest.mark.parametrize("backend", ["numpy", pytest.param("cpu", marks=native)])
@settings(max_examples=20, deadline=None)
@given(shape=shapes, geom=st.sampled_from(GEOMS), dtype=st.sampled_from([np.float32, np.float64]),
       training=st.booleans(), affine=st.booleans(), mask=st.sampled_from(MASKS),
       seed=st.integers(0, 2**16))
def test_same_bits_as_the_separate_ops(backend, shape, geom, dtype, training, affine, mask,
                                       seed):
    mod = _C if backend == "cpu" else ref
    rng = np.random.default_rng(seed)
    x, w, b, stats = _args(rng, shape, dtype, affine, training)
    pool, ohw = _pool(shape, *geom)
    g = rng.standard_normal((*shape[:2], *ohw)).astype(dtype)
    y, mean, var, codes = mod.batch_norm2d_relu_max_pool2d(x, w, b, *stats, EPS, training, *pool,
                                                           ohw, True)
    want, want_g = _unfused(mod, x, w, b, stats, training, pool, ohw, g, mask)
    _equal((y, mean, var), want)
    assert codes.dtype == np.uint8 and codes.shape == y.shape
    # The codes are the conv fusion's: the same rule applied to the relu'd input.
    r = mod.batch_norm2d_relu(x, w, b, *stats, EPS, training)[0]
    _, ind = mod.max_pool2d_with_indices(r, *pool, ohw)
    np.testing.assert_array_equal(codes, window_codes(y, ind, shape[3], pool[1], pool[2],
                                                      pool[3], pool[0][1]))
    for argmax in (codes, None):
        got_g = mod.batch_norm2d_relu_max_pool2d_backward(g, x, w, b, mean, var, EPS, training,
                                                          *pool, *mask, argmax)
        _equal(got_g, want_g)
    if backend == "cpu":  # and the reference, within rounding
        (ry, rmean, rvar), _ = _unfused(ref, x, w, b, stats, training, pool, ohw, g, mask)
        for a, e in zip((y, mean, var), (ry, rmean, rvar)):
            np.testing.assert_allclose(a, e, **_tol(dtype))


@native
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 3, 6, 6), (2, 3, 24, 24), (3, 2, 8, 8), (2, 2, 9, 7),
                                   (4, 3, 32, 34)])
def test_same_bits_on_every_isa(isa, rng, shape, dtype):  # noqa: F811
    """The 2x2 planes take the AVX-512 pool kernels where they apply (rows up to 16
    pooled columns), the generic ones elsewhere and on the other ISAs."""
    x, w, b, stats = _args(rng, shape, dtype, True, True)
    pool, ohw = _pool(shape, 2, 2, 0, 1)
    g = rng.standard_normal((*shape[:2], *ohw)).astype(dtype)
    y, mean, var, codes = _C.batch_norm2d_relu_max_pool2d(x, w, b, *stats, EPS, True, *pool, ohw,
                                                          True)
    want, want_g = _unfused(_C, x, w, b, stats, True, pool, ohw, g, (True, True, True))
    _equal((y, mean, var), want)
    for argmax in (codes, None):
        _equal(_C.batch_norm2d_relu_max_pool2d_backward(g, x, w, b, mean, var, EPS, True, *pool,
                                                        True, True, True, argmax), want_g)


@native
def test_nan_windows_pass_no_gradient(rng):
    x, w, b, _ = _args(rng, (2, 3, 8, 8), np.float32, True, True)
    x[0, 1, 2, 3] = np.nan
    pool, ohw = _pool(x.shape, 2, 2, 0, 1)
    stats = (np.zeros(3, np.float32), np.ones(3, np.float32))
    y, mean, var, codes = _C.batch_norm2d_relu_max_pool2d(x, w, b, *stats, EPS, False, *pool,
                                                          ohw, True)
    assert np.isnan(y[0, 1, 1, 1]) and codes[0, 1, 1, 1] == 255
    assert np.isfinite(np.delete(y.ravel(), np.ravel_multi_index((0, 1, 1, 1), y.shape))).all()
    g = np.ones_like(y)
    want = _unfused(_C, x, w, b, stats, False, pool, ohw, g, (True, True, True))[1]
    got = _C.batch_norm2d_relu_max_pool2d_backward(g, x, w, b, mean, var, EPS, False, *pool,
                                                   True, True, True, codes)
    _equal(got, want)


@native
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_bits_for_any_thread_count(rng, dtype):
    x, w, b, _ = _args(rng, (16, 8, 12, 10), dtype, True, True)
    pool, ohw = _pool(x.shape, 2, 2, 0, 1)
    g = rng.standard_normal((16, 8, *ohw)).astype(dtype)
    before = fastnn.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3, 4):
            fastnn.set_num_threads(n)
            y, mean, var, c = _C.batch_norm2d_relu_max_pool2d(x, w, b, None, None, EPS, True,
                                                              *pool, ohw, True)
            runs.append((y, mean, var, c, *_C.batch_norm2d_relu_max_pool2d_backward(
                g, x, w, b, mean, var, EPS, True, *pool, True, True, True, c)))
    finally:
        fastnn.set_num_threads(before)
    for other in runs[1:]:
        _equal(other, runs[0])


@pytest.mark.parametrize("backend", ["numpy", pytest.param("cpu", marks=native)])
def test_gradcheck_float64(backend, rng):
    x = Tensor(rng.standard_normal((3, 2, 5, 4)), requires_grad=True)
    w = Tensor(rng.standard_normal(2), requires_grad=True)
    b = Tensor(rng.standard_normal(2), requires_grad=True)
    rm, rv = rng.standard_normal(2), rng.uniform(0.5, 2, 2)
    with fastnn.backend(backend):
        assert gradcheck(lambda x, w, b: F.batch_norm2d_relu_max_pool2d(x, None, None, w, b,
                                                                        True), [x, w, b])
        assert gradcheck(lambda x, w, b: F.batch_norm2d_relu_max_pool2d(
            x, rm, rv, w, b, False, pool_kernel_size=3, pool_stride=2, pool_padding=1,
            pool_ceil_mode=True), [x, w, b])
        one = Tensor(rng.standard_normal((1, 2, 3, 2)), requires_grad=True)  # N = 1
        assert gradcheck(lambda x: F.batch_norm2d_relu_max_pool2d(x, None, None, training=True),
                         [one])


def test_functional_matches_the_separate_ops_and_updates_running_stats(rng):
    x = rng.standard_normal((4, 3, 7, 9)).astype(np.float32)
    stats = [(np.zeros(3, np.float32), np.ones(3, np.float32), np.zeros((), np.int64))
             for _ in range(2)]
    r = F.batch_norm2d_relu(x, *stats[0][:2], training=True, momentum=None,
                            num_batches_tracked=stats[0][2])
    want = F.max_pool2d(r, 3, 2, 1, ceil_mode=True)
    got = F.batch_norm2d_relu_max_pool2d(x, *stats[1][:2], training=True, momentum=None,
                                         num_batches_tracked=stats[1][2], pool_kernel_size=3,
                                         pool_stride=2, pool_padding=1, pool_ceil_mode=True)
    np.testing.assert_array_equal(got, want)
    for a, e in zip(stats[1], stats[0]):
        np.testing.assert_array_equal(a, e)
    # An empty batch (eval): an empty output and the running statistics.
    y, mean, var = F.batch_norm2d_relu_max_pool2d_forward(x[:0], *stats[1][:2], training=False,
                                                          pool_kernel_size=2)
    assert y.shape == (0, 3, 3, 4) and y.dtype == np.float32
    np.testing.assert_array_equal(mean, stats[1][0])


def test_checks_name_the_fused_op(rng):
    op = "batch_norm2d_relu_max_pool2d"
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    c = np.ones(3, np.float32)
    g = np.ones((2, 3, 2, 2), np.float32)
    with pytest.raises(ValueError, match=rf"{op}: x must be 4-D"):
        F.batch_norm2d_relu_max_pool2d(x[0], None, None, training=True)
    with pytest.raises(ValueError, match=rf"{op}: expected more than 1 value"):
        F.batch_norm2d_relu_max_pool2d(x[:1, :, :1, :1], None, None, training=True,
                                       pool_kernel_size=1)
    with pytest.raises(ValueError, match=rf"{op}: pool_kernel_size"):
        F.batch_norm2d_relu_max_pool2d(x, None, None, training=True, pool_kernel_size=0)
    with pytest.raises(ValueError, match=rf"{op}: pool_padding"):
        F.batch_norm2d_relu_max_pool2d(x, None, None, training=True, pool_kernel_size=2,
                                       pool_padding=2)
    with pytest.raises(ValueError, match=rf"{op}: return_argmax needs a pool window"):
        F.batch_norm2d_relu_max_pool2d_forward(np.ones((1, 1, 20, 20), np.float32), None, None,
                                               training=True, pool_kernel_size=16,
                                               return_argmax=True)
    with pytest.raises(ValueError, match=rf"{op}_backward: grad_out"):
        F.batch_norm2d_relu_max_pool2d_backward(x, x, None, None, c, c)
    with pytest.raises(TypeError, match=rf"{op}_backward: argmax must be uint8"):
        F.batch_norm2d_relu_max_pool2d_backward(g, x, None, None, c, c,
                                                argmax=np.zeros(g.shape, np.int64))
    with pytest.raises(ValueError, match=rf"{op}_backward: argmax must have the output's shape"):
        F.batch_norm2d_relu_max_pool2d_backward(g, x, None, None, c, c,
                                                argmax=np.zeros((2, 3, 2, 1), np.uint8))
    with pytest.raises(TypeError, match=rf"{op}_backward: mean and var must be"):
        F.batch_norm2d_relu_max_pool2d_backward(g, x, None, None, None, c)
    assert F.batch_norm2d_relu_max_pool2d_backward(
        g, x, None, None, c, c, output_mask=(False, False, False)) == (None, None, None)


@native
def test_binding_checks():
    op = "batch_norm2d_relu_max_pool2d"
    x = np.zeros((2, 3, 4, 4), np.float32)
    c32 = np.ones(3, np.float32)
    pool = ((2, 2), (2, 2), (0, 0), (1, 1))
    g = np.zeros((2, 3, 2, 2), np.float32)
    with pytest.raises(ValueError, match=f"{op}: mean and var must be None"):
        _C.batch_norm2d_relu_max_pool2d(x, None, None, c32, c32, 1e-5, True, *pool, (2, 2))
    with pytest.raises(ValueError, match=f"{op}: out_hw"):
        _C.batch_norm2d_relu_max_pool2d(x, None, None, None, None, 1e-5, True, *pool, (9, 2))
    with pytest.raises(ValueError, match=f"{op}_backward: grad_out must have batch"):
        _C.batch_norm2d_relu_max_pool2d_backward(g[:1], x, None, None, c32, c32, 1e-5, True,
                                                 *pool, True, True, True)
    with pytest.raises(ValueError, match=f"{op}_backward: argmax holds codes other than"):
        _C.batch_norm2d_relu_max_pool2d_backward(g, x, None, None, c32, c32, 1e-5, True, *pool,
                                                 True, True, True, np.full(g.shape, 4, np.uint8))
    with pytest.raises(TypeError, match=f"{op}_backward: bias has dtype float64"):
        _C.batch_norm2d_relu_max_pool2d_backward(g, x, None, np.ones(3), c32, c32, 1e-5, True,
                                                 *pool, True, True, True)


def _strong_like_net(dtype) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=False, dtype=dtype, rng=0), nn.BatchNorm2d(4, dtype=dtype),
        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3, dtype=dtype, rng=1),
        nn.BatchNorm2d(3, dtype=dtype), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Flatten(),
    )


@pytest.mark.parametrize("backend", ["numpy", pytest.param("cpu", marks=native)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_sequential_fuses_batchnorm_relu_maxpool_with_the_same_values(backend, rng, dtype,
                                                                      training):
    x = rng.standard_normal((3, 2, 15, 14)).astype(dtype)
    check_fused_as_apart(lambda: _strong_like_net(dtype), x, backend, training,
                         BatchNorm2dReLUMaxPool2d)


def test_sequential_does_not_fuse_a_pool_that_returns_indices(rng):
    x = Tensor(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    net = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2, return_indices=True))
    out, idx = net(x)
    assert out._ctx.fn is nn.layers.ag.MaxPool2d
    assert out._ctx.parents[0].fn is BatchNorm2dReLU
    assert idx.dtype == np.int64


@pytest.mark.parametrize("backend", ["numpy", pytest.param("cpu", marks=native)])
@pytest.mark.parametrize("head", ["conv", "batchnorm"])
def test_sequential_trains_through_a_pool_of_more_than_255_taps(backend, rng, head):
    """A window of 16x16 has no one-byte argmax codes: the fused nodes then run
    without them (the backward recomputes the routing) instead of raising, with
    the same values as the layers run apart."""
    x = rng.standard_normal((2, 2, 19, 18)).astype(np.float32)

    def make_net():
        first = (nn.Conv2d(2, 3, 3, rng=0) if head == "conv" else nn.BatchNorm2d(2))
        return nn.Sequential(first, nn.ReLU(), nn.MaxPool2d(16, 1), nn.Flatten())

    check_fused_as_apart(make_net, x, backend, buffers=False)


@native
def test_backward_without_codes_takes_any_window(rng):
    x, w, b, stats = _args(rng, (2, 3, 17, 16), np.float32, True, True)
    pool, ohw = _pool(x.shape, 16, 1, 0, 1)
    g = rng.standard_normal((2, 3, *ohw)).astype(np.float32)
    y, mean, var = _C.batch_norm2d_relu_max_pool2d(x, w, b, *stats, EPS, True, *pool, ohw)
    want, want_g = _unfused(_C, x, w, b, stats, True, pool, ohw, g, (True, True, True))
    _equal((y, mean, var), want)
    _equal(_C.batch_norm2d_relu_max_pool2d_backward(g, x, w, b, mean, var, EPS, True, *pool,
                                                    True, True, True), want_g)
    with pytest.raises(ValueError, match="argmax needs a pool window of at most 255 taps"):
        _C.batch_norm2d_relu_max_pool2d(x, w, b, *stats, EPS, True, *pool, ohw, True)
