"""Elementwise ops, losses, dropout, BatchNorm and the optimizer steps, written
once with array methods that NumPy and CuPy share.

``numpy_ref`` exports all of these as the reference. ``cuda`` runs the
activations, losses, dropout and BatchNorm on CuPy arrays (or on NumPy arrays
under Numba's simulator): they are memory-bound, off the conv/GEMM hot path,
and one readable version serves both; it has its own kernels for relu, the
softmax cross-entropy and the optimizer steps. The ``cpu`` backend has native
kernels for those and for BatchNorm, and uses the rest as they are.

Arguments arrive validated (see the contract in :mod:`fastnn.backends`):
C-contiguous arrays of one float dtype, ``dim`` a non-negative int, BatchNorm
input NCHW with per-channel (C,) vectors. Every op returns new C-contiguous
arrays of the input's dtype.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fastnn._array import FLOAT_DTYPES, array_module, is_cupy

Array = Any  # numpy.ndarray or cupy.ndarray

__all__ = [
    "adam_step",
    "batch_norm2d",
    "batch_norm2d_backward",
    "check_step_arrays",
    "dropout_masked",
    "log_softmax",
    "log_softmax_backward",
    "lookup_u8",
    "mse_loss",
    "mse_loss_backward",
    "relu",
    "relu_backward",
    "sgd_step",
    "sigmoid",
    "sigmoid_backward",
    "softmax_cross_entropy",
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


def lookup_u8(images: Array, rows: Array | None, table: Array) -> Array:
    """table[images[rows]] (every row when rows is None): a batch of uint8 pixels
    through a 256-entry table."""
    xp = array_module(images)
    return fresh(xp.take(table, images if rows is None else images[rows]), table.dtype)


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


# --------------------------------------------------------------------------- #
# Activations and loss
# --------------------------------------------------------------------------- #


def relu(x: Array) -> Array:
    """max(x, 0) elementwise; NaN stays NaN (as torch.relu)."""
    return fresh(array_module(x).maximum(x, x.dtype.type(0)), x.dtype)


def relu_backward(grad_out: Array, y: Array) -> Array:
    """grad_out where the relu output y > 0, else 0 (same shape as y)."""
    return fresh(array_module(y).where(y > 0, grad_out, grad_out.dtype.type(0)), grad_out.dtype)


def softmax_cross_entropy(
    logits: Array, labels: Array
) -> tuple[Array, Array]:
    """Mean softmax cross-entropy and its gradient.

    logits (N, K) float, labels (N,) int64 in [0, K) -> (loss, grad_logits):
    loss is a 0-d array (the batch mean, NaN when N = 0, as torch's mean over
    an empty batch), grad_logits (N, K) = (softmax(logits) - onehot) / N.
    """
    xp = array_module(logits)
    dtype = logits.dtype
    n = logits.shape[0]
    if n == 0:
        return xp.array(np.nan, dtype=dtype), xp.zeros(logits.shape, dtype=dtype)
    # log-sum-exp with the row max subtracted, so large logits cannot overflow.
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    rows = xp.arange(n)
    # Accumulate in float64: a float32 sum of near-max losses would overflow.
    loss = -log_probs[rows, labels].mean(dtype=np.float64)
    grad = xp.exp(log_probs)
    grad[rows, labels] -= 1
    grad /= dtype.type(n)
    return xp.array(loss, dtype=dtype), fresh(grad, dtype)


# --------------------------------------------------------------------------- #
# Optimizer steps (in place)
# --------------------------------------------------------------------------- #


def flush_subnormal(state: Array) -> None:
    """Store optimizer-state values below the smallest normal number as 0, in place.

    A moment whose gradient stays 0 decays through the subnormal range, where
    x86 arithmetic can take a microcode assist per element (the C++ step ran
    10x slower with a quarter of Adam's state subnormal); such a moment moves no
    parameter. All backends apply this rule, so they keep the same state.
    """
    xp = array_module(state)
    tiny = xp.finfo(state.dtype).tiny
    state[xp.abs(state) < tiny] = 0


def check_step_arrays(op: str, index: int | None, param: Array,
                      others: list[tuple[str, Any, bool]] | tuple[tuple[str, Any, bool], ...],
                      disjoint: bool = False) -> None:
    """An optimizer step's arrays, in the cpu bindings' order (so both raise the same
    exception type for the same input): ``param`` a float32/float64 NumPy or CuPy
    array (TypeError), C-contiguous and writeable (ValueError); each of ``others``,
    (name, array or None, updated in place) triples: of param's array type and a
    float dtype (TypeError), C-contiguous (ValueError), of param's dtype
    (TypeError) and shape (ValueError), writeable where updated in place
    (ValueError) and, with ``disjoint``, sharing no memory with the arrays before
    it (ValueError). ``index``: the position in a multi-tensor op's lists (names
    become ``params[i]``, ``grads[i]``, ...). Written for speed: an optimizer
    checks every parameter's arrays on every step, so names are only formatted
    for an error."""

    def nm(base: str) -> str:
        return base if index is None else f"{base}s[{index}]"

    kind = type(param)
    if not (kind is np.ndarray or is_cupy(param)):
        raise TypeError(f"{op}: {nm('param')} must be a NumPy or CuPy array, got {kind.__name__}")
    dtype, shape = param.dtype, param.shape
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {nm('param')} must be float32 or float64, got {dtype}")
    flags = param.flags
    if not flags.c_contiguous:
        raise ValueError(f"{op}: {nm('param')} must be C-contiguous (it is updated in place)")
    if not getattr(flags, "writeable", True):
        raise ValueError(f"{op}: {nm('param')} is read-only but is updated in place")
    seen = [("param", param)]
    for name, a, in_place in others:
        if a is None:
            continue
        if type(a) is not kind:
            raise TypeError(f"{op}: {nm(name)} must be a {kind.__name__} like {nm('param')}, "
                            f"got {type(a).__name__}")
        if a.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {nm(name)} must be float32 or float64, got {a.dtype}")
        flags = a.flags
        if not flags.c_contiguous:
            raise ValueError(f"{op}: {nm(name)} must be C-contiguous")
        if a.dtype != dtype:
            raise TypeError(f"{op}: {nm(name)} has dtype {a.dtype} but {nm('param')} has "
                            f"dtype {dtype} (all arrays must share one dtype)")
        if a.shape != shape:
            raise ValueError(f"{op}: {nm(name)} must have the shape of {nm('param')} "
                             f"{tuple(shape)}, got {tuple(a.shape)}")
        if in_place and not getattr(flags, "writeable", True):
            raise ValueError(f"{op}: {nm(name)} is read-only but is updated in place")
        if disjoint:
            xp = array_module(a)
            for prev, b in seen:
                if xp.may_share_memory(b, a):
                    raise ValueError(f"{op}: {nm(prev)} and {nm(name)} must not share memory")
            seen.append((name, a))


def sgd_step(
    param: Array, grad: Array, momentum_buf: Array | None,
    lr: float, momentum: float, weight_decay: float, nesterov: bool,
) -> None:
    """One torch.optim.SGD step (dampening 0), in place on param and momentum_buf.

    g = grad + wd*param; buf = momentum*buf + g; g = g + momentum*buf if
    nesterov else buf; param -= lr*g. momentum_buf may be None when momentum == 0.
    """
    # Python floats are "weak" scalars, so float32 arrays stay float32 below.
    g = grad + weight_decay * param if weight_decay != 0 else grad
    if momentum != 0:
        if momentum_buf is None:
            raise ValueError("momentum_buf must be an array when momentum != 0")
        momentum_buf *= momentum
        momentum_buf += g
        flush_subnormal(momentum_buf)
        g = g + momentum * momentum_buf if nesterov else momentum_buf
    param -= lr * g


def adam_step(
    param: Array, grad: Array, exp_avg: Array, exp_avg_sq: Array,
    step: int, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, decoupled: bool,
) -> None:
    """One torch.optim.Adam (decoupled=False) / AdamW (decoupled=True) step, in place.

    ``step`` is the 1-based count of this step (for the bias corrections).
    Adam adds wd*param to the gradient; AdamW first scales param by 1 - lr*wd.
    """
    if weight_decay != 0:
        if decoupled:
            param *= 1 - lr * weight_decay
        else:
            grad = grad + weight_decay * param
    exp_avg *= beta1
    exp_avg += (1 - beta1) * grad
    exp_avg_sq *= beta2
    exp_avg_sq += (1 - beta2) * grad * grad
    flush_subnormal(exp_avg)
    flush_subnormal(exp_avg_sq)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = array_module(exp_avg_sq).sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
    param -= (lr / bias_correction1) * exp_avg / denom
