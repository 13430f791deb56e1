"""BatchNorm fused with the ReLU after it (``batch_norm2d_relu``): the native kernels
against numpy_ref and against the unfused pair (bit for bit) on every ISA this CPU
runs, random shapes (odd sizes, batch 1, float32/float64); the same bits for any
thread count; float64 gradcheck through the autograd Function; argument checks
shared with batch_norm2d; and nn.Sequential fusing BatchNorm2d -> ReLU runs into
one node with the same values as running them apart."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import NATIVE
from hypothesis import given, settings
from hypothesis import strategies as st
from test_batchnorm import _tol, isa  # noqa: F401 - the plain kernels' ISA fixture

import fastnn
import fastnn.functional as F
from fastnn import nn
from fastnn.autograd import BatchNorm2dReLU, Tensor
from fastnn.backends import numpy_ref as ref
from fastnn.gradcheck import gradcheck

native = pytest.mark.skipif(not NATIVE, reason="fastnn._C is not built")

if NATIVE:
    from fastnn import _C

EPS = 1e-3
MASKS = [(True, True, True), (True, False, False), (False, True, True)]


def _args(rng, shape, dtype, affine, training):
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    w = rng.standard_normal(c).astype(dtype) if affine else None
    b = rng.standard_normal(c).astype(dtype) if affine else None
    stats = (None, None) if training else (rng.standard_normal(c).astype(dtype),
                                           rng.uniform(0.2, 3, c).astype(dtype))
    return x, g, w, b, stats


def _unfused(mod, x, g, w, b, stats, training, mask):
    """relu(batch_norm2d) and its backward from ``mod``'s separate ops."""
    y, mean, var = mod.batch_norm2d(x, w, b, *stats, EPS, training)
    r = mod.relu(y)
    grads = mod.batch_norm2d_backward(mod.relu_backward(g, r), x, w, mean, var, EPS, training,
                                      *mask)
    return (r, mean, var), grads


shapes = st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 19),
                   st.integers(1, 23)).filter(lambda s: s[0] * s[2] * s[3] >= 2)


@native
@settings(max_examples=25, deadline=None)
@given(shape=shapes, dtype=st.sampled_from([np.float32, np.float64]), training=st.booleans(),
       affine=st.booleans(), mask=st.sampled_from(MASKS), seed=st.integers(0, 2**16))
def test_cpu_matches_reference_and_the_unfused_ops(shape, dtype, training, affine, mask, seed):
    rng = np.random.default_rng(seed)
    x, g, w, b, stats = _args(rng, shape, dtype, affine, training)
    got = _C.batch_norm2d_relu(x, w, b, *stats, EPS, training)
    want, want_g = _unfused(ref, x, g, w, b, stats, training, mask)
    for a, e in zip(got, want):
        assert a.dtype == dtype and a.flags.c_contiguous and a.shape == e.shape
        np.testing.assert_allclose(a, e, **_tol(dtype))
    mean, var = got[1], got[2]
    got_g = _C.batch_norm2d_relu_backward(g, x, w, b, mean, var, EPS, training, *mask)
    # Against the reference given the same statistics, so a ReLU mask bit cannot
    # flip on a last-place difference between the two forwards.
    ref_g = ref.batch_norm2d_backward(
        ref.relu_backward(g, _C.batch_norm2d_relu(x, w, b, mean, var, EPS, False)[0]),
        x, w, mean, var, EPS, training, *mask)
    for a, e, need in zip(got_g, ref_g, mask):
        assert (a is None) == (not need)
        if need:
            np.testing.assert_allclose(a, e, **_tol(dtype))
    # The cpu backend's own separate kernels: the same bits.
    cpu, cpu_g = _unfused(_C, x, g, w, b, stats, training, mask)
    for a, e in zip((*got, *got_g), (*cpu, *cpu_g)):
        if e is not None:
            np.testing.assert_array_equal(a, e)


@native
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 4, 3, 3), (2, 3, 5, 7), (3, 5, 1, 17), (4, 3, 33, 31)])
def test_same_bits_as_the_unfused_kernels_on_every_isa(isa, rng, shape, dtype):  # noqa: F811
    x, g, w, b, stats = _args(rng, shape, dtype, True, True)
    y, mean, var = _C.batch_norm2d_relu(x, w, b, *stats, EPS, True)
    (r, mean_u, var_u), grads = _unfused(_C, x, g, w, b, stats, True, (True, True, True))
    for a, e in zip((y, mean, var), (r, mean_u, var_u)):
        np.testing.assert_array_equal(a, e)
    for a, e in zip(_C.batch_norm2d_relu_backward(g, x, w, b, mean, var, EPS, True, 1, 1, 1),
                    grads):
        np.testing.assert_array_equal(a, e)


