"""The forward/backward pairs of functional's activations, losses, dropout and
BatchNorm: each backward against torch's autograd (when torch is installed) and
against float64 finite differences, every backend against numpy_ref, and the
argument checks. The native BatchNorm kernels have their own file
(test_batchnorm.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HOST_BACKENDS

import fastnn
import fastnn.functional as F
from fastnn.autograd import Tensor
from fastnn.gradcheck import gradcheck


def _torch():
    """torch is optional: the tests against it skip without it."""
    return pytest.importorskip("torch")


def _tol(dtype) -> dict:
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-12}


@pytest.fixture(params=HOST_BACKENDS)
def backend(request):
    with fastnn.backend(request.param):
        yield request.param


DTYPES = [np.float32, np.float64]


# --------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_elementwise_pairs_match_torch(backend, rng, name, dtype):
    t = _torch()
    x = (rng.standard_normal((3, 5, 7)) * 4).astype(dtype)
    x[0, 0, :3] = [-200.0, 200.0, 0.0]  # sigmoid must not overflow
    g = rng.standard_normal(x.shape).astype(dtype)
    y = getattr(F, name)(x)
    gx = getattr(F, f"{name}_backward")(g, y)
    xt = t.tensor(x, requires_grad=True)
    yt = getattr(t, name)(xt)
    yt.backward(t.tensor(g))
    assert y.dtype == dtype and gx.dtype == dtype and y.flags.c_contiguous
    np.testing.assert_allclose(y, yt.detach().numpy(), **_tol(dtype))
    np.testing.assert_allclose(gx, xt.grad.numpy(), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_log_softmax_pair_matches_torch(backend, rng, dim, dtype):
    t = _torch()
    x = (rng.standard_normal((4, 6, 5)) * 30).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    y = F.log_softmax(x, dim)
    gx = F.log_softmax_backward(g, y, dim)
    xt = t.tensor(x, requires_grad=True)
    yt = t.log_softmax(xt, dim)
    yt.backward(t.tensor(g))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-4 if dtype == np.float32 else 1e-11)
    np.testing.assert_allclose(gx, xt.grad.numpy(), **_tol(dtype))


def test_activation_backward_checks(rng):
    y = rng.random((2, 3))
    with pytest.raises(ValueError, match=r"grad_out must have the forward output's shape"):
        F.sigmoid_backward(np.ones((3, 2)), y)
    with pytest.raises(TypeError, match="grad_out has dtype float32"):
        F.tanh_backward(np.ones((2, 3), np.float32), y)
    with pytest.raises(ValueError, match="dim 2 out of range"):
        F.log_softmax_backward(np.ones((2, 3)), y, 2)
    with pytest.raises(TypeError, match="y must be float32 or float64"):
        F.sigmoid_backward(np.ones((2, 3)), np.ones((2, 3), np.int32).astype(object))
    assert F.sigmoid_backward(np.ones((0, 3)), np.ones((0, 3))).shape == (0, 3)
    np.testing.assert_array_equal(F.log_softmax(np.array(3.0)), 0.0)


# --------------------------------------------------------------------------
# MSE
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_mse_pair_matches_torch(backend, rng, dtype):
    t = _torch()
    a, b = (rng.standard_normal((5, 7)).astype(dtype) for _ in range(2))
    loss = F.mse_loss(a, b)
    g = np.asarray(1.7, dtype=dtype)
    ga, gb = F.mse_loss_backward(g, a, b)
    at, bt = t.tensor(a, requires_grad=True), t.tensor(b, requires_grad=True)
    lt = t.nn.functional.mse_loss(at, bt)
    lt.backward(t.tensor(1.7, dtype=lt.dtype))
    assert loss.shape == () and loss.dtype == dtype
    np.testing.assert_allclose(loss, lt.item(), **_tol(dtype))
    np.testing.assert_allclose(ga, at.grad.numpy(), **_tol(dtype))
    np.testing.assert_allclose(gb, bt.grad.numpy(), **_tol(dtype))
    assert F.mse_loss_backward(g, a, b, output_mask=(False, True))[0] is None


def test_mse_backward_checks(rng):
    a = rng.standard_normal((2, 3))
    with pytest.raises(ValueError, match="target shape"):
        F.mse_loss_backward(np.array(1.0), a, a[:1])
    with pytest.raises(ValueError, match=r"grad_out must have the forward output's shape \(\)"):
        F.mse_loss_backward(np.ones(1), a, a)


# --------------------------------------------------------------------------
# dropout
# --------------------------------------------------------------------------


def test_dropout_mask_is_drawn_once_for_plain_and_tensor_calls(backend, rng):
    x = rng.standard_normal((30, 20)).astype(np.float32)
    mask = F.dropout_mask(x.shape, 0.3, np.random.default_rng(5), np, np.float32)
    assert mask.dtype == np.float32
    assert set(np.unique(mask)) <= {np.float32(0), np.float32(1 / 0.7)}
    y_plain = F.dropout(x, 0.3, True, np.random.default_rng(5))
    y_fwd, m = F.dropout_forward(x, 0.3, True, np.random.default_rng(5))
    xt = Tensor(x, requires_grad=True)
    y_t = F.dropout(xt, 0.3, True, np.random.default_rng(5))
    np.testing.assert_array_equal(y_plain, x * mask)
    np.testing.assert_array_equal(y_fwd, y_plain)
    np.testing.assert_array_equal(m, mask)
    np.testing.assert_array_equal(y_t.data, y_plain)
    g = rng.standard_normal(x.shape).astype(np.float32)
    y_t.backward(g)
    np.testing.assert_array_equal(xt.grad, F.dropout_backward(g, mask))
    np.testing.assert_array_equal(xt.grad, g * mask)


def test_dropout_identity_and_extremes(rng):
    x = rng.standard_normal((4, 5))
    y, mask = F.dropout_forward(x, 0.5, False)
    assert mask is None and y is x  # eval: no copy, no mask
    assert F.dropout(x, 0.5, False) is not x
    np.testing.assert_array_equal(F.dropout_backward(x, None), x)
    np.testing.assert_array_equal(F.dropout(x, 1.0), np.zeros_like(x))
    with pytest.raises(ValueError, match="p must be a probability"):
        F.dropout_mask((2,), 1.5)
    with pytest.raises(ValueError, match="grad_out must have the forward output's shape"):
        F.dropout_backward(np.ones((2, 2)), np.ones((2, 3)))


# --------------------------------------------------------------------------
# batch_norm2d
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm2d_matches_torch_with_running_stats(backend, rng, dtype, momentum):
    t = _torch()
    c = 3
    w, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    nbt = np.zeros((), np.int64)
    trm = t.zeros(c, dtype=getattr(t, np.dtype(dtype).name))
    trv = t.ones(c, dtype=trm.dtype)
    tn = 0
    for step in range(3):
        x = (rng.standard_normal((4, c, 3, 5)) * 2 + step).astype(dtype)
        g = rng.standard_normal(x.shape).astype(dtype)
        y, mean, var = F.batch_norm2d_forward(x, rm, rv, w, b, True, momentum, 1e-5, nbt)
        gx, gw, gb = F.batch_norm2d_backward(g, x, w, mean, var, 1e-5, True)
        tn += 1
        xt, wt, bt = (t.tensor(a, requires_grad=True) for a in (x, w, b))
        mom = 1.0 / tn if momentum is None else momentum
        yt = t.nn.functional.batch_norm(xt, trm, trv, wt, bt, True, mom, 1e-5)
        yt.backward(t.tensor(g))
        tol = _tol(dtype)
        np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
        loose = {k: v * 10 for k, v in tol.items()}  # grad_x sums three terms
        np.testing.assert_allclose(gx, xt.grad.numpy(), **loose)
        np.testing.assert_allclose(gw, wt.grad.numpy(), **tol)
        np.testing.assert_allclose(gb, bt.grad.numpy(), **tol)
        np.testing.assert_allclose(rm, trm.numpy(), **tol)
        np.testing.assert_allclose(rv, trv.numpy(), **tol)
    assert int(nbt) == 3
    # eval: the running stats, and weight/bias gradients without the batch-stat terms
    x = rng.standard_normal((2, c, 4, 4)).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    rm_before = rm.copy()
    y, mean, var = F.batch_norm2d_forward(x, rm, rv, w, b, False)
    gx, gw, gb = F.batch_norm2d_backward(g, x, w, mean, var, 1e-5, False)
    xt, wt, bt = (t.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = t.nn.functional.batch_norm(xt, trm, trv, wt, bt, False, 0.1, 1e-5)
    yt.backward(t.tensor(g))
    for got, want in ((y, yt.detach()), (gx, xt.grad), (gw, wt.grad), (gb, bt.grad)):
        np.testing.assert_allclose(got, want.numpy(), **_tol(dtype))
    np.testing.assert_array_equal(rm, rm_before)  # eval leaves the running stats alone


def test_batch_norm2d_gradcheck_through_functional(backend, rng):
    x = Tensor(rng.standard_normal((2, 3, 3, 2)), requires_grad=True)
    w = Tensor(rng.standard_normal(3), requires_grad=True)
    b = Tensor(rng.standard_normal(3), requires_grad=True)
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    # every call form reaches the same node: keywords, positional, mixed
    assert gradcheck(lambda x, w, b: F.batch_norm2d(x, None, None, w, b, True), [x, w, b])
    assert gradcheck(lambda x, w, b: F.batch_norm2d(x=x, running_mean=rm.copy(),
                                                    running_var=rv.copy(), weight=w, bias=b,
                                                    training=False), [x, w, b])
    assert gradcheck(lambda x: F.batch_norm2d(x, None, None, training=True, eps=0.1), [x])


def test_batch_norm2d_checks(rng):
    x = rng.standard_normal((2, 3, 2, 2))
    with pytest.raises(ValueError, match="x must be 4-D"):
        F.batch_norm2d(x[0], None, None, training=True)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        F.batch_norm2d(x, None, None, np.ones(2), training=True)
    with pytest.raises(TypeError, match="bias has dtype float32"):
        F.batch_norm2d(x, None, None, np.ones(3), np.ones(3, np.float32), training=True)
    with pytest.raises(ValueError, match="must be given when not training"):
        F.batch_norm2d(x, None, None, training=False)
    with pytest.raises(ValueError, match="both be arrays or both None"):
        F.batch_norm2d(x, np.zeros(3), None, training=True)
    with pytest.raises(TypeError, match="running_mean must be a NumPy or CuPy array"):
        F.batch_norm2d(x, [0.0] * 3, np.ones(3), training=True)
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        F.batch_norm2d(x[:1, :, :1, :1], None, None, training=True)
    with pytest.raises(ValueError, match="momentum=None needs num_batches_tracked"):
        F.batch_norm2d(x, np.zeros(3), np.ones(3), training=True, momentum=None)
    with pytest.raises(TypeError, match="eps must be a real number"):
        F.batch_norm2d(x, None, None, training=True, eps="small")
    with pytest.raises(ValueError, match="grad_out must have the forward output's shape"):
        F.batch_norm2d_backward(x[:1], x, None, np.zeros(3), np.ones(3))
    with pytest.raises(TypeError, match="mean and var must be arrays"):
        F.batch_norm2d_backward(x, x, None, None, np.ones(3))
    # float32 running stats on float64 input are fine (updated in place, in their dtype)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    F.batch_norm2d(x, rm, rv, training=True)
    assert rm.dtype == np.float32 and np.abs(rm).max() > 0
