"""Activations, losses, dropout and BatchNorm written once with array methods
that NumPy and CuPy share.

``numpy_ref`` exports these as the reference, and ``cuda`` runs them on CuPy
arrays (or on NumPy arrays under Numba's simulator): they are memory-bound,
off the conv/GEMM hot path, and one readable version serves both. The ``cpu``
backend has native BatchNorm kernels and uses the rest as they are.

Arguments arrive validated (see the contract in :mod:`fastnn.backends`):
C-contiguous arrays of one float dtype, ``dim`` a non-negative int, BatchNorm
input NCHW with per-channel (C,) vectors. Every op returns new C-contiguous
arrays of the input's dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastnn._array import array_module

Array = Any  # numpy.ndarray or cupy.ndarray

__all__ = [
    "batch_norm2d",
    "batch_norm2d_backward",
    "dropout_masked",
    "log_softmax",
    "log_softmax_backward",
    "mse_loss",
    "mse_loss_backward",
    "sigmoid",
    "sigmoid_backward",
    "tanh",
    "tanh_backward",
]


def fresh(a: Array, dtype: Any) -> Array:
    """``a`` as a C-contiguous array of ``dtype`` that shares memory with no input.

    ``a`` must be computed by the op (never an argument passed through), so a
    base-owning, contiguous array of the right dtype is already fresh and is
    returned as is; views (slices, transposes) are copied.
    """
    xp = array_module(a)
    a = xp.asarray(a)  # NumPy ufuncs return scalars for 0-d input
    if a.base is None and a.flags.c_contiguous and a.dtype == dtype:
        return a
    return xp.array(a, dtype=dtype, order="C", copy=True)


# --------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------


def sigmoid(x: Array) -> Array:
    """1 / (1 + exp(-x)); exp only sees -|x|, so it never overflows."""
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))
    return fresh(xp.where(x >= 0, 1 / (1 + e), e / (1 + e)), x.dtype)


def sigmoid_backward(grad_out: Array, y: Array) -> Array:
    """grad_out * y * (1 - y), with y the sigmoid output."""
    return fresh(grad_out * (y * (1 - y)), y.dtype)


def tanh(x: Array) -> Array:
    return fresh(array_module(x).tanh(x), x.dtype)


def tanh_backward(grad_out: Array, y: Array) -> Array:
    """grad_out * (1 - y**2), with y the tanh output."""
    return fresh(grad_out * (1 - y * y), y.dtype)


def log_softmax(x: Array, dim: int) -> Array:
    """x - logsumexp(x) along ``dim``, with the max subtracted first so exp cannot overflow."""
    xp = array_module(x)
    shifted = x - x.max(axis=dim, keepdims=True)
    return fresh(shifted - xp.log(xp.exp(shifted).sum(axis=dim, keepdims=True)), x.dtype)


def log_softmax_backward(grad_out: Array, y: Array, dim: int) -> Array:
    """grad_out - softmax * sum(grad_out) along ``dim``; y is the log_softmax output."""
    xp = array_module(y)
    return fresh(grad_out - xp.exp(y) * grad_out.sum(axis=dim, keepdims=True), y.dtype)


# --------------------------------------------------------------------------
# loss and dropout
# --------------------------------------------------------------------------


def mse_loss(input: Array, target: Array) -> Array:  # noqa: A002 - torch's name
    """mean((input - target)**2) over all elements, as a 0-d array (NaN when empty)."""
    d = input - target
    return fresh((d * d).mean(dtype=input.dtype), input.dtype)


def mse_loss_backward(grad_out: Array, input: Array, target: Array) -> Array:  # noqa: A002
    """d loss / d input = 2 * (input - target) * grad_out / size; grad_out is 0-d.

    The gradient of ``target`` is its negation.
    """
    return fresh((input - target) * (grad_out * (2.0 / max(input.size, 1))), input.dtype)


def dropout_masked(x: Array, mask: Array) -> Array:
    """x * mask: inverted dropout once its scaled keep mask (0 or 1/(1-p)) is drawn.

    The same product is its backward (grad_out * mask).
    """
    return fresh(x * mask, x.dtype)


# --------------------------------------------------------------------------
# BatchNorm over (N, H, W) per channel of NCHW input
# --------------------------------------------------------------------------


def _per_channel(v: Array) -> Array:
    return v.reshape(1, -1, 1, 1)


def batch_norm2d(
    x: Array, weight: Array | None, bias: Array | None, mean: Array | None,
    var: Array | None, eps: float, training: bool,
) -> tuple[Array, Array, Array]:
    """y = (x - mean) / sqrt(var + eps) * weight + bias per channel -> (y, mean, var).

    training: mean/var are ignored and computed from x (mean and biased
    variance over N, H, W, summed in float64, the variance in two passes), and
    returned. Eval: mean/var are the running stats (x's dtype), returned as given.
    """
    xp = array_module(x)
    if training:
        m = max(x.size // max(x.shape[1], 1), 1)
        mean64 = x.sum(axis=(0, 2, 3), dtype=np.float64) / m
        d = x - _per_channel(mean64.astype(x.dtype))
        var64 = (d * d).sum(axis=(0, 2, 3), dtype=np.float64) / m
        mean, var = mean64.astype(x.dtype), var64.astype(x.dtype)
    invstd = 1.0 / xp.sqrt(var.astype(np.float64) + eps)
    scale = invstd if weight is None else invstd * weight
    y = (x - _per_channel(mean)) * _per_channel(scale.astype(x.dtype))
    if bias is not None:
        y += _per_channel(bias)
    return fresh(y, x.dtype), fresh(mean, x.dtype), fresh(var, x.dtype)


def batch_norm2d_backward(
    grad_out: Array, x: Array, weight: Array | None, mean: Array, var: Array, eps: float,
    training: bool, need_x: bool, need_w: bool, need_b: bool,
) -> tuple[Array | None, Array | None, Array | None]:
    """(grad_x, grad_weight, grad_bias) of :func:`batch_norm2d`, None where not needed.

    mean/var are what the forward used. With xhat = (x - mean) * invstd and
    m = N*H*W: grad_bias = sum(g), grad_weight = sum(g * xhat) (per channel,
    float64 sums); grad_x = weight * invstd * (g - [sum(g) + xhat * sum(g * xhat)] / m)
    in training, where mean and var depend on x, else weight * invstd * g.
    """
    dt = x.dtype
    xp = array_module(x)
    invstd = 1.0 / xp.sqrt(var.astype(np.float64) + eps)
    xhat = (x - _per_channel(mean)) * _per_channel(invstd.astype(dt))
    sum_g = grad_out.sum(axis=(0, 2, 3), dtype=np.float64)
    sum_gx = (grad_out * xhat).sum(axis=(0, 2, 3), dtype=np.float64)
    gx = None
    if need_x:
        k = invstd if weight is None else invstd * weight
        if training:
            m = max(x.size // max(x.shape[1], 1), 1)
            gx = grad_out - _per_channel((sum_g / m).astype(dt))
            gx -= xhat * _per_channel((sum_gx / m).astype(dt))
            gx *= _per_channel(k.astype(dt))
        else:
            gx = grad_out * _per_channel(k.astype(dt))
        gx = fresh(gx, dt)
    gw = fresh(sum_gx.astype(dt), dt) if need_w else None
    gb = fresh(sum_g.astype(dt), dt) if need_b else None
    return gx, gw, gb
