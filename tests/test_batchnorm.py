"""The native BatchNorm kernels (fastnn._C.batch_norm2d and its backward) against
numpy_ref, on every ISA this CPU runs: forward and backward, float32 and float64,
training and eval, odd shapes; float32 statistics accurate despite a large mean;
bit-identical results for any thread count; the bindings' argument checks."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import NATIVE

import fastnn
import fastnn.functional as F
from fastnn.autograd import Tensor
from fastnn.backends import numpy_ref as ref
from fastnn.gradcheck import gradcheck

pytestmark = pytest.mark.skipif(not NATIVE, reason="fastnn._C is not built")

if NATIVE:
    from fastnn import _C

    SUPPORTED = _C.supported_isas()
else:
    SUPPORTED = []

# N=1 with H*W > 1, C=1, H*W below and above the 16 accumulator lanes, odd sizes.
SHAPES = [(2, 3, 5, 7), (1, 4, 3, 3), (6, 1, 4, 5), (3, 5, 1, 17), (2, 2, 33, 31), (4, 3, 2, 1)]


@pytest.fixture(params=SUPPORTED)
def isa(request):
    before = _C.active_isa()
    assert _C.select_isa(request.param)
    yield request.param
    assert _C.select_isa(before)


def _tol(dtype) -> dict:
    return {"rtol": 2e-5, "atol": 2e-5} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}


def _args(rng, shape, dtype, affine):
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    w = rng.standard_normal(c).astype(dtype) if affine else None
    b = rng.standard_normal(c).astype(dtype) if affine else None
    return x, g, w, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_reference(isa, rng, shape, dtype, training, affine):
    x, g, w, b = _args(rng, shape, dtype, affine)
    c = shape[1]
    stats = (None, None) if training else (rng.standard_normal(c).astype(dtype),
                                           rng.uniform(0.2, 3, c).astype(dtype))
    got = _C.batch_norm2d(x, w, b, *stats, 1e-3, training)
    want = ref.batch_norm2d(x, w, b, *stats, 1e-3, training)
    for a, e in zip(got, want):
        assert a.dtype == dtype and a.flags.c_contiguous and a.shape == e.shape
        np.testing.assert_allclose(a, e, **_tol(dtype))
    if not training:
        assert got[1] is not stats[0]  # fresh arrays, never the inputs
    mean, var = want[1], want[2]
    for mask in [(True, True, True), (True, False, False), (False, True, True)]:
        got_g = _C.batch_norm2d_backward(g, x, w, mean, var, 1e-3, training, *mask)
        want_g = ref.batch_norm2d_backward(g, x, w, mean, var, 1e-3, training, *mask)
        for a, e, need in zip(got_g, want_g, mask):
            assert (a is None) == (not need)
            if need:
                np.testing.assert_allclose(a, e, **_tol(dtype))


def test_float32_statistics_are_accurate_with_a_large_mean(rng):
    x64 = rng.standard_normal((8, 3, 20, 20)) * 0.01 + 1000.0
    x = x64.astype(np.float32)
    _, mean, var = _C.batch_norm2d(x, None, None, None, None, 1e-5, True)
    xd = x.astype(np.float64)
    np.testing.assert_allclose(mean, xd.mean(axis=(0, 2, 3)), rtol=1e-7)
    np.testing.assert_allclose(var, xd.var(axis=(0, 2, 3)), rtol=1e-5)


def test_same_bits_for_any_thread_count(rng):
    x, g, w, b = _args(rng, (16, 8, 13, 11), np.float32, True)
    before = fastnn.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            fastnn.set_num_threads(n)
            y, mean, var = _C.batch_norm2d(x, w, b, None, None, 1e-5, True)
            runs.append((y, mean, var,
                         *_C.batch_norm2d_backward(g, x, w, mean, var, 1e-5, True, 1, 1, 1)))
    finally:
        fastnn.set_num_threads(before)
    for other in runs[1:]:
        for a, e in zip(other, runs[0]):
            np.testing.assert_array_equal(a, e)


def test_gradcheck_float64_on_the_cpu_backend(rng):
    x = Tensor(rng.standard_normal((3, 2, 4, 3)), requires_grad=True)
    w = Tensor(rng.standard_normal(2), requires_grad=True)
    b = Tensor(rng.standard_normal(2), requires_grad=True)
    rm, rv = rng.standard_normal(2), rng.uniform(0.5, 2, 2)
    with fastnn.backend("cpu"):
        assert gradcheck(lambda x, w, b: F.batch_norm2d(x, None, None, w, b, True), [x, w, b])
        assert gradcheck(lambda x, w, b: F.batch_norm2d(x, rm, rv, w, b, False), [x, w, b])
        one = Tensor(rng.standard_normal((1, 2, 3, 1)), requires_grad=True)  # N = 1
        assert gradcheck(lambda x: F.batch_norm2d(x, None, None, training=True), [one])


def test_binding_checks():
    x = np.zeros((2, 3, 2, 2), np.float32)
    c32 = np.ones(3, np.float32)
    bad = [
        (lambda: _C.batch_norm2d(x[0], None, None, None, None, 1e-5, True),
         ValueError, r"x must be 4-D \(N, C, H, W\)"),
        (lambda: _C.batch_norm2d(x, np.ones(3), None, None, None, 1e-5, True),
         TypeError, "weight has dtype float64 but x has dtype float32"),
        (lambda: _C.batch_norm2d(x, None, np.ones(4, np.float32), None, None, 1e-5, True),
         ValueError, r"bias must have shape \(3,\)"),
        (lambda: _C.batch_norm2d(x, None, None, c32, c32, 1e-5, True),
         ValueError, "mean and var must be None when training"),
        (lambda: _C.batch_norm2d(x, None, None, None, None, 1e-5, False),
         ValueError, "mean and var must be arrays when not training"),
        (lambda: _C.batch_norm2d(x[:1, :, :1, :1].copy(), None, None, None, None, 1e-5, True),
         ValueError, "more than 1 value per channel"),
        (lambda: _C.batch_norm2d(x, None, None, None, None, -1.0, True),
         ValueError, "eps must be a finite number >= 0"),
        (lambda: _C.batch_norm2d(x[:, :, :, ::2], None, None, None, None, 1e-5, True),
         ValueError, "x must be C-contiguous"),
        (lambda: _C.batch_norm2d_backward(x[:1], x, None, c32, c32, 1e-5, True, 1, 1, 1),
         ValueError, "grad_out must have the shape of x"),
        (lambda: _C.batch_norm2d_backward(x, x, None, None, c32, 1e-5, True, 1, 1, 1),
         TypeError, "mean must be a numpy.ndarray"),
        (lambda: _C.batch_norm2d_backward(x, x, None, c32, c32[:2], 1e-5, True, 1, 1, 1),
         ValueError, r"var must have shape \(3,\)"),
    ]
    for call, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            call()
    # empty batch in eval, and no channels: nothing to compute, shapes still right
    y, _, _ = _C.batch_norm2d(np.zeros((0, 3, 2, 2), np.float32), None, None, c32, c32, 1e-5,
                              False)
    assert y.shape == (0, 3, 2, 2)
    y, mean, _ = _C.batch_norm2d(np.zeros((2, 0, 2, 2)), None, None, None, None, 1e-5, True)
    assert y.shape == (2, 0, 2, 2) and mean.shape == (0,)