def test_reference_composes_batch_norm_and_relu(rng):
    x, g, w, b, stats = _args(rng, (2, 3, 5, 4), np.float64, True, True)
    y, mean, var = ref.batch_norm2d_relu(x, w, b, *stats, EPS, True)
    (r, _, _), grads = _unfused(ref, x, g, w, b, stats, True, (True, True, True))
    np.testing.assert_array_equal(y, r)
    assert (y >= 0).all() and (y == 0).any() and (y > 0).any()
    for a, e in zip(ref.batch_norm2d_relu_backward(g, x, w, b, mean, var, EPS, True, 1, 1, 1),
                    grads):
        np.testing.assert_array_equal(a, e)


@native
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_bits_for_any_thread_count(rng, dtype):
    x, g, w, b, _ = _args(rng, (16, 8, 13, 11), dtype, True, True)
    before = fastnn.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3, 4):
            fastnn.set_num_threads(n)
            y, mean, var = _C.batch_norm2d_relu(x, w, b, None, None, EPS, True)
            runs.append((y, mean, var, *_C.batch_norm2d_relu_backward(g, x, w, b, mean, var,
                                                                      EPS, True, 1, 1, 1)))
    finally:
        fastnn.set_num_threads(before)
    for other in runs[1:]:
        for a, e in zip(other, runs[0]):
            np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("cpu", marks=native)])
def test_gradcheck_float64(backend, rng):
    x = Tensor(rng.standard_normal((3, 2, 4, 3)), requires_grad=True)
    w = Tensor(rng.standard_normal(2), requires_grad=True)
    b = Tensor(rng.standard_normal(2), requires_grad=True)
    rm, rv = rng.standard_normal(2), rng.uniform(0.5, 2, 2)
    with fastnn.backend(backend):
        assert gradcheck(lambda x, w, b: F.batch_norm2d_relu(x, None, None, w, b, True),
                         [x, w, b])
        assert gradcheck(lambda x, w, b: F.batch_norm2d_relu(x, rm, rv, w, b, False),
                         [x, w, b])
        one = Tensor(rng.standard_normal((1, 2, 3, 1)), requires_grad=True)  # N = 1
        assert gradcheck(lambda x: F.batch_norm2d_relu(x, None, None, training=True), [one])


def test_running_stats_update_like_batch_norm2d(rng):
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    stats = [(np.zeros(3, np.float32), np.ones(3, np.float32), np.zeros((), np.int64))
             for _ in range(2)]
    F.batch_norm2d(x, *stats[0][:2], training=True, momentum=None,
                   num_batches_tracked=stats[0][2])
    F.batch_norm2d_relu(x, *stats[1][:2], training=True, momentum=None,
                        num_batches_tracked=stats[1][2])
    for a, e in zip(stats[1], stats[0]):
        np.testing.assert_array_equal(a, e)


def test_checks_name_the_fused_op(rng):
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    c = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"batch_norm2d_relu: x must be 4-D"):
        F.batch_norm2d_relu(x[0], None, None, training=True)
    with pytest.raises(TypeError, match=r"batch_norm2d_relu: weight has dtype float64"):
        F.batch_norm2d_relu(x, None, None, np.ones(3), training=True)
    with pytest.raises(ValueError, match=r"batch_norm2d_relu: running_mean and running_var "
                                         r"must be given"):
        F.batch_norm2d_relu(x, None, None, training=False)
    with pytest.raises(ValueError, match=r"batch_norm2d_relu: expected more than 1 value"):
        F.batch_norm2d_relu(x[:1, :, :1, :1], None, None, training=True)
    with pytest.raises(TypeError, match=r"batch_norm2d_relu: eps must be a real number"):
        F.batch_norm2d_relu(x, None, None, training=True, eps="small")
    with pytest.raises(ValueError, match=r"batch_norm2d_relu_backward: grad_out"):
        F.batch_norm2d_relu_backward(x[:1], x, None, None, c, c)
    with pytest.raises(ValueError, match=r"batch_norm2d_relu_backward: bias"):
        F.batch_norm2d_relu_backward(x, x, None, np.ones(4, np.float32), c, c)
    with pytest.raises(TypeError, match=r"batch_norm2d_relu_backward: mean and var must be"):
        F.batch_norm2d_relu_backward(x, x, None, None, None, c)
    assert F.batch_norm2d_relu_backward(x, x, None, None, c, c,
                                        output_mask=(False, False, False)) == (None, None, None)


