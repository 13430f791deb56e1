"""Fused Linear + ReLU: the op, its autograd node and nn.Sequential's use of it.

``linear_relu`` must equal ``relu(linear(x))`` (bit for bit on the backends that
compose it, and on cpu, where the bias and ReLU run in the gemm's epilogue);
gradients must match backpropagation through the separate ops up to summation
order, and finite differences.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastnn
import fastnn.functional as F
from fastnn import nn
from fastnn.autograd import Tensor
from fastnn.gradcheck import gradcheck

# (batch shape, in_features, out_features): odd sizes, batch 1, an output
# narrower than a vector (10 classes: the transposed narrow-C path), the MNIST
# hidden layer (K-split forward), and a long K with a wide output (packed path,
# several K blocks).
SHAPES = [
    ((1,), 7, 5),
    ((3,), 1, 1),
    ((13,), 17, 10),
    ((128,), 128, 10),
    ((2, 5), 9, 33),
    ((64,), 300, 70),
    ((128,), 5408, 128),
    ((37,), 1031, 67),
]
IDS = ["b1", "k1n1", "n10", "mnist-out", "3d", "packed", "mnist-hidden", "ragged-long-k"]


def _data(rng, shape, dtype, bias=True):
    batch, k, n = shape
    x = rng.standard_normal((*batch, k)).astype(dtype)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype) if bias else None
    return x, w, b


def _close(got, want, dtype, name=""):
    eps = 1e-5 if dtype == np.float32 else 1e-12
    scale = max(float(np.abs(want).max(initial=0.0)), 1.0)
    np.testing.assert_allclose(got, want, rtol=eps, atol=eps * scale, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_forward_equals_unfused(host_backend, rng, shape, dtype, bias):
    x, w, b = _data(rng, shape, dtype, bias)
    with fastnn.backend(host_backend):
        want = F.relu(F.linear(x, w, b))
        got = F.linear_relu(x, w, b)
    assert got.dtype == dtype and got.shape == want.shape
    # Same gemm plan, same additions in the same order: bit for bit (-0.0 too).
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    with fastnn.backend("numpy"):
        ref = F.relu(F.linear(x, w, b))
    _close(got, ref, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_backward_matches_unfused(host_backend, rng, shape, dtype):
    x, w, b = _data(rng, shape, dtype)
    with fastnn.backend(host_backend):
        y = F.linear_relu(x, w, b)
        gy = rng.standard_normal(y.shape).astype(dtype)
        got = F.linear_relu_backward(gy, x, w, y)
        want = F.linear_backward(F.relu_backward(gy, y), x, w)
    with fastnn.backend("numpy"):
        ref = F.linear_backward(F.relu_backward(gy, y), x, w)
    for name, g, w_, r in zip(("grad_x", "grad_w", "grad_b"), got, want, ref):
        assert g.shape == w_.shape and g.dtype == dtype, name
        _close(g, w_, dtype, name)
        _close(g, r, dtype, name + " vs numpy")


def test_backward_output_mask(host_backend, rng):
    x, w, b = _data(rng, ((9,), 11, 6), np.float64)
    with fastnn.backend(host_backend):
        y = F.linear_relu(x, w, b)
        gy = rng.standard_normal(y.shape)
        full = F.linear_relu_backward(gy, x, w, y)
        for mask in [(False, True, False), (True, False, False), (False, False, True)]:
            got = F.linear_relu_backward(gy, x, w, y, output_mask=mask)
            for want_it, g, f in zip(mask, got, full):
                if want_it:
                    np.testing.assert_array_equal(g, f)
                else:
                    assert g is None


def test_special_values(host_backend):
    """NaN passes the ReLU (as F.relu), -0.0 stays -0.0, negatives clamp, and
    the mask takes only y > 0."""
    x = np.array([[1.0, 0.0], [0.0, 1.0], [np.nan, 0.0], [-1.0, 0.0]], dtype=np.float32)
    w = np.array([[1.0, 0.0], [0.0, -1.0], [-0.0, 0.0]], dtype=np.float32)
    b = np.array([0.0, 0.0, -0.0], dtype=np.float32)
    with fastnn.backend(host_backend):
        y = F.linear_relu(x, w, b)
        want = F.relu(F.linear(x, w, b))
        gy = np.ones_like(y)
        gx, gw, gb = F.linear_relu_backward(gy, x, w, y)
    np.testing.assert_array_equal(y.view(np.uint32), want.view(np.uint32))
    assert np.isnan(y[2, 0]) and y[3, 0] == 0.0
    # y > 0 only at (0, 0): the mask is False for NaN, 0 and -0.
    np.testing.assert_array_equal(gb, [1.0, 0.0, 0.0])


def test_empty_and_degenerate(host_backend):
    w = np.ones((3, 4))
    b = np.array([1.0, -1.0, 2.0])
    with fastnn.backend(host_backend):
        y = F.linear_relu(np.zeros((0, 4)), w, b)
        assert y.shape == (0, 3)
        # in_features = 0: relu(bias) for every row.
        y = F.linear_relu(np.zeros((2, 0)), np.zeros((3, 0)), b)
        np.testing.assert_array_equal(y, [[1.0, 0.0, 2.0]] * 2)
        gx, gw, gb = F.linear_relu_backward(np.ones((2, 3)), np.zeros((2, 0)), np.zeros((3, 0)),
                                            y)
        assert gx.shape == (2, 0) and gw.shape == (3, 0)
        np.testing.assert_array_equal(gb, [2.0, 0.0, 2.0])


def test_bad_arguments_name_them():
    x = np.zeros((2, 4), np.float32)
    w = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="in_features"):
        F.linear_relu(np.zeros((2, 5), np.float32), w)
    with pytest.raises(ValueError, match="weight"):
        F.linear_relu(x, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="bias"):
        F.linear_relu(x, w, np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="weight"):
        F.linear_relu(x, w.astype(np.float64))
    y = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="grad_out"):
        F.linear_relu_backward(np.zeros((2, 4), np.float32), x, w, y)
    with pytest.raises(ValueError, match="y must"):
        F.linear_relu_backward(y, x, w, np.zeros((3, 3), np.float32))
    with pytest.raises(TypeError, match="y"):
        F.linear_relu_backward(y, x, w, y.astype(np.float64))


def test_gradcheck_float64(host_backend):
    rng = np.random.default_rng(7)
    x, w, b = _data(rng, ((5,), 6, 4), np.float64)
    # Keep pre-activations away from 0 so finite differences do not cross the kink.
    b = b + np.sign(b) * 0.5
    inputs = [Tensor(x, requires_grad=True), Tensor(w, requires_grad=True),
              Tensor(b, requires_grad=True)]
    with fastnn.backend(host_backend):
        pre = F.linear(x, w, b)
        assert np.abs(pre).min() > 1e-3
        gradcheck(lambda a, bw, bb: F.linear_relu(a, bw, bb), inputs, eps=1e-7, atol=1e-6,
                  rtol=1e-4)


def _mlp(rng, fuse):
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 9, rng=rng, dtype=np.float64), nn.ReLU(),
        nn.Linear(9, 7, rng=rng, dtype=np.float64), nn.ReLU(),
        nn.Linear(7, 3, rng=rng, dtype=np.float64),
    )
    model.fuse = fuse
    return model


def _node_names(out):
    names, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        names.add(node.fn.__name__)
        stack.extend(p for p in node.parents if p is not None and hasattr(p, "fn"))
    return names


def test_sequential_fuses_and_matches_unfused(host_backend):
    x = np.random.default_rng(3).standard_normal((6, 3, 4))
    labels = np.array([0, 1, 2, 0, 1, 2])
    outs, grads = [], []
    for fuse in (True, False):
        model = _mlp(np.random.default_rng(0), fuse)
        with fastnn.backend(host_backend):
            out = model(Tensor(x))
            names = _node_names(out)
            assert ("LinearReLU" in names) == fuse
            assert ("ReLU" in names) == (not fuse)
            F.cross_entropy(out, labels).backward()
        outs.append(out.data)
        grads.append([p.grad for p in model.parameters()])
    np.testing.assert_array_equal(outs[0], outs[1])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_sequential_does_not_fuse_subclasses(host_backend):
    class MyLinear(nn.Linear):
        pass

    rng = np.random.default_rng(0)
    model = nn.Sequential(MyLinear(4, 3, rng=rng), nn.ReLU())
    with fastnn.backend(host_backend):
        out = model(Tensor(np.ones((2, 4), np.float32)))
    assert out.grad_fn.fn.__name__ == "ReLU"


def test_frozen_weight_skips_its_gradient(host_backend, rng):
    x, w, b = _data(rng, ((4,), 5, 3), np.float64)
    xt, wt, bt = Tensor(x, requires_grad=True), Tensor(w), Tensor(b, requires_grad=True)
    with fastnn.backend(host_backend):
        F.linear_relu(xt, wt, bt).sum().backward()
        y = F.linear_relu(x, w, b)
        gx, _, gb = F.linear_relu_backward(np.ones_like(y), x, w, y)
    assert wt.grad is None
    np.testing.assert_allclose(xt.grad, gx, rtol=1e-12)
    np.testing.assert_allclose(bt.grad, gb, rtol=1e-12)
