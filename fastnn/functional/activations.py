"""Activations, losses and dropout."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from fastnn.functional._args import (
    Array,
    _as_float_array,
    _check_grad_out,
    _contig,
    _int,
    _is_cupy,
    _pick_backend,
    _same_dtype,
    _tensor_aware,
    _xp,
)

# --------------------------------------------------------------------------
# activations and losses
# --------------------------------------------------------------------------


@_tensor_aware
def relu(x: Array) -> Array:
    """max(x, 0) elementwise (NaN stays NaN)."""
    x = _as_float_array(x, "relu", "x")
    if x.size == 0:
        return _xp(x).empty(x.shape, dtype=x.dtype)
    return _pick_backend("relu", [x]).relu(_contig(x))


@_tensor_aware
def relu_backward(grad_out: Array, y: Array) -> Array:
    """grad_out where the ReLU output ``y`` is positive, else 0."""
    op = "relu_backward"
    grad_out = _as_float_array(grad_out, op, "grad_out")
    y = _as_float_array(y, op, "y")
    _same_dtype(op, y, "y", grad_out, "grad_out")
    _check_grad_out(op, grad_out, y.shape)
    if y.size == 0:
        return _xp(y).empty(y.shape, dtype=y.dtype)
    return _pick_backend(op, [grad_out, y]).relu_backward(_contig(grad_out), _contig(y))


@_tensor_aware
def sigmoid(x: Array) -> Array:
    """1 / (1 + exp(-x)), computed without overflow for large |x|."""
    x = _as_float_array(x, "sigmoid", "x")
    xp = _xp(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


@_tensor_aware
def tanh(x: Array) -> Array:
    """Hyperbolic tangent elementwise."""
    x = _as_float_array(x, "tanh", "x")
    return _xp(x).tanh(x)


@_tensor_aware
def log_softmax(x: Array, dim: int = -1) -> Array:
    """log(softmax(x)) along ``dim``, stable for large values."""
    x = _as_float_array(x, "log_softmax", "x")
    dim = _int(dim, "log_softmax", "dim")
    if not -x.ndim <= dim < max(x.ndim, 1):
        raise ValueError(f"log_softmax: dim {dim} out of range for {x.ndim}-D x")
    xp = _xp(x)
    m = x.max(axis=dim, keepdims=True) if x.size else x
    shifted = x - m
    return shifted - xp.log(xp.exp(shifted).sum(axis=dim, keepdims=True))


def _labels(op: str, labels: Any, n: int, k: int) -> Array:
    if not (_is_cupy(labels) or isinstance(labels, np.ndarray)):
        labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{op}: labels must be integers, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{op}: labels must have shape ({n},), got {tuple(labels.shape)}")
    if isinstance(labels, np.ndarray) and n and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"{op}: labels must lie in [0, {k}), got range "
                         f"[{labels.min()}, {labels.max()}]")
    # On the GPU the range check would force a host sync; the kernel guards instead.
    return _contig(labels.astype(_xp(labels).int64, copy=False))


@_tensor_aware
def softmax_cross_entropy(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Fused softmax + cross-entropy: ``(mean loss as a 0-d array, grad_logits)``.

    logits (N, K) float, labels (N,) integer class indices in [0, K).
    grad_logits = (softmax(logits) - onehot(labels)) / N.
    """
    op = "softmax_cross_entropy"
    logits = _as_float_array(logits, op, "logits")
    if logits.ndim != 2:
        raise ValueError(f"{op}: logits must be 2-D (N, classes), got shape {logits.shape}")
    n, k = logits.shape
    if k == 0:
        raise ValueError(f"{op}: logits must have at least one class")
    labels = _labels(op, labels, n, k)
    backend = _pick_backend(op, [logits, labels])
    if n == 0:
        xp = _xp(logits)
        return xp.asarray(xp.nan, dtype=logits.dtype), xp.empty_like(logits)
    return backend.softmax_cross_entropy(_contig(logits), labels)


@_tensor_aware
def cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy of (N, K) logits against (N,) integer labels."""
    return softmax_cross_entropy(logits, labels)[0]


@_tensor_aware
def mse_loss(input: Array, target: Array) -> Array:  # noqa: A002 - torch's name
    """Mean squared error over all elements, as a 0-d array."""
    input = _as_float_array(input, "mse_loss", "input")
    target = _as_float_array(target, "mse_loss", "target")
    _same_dtype("mse_loss", input, "input", target, "target")
    if input.shape != target.shape:
        raise ValueError(
            f"mse_loss: target shape {tuple(target.shape)} != input shape {tuple(input.shape)}"
        )
    d = input - target
    return (d * d).mean(dtype=input.dtype)


@_tensor_aware
def dropout(
    x: Array, p: float = 0.5, training: bool = True, rng: np.random.Generator | None = None
) -> Array:
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p)."""
    x = _as_float_array(x, "dropout", "x")
    if not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"dropout: p must be a probability in [0, 1], got {p!r}")
    if not training or p == 0:
        return x.copy()
    xp = _xp(x)
    if p == 1:
        return xp.zeros_like(x)
    if xp is np:
        keep = (rng or np.random.default_rng()).random(x.shape) >= p
    else:
        keep = xp.random.random(x.shape) >= p
    return x * (keep * x.dtype.type(1.0 / (1.0 - p)))
