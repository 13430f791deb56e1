"""Elementwise activations and log_softmax, each with its backward.

The backward functions take the forward *output* ``y`` (what autograd keeps),
not the input: relu's mask, sigmoid's y(1-y), tanh's 1-y^2 and log_softmax's
softmax all follow from it.
"""

from __future__ import annotations

from fastnn.functional._args import (
    Array,
    _as_float_array,
    _check_grad_out,
    _contig,
    _int,
    _pick_backend,
    _same_dtype,
    _tensor_aware,
    _xp,
)


def _unary(op: str, x: Array) -> Array:
    """Backend op ``op`` on a validated float array ``x`` (elementwise, any shape)."""
    x = _as_float_array(x, op, "x")
    if x.size == 0:
        return _xp(x).empty(x.shape, dtype=x.dtype)
    return getattr(_pick_backend(op, [x]), op)(_contig(x))


def _unary_backward(op: str, grad_out: Array, y: Array, *extra: object) -> Array:
    """Backend op ``op`` on grad_out and the forward output y (same shape and dtype)."""
    grad_out = _as_float_array(grad_out, op, "grad_out")
    y = _as_float_array(y, op, "y")
    _same_dtype(op, y, "y", grad_out, "grad_out")
    _check_grad_out(op, grad_out, y.shape)
    if y.size == 0:
        return _xp(y).empty(y.shape, dtype=y.dtype)
    return getattr(_pick_backend(op, [grad_out, y]), op)(_contig(grad_out), _contig(y), *extra)


@_tensor_aware
def relu(x: Array) -> Array:
    """max(x, 0) elementwise (NaN stays NaN)."""
    return _unary("relu", x)


@_tensor_aware
def relu_backward(grad_out: Array, y: Array) -> Array:
    """grad_out where the ReLU output ``y`` is positive, else 0."""
    return _unary_backward("relu_backward", grad_out, y)


@_tensor_aware
def sigmoid(x: Array) -> Array:
    """1 / (1 + exp(-x)), computed without overflow for large |x|."""
    return _unary("sigmoid", x)


@_tensor_aware
def sigmoid_backward(grad_out: Array, y: Array) -> Array:
    """grad_out * y * (1 - y), with ``y`` the sigmoid output."""
    return _unary_backward("sigmoid_backward", grad_out, y)


@_tensor_aware
def tanh(x: Array) -> Array:
    """Hyperbolic tangent elementwise."""
    return _unary("tanh", x)


@_tensor_aware
def tanh_backward(grad_out: Array, y: Array) -> Array:
    """grad_out * (1 - y**2), with ``y`` the tanh output."""
    return _unary_backward("tanh_backward", grad_out, y)


def _dim(op: str, dim: object, ndim: int) -> int:
    dim = _int(dim, op, "dim")
    n = max(ndim, 1)  # torch treats a 0-d tensor as having one dim here
    if not -n <= dim < n:
        raise ValueError(f"{op}: dim {dim} out of range for {ndim}-D x")
    return dim % n


@_tensor_aware
def log_softmax(x: Array, dim: int = -1) -> Array:
    """log(softmax(x)) along ``dim``, stable for large values."""
    x = _as_float_array(x, "log_softmax", "x")
    dim = _dim("log_softmax", dim, x.ndim)
    if x.size == 0 or x.ndim == 0:
        # One element per softmax (0-d) gives log(1) = 0; empty stays empty.
        return _xp(x).zeros(x.shape, dtype=x.dtype)
    return _pick_backend("log_softmax", [x]).log_softmax(_contig(x), dim)


@_tensor_aware
def log_softmax_backward(grad_out: Array, y: Array, dim: int = -1) -> Array:
    """grad_out - softmax * sum(grad_out, dim), with ``y`` the log_softmax output."""
    op = "log_softmax_backward"
    y = _as_float_array(y, op, "y")
    dim = _dim(op, dim, y.ndim)
    if y.ndim == 0:
        grad_out = _as_float_array(grad_out, op, "grad_out")
        _check_grad_out(op, grad_out, y.shape)
        return _xp(y).zeros(y.shape, dtype=y.dtype)
    return _unary_backward(op, grad_out, y, dim)