@native
def test_binding_checks():
    x = np.zeros((2, 3, 2, 2), np.float32)
    c32 = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="batch_norm2d_relu: mean and var must be None"):
        _C.batch_norm2d_relu(x, None, None, c32, c32, 1e-5, True)
    with pytest.raises(TypeError, match="batch_norm2d_relu_backward: bias has dtype float64"):
        _C.batch_norm2d_relu_backward(x, x, None, np.ones(3), c32, c32, 1e-5, True, 1, 1, 1)
    with pytest.raises(ValueError, match=r"batch_norm2d_relu_backward: bias must have shape"):
        _C.batch_norm2d_relu_backward(x, x, None, c32[:2], c32, c32, 1e-5, True, 1, 1, 1)


def _conv_bn_relu_net(dtype) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=False, dtype=dtype, rng=0), nn.BatchNorm2d(4, dtype=dtype),
        nn.ReLU(), nn.Conv2d(4, 3, 3, dtype=dtype, rng=1), nn.BatchNorm2d(3, dtype=dtype),
        nn.ReLU(), nn.Flatten(),
    )


def check_fused_as_apart(make_net, x, backend, training=True, node=None, buffers=True):
    """``make_net()`` run with ``fuse`` on and off on ``backend``: the same output,
    parameter gradients (and buffers) bit for bit; with ``node``, the output's
    producer is that fused autograd node exactly when fusing."""
    results = []
    for fuse in (True, False):
        net = make_net()
        net.train(training)
        net.fuse = fuse
        with fastnn.backend(backend):
            out = net(Tensor(x))
            if node is not None:
                assert (out._ctx.parents[0].fn is node) is fuse
            (out * out).sum().backward()
        results.append([out.data] + [p.grad for p in net.parameters()]
                       + ([buf for _, buf in net.named_buffers()] if buffers else []))
    for a, e in zip(*results):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("cpu", marks=native)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_sequential_fuses_batchnorm_relu_with_the_same_values(backend, rng, dtype, training):
    x = rng.standard_normal((3, 2, 9, 8)).astype(dtype)
    check_fused_as_apart(lambda: _conv_bn_relu_net(dtype), x, backend, training, BatchNorm2dReLU)


def test_sequential_leaves_subclasses_and_other_orders_alone(rng):
    class MyReLU(nn.ReLU):
        pass

    x = Tensor(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    for net in (nn.Sequential(nn.BatchNorm2d(3), MyReLU()), nn.Sequential(nn.BatchNorm2d(3)),
                nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3))):
        out = net(x)
        assert out._ctx.fn is not BatchNorm2dReLU
        assert all(p is None or p.fn is not BatchNorm2dReLU for p in out._ctx.parents
                   if not isinstance(p, Tensor))


@native
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_mask_is_the_forwards_at_the_kink(isa, rng, dtype):  # noqa: F811
    """x straddling the point where (x - mean) * scale + shift crosses 0, where a
    differently rounded (e.g. fused vs separate multiply-add) recomputation of the
    mask would disagree with the forward's ReLU: in eval mode with grad_out = 1,
    grad_x is nonzero exactly where the forward's output is > 0."""
    c = 3
    w = rng.uniform(0.5, 2, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    mean = rng.standard_normal(c).astype(dtype)
    var = rng.uniform(0.2, 3, c).astype(dtype)
    scale = (w / np.sqrt(var.astype(np.float64) + EPS)).astype(dtype)
    root = mean - b / scale  # where the BatchNorm output is ~0
    step = np.spacing(np.abs(root)).astype(dtype)  # one ulp of x near the root
    x = (root[:, None] + np.arange(-2048, 2048) * step[:, None]).astype(dtype)
    x = np.ascontiguousarray(x.reshape(1, c, 64, 64))
    y, m, v = _C.batch_norm2d_relu(x, w, b, mean, var, EPS, False)
    assert (y > 0).any() and (y == 0).any()
    gx, _, _ = _C.batch_norm2d_relu_backward(np.ones_like(x), x, w, b, m, v, EPS, False,
                                             True, False, False)
    np.testing.assert_array_equal(gx != 0, y > 0)
