"""Losses: softmax cross-entropy (fused with its gradient) and mean squared error."""

from __future__ import annotations

from typing import Any

import numpy as np

from fastnn.functional._args import (
    Array,
    _as_float_array,
    _check_grad_out,
    _contig,
    _is_cupy,
    _pick_backend,
    _same_dtype,
    _tensor_aware,
    _xp,
)


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


def _mse_operands(op: str, input: Any, target: Any) -> tuple[Array, Array]:  # noqa: A002
    input = _as_float_array(input, op, "input")
    target = _as_float_array(target, op, "target")
    _same_dtype(op, input, "input", target, "target")
    if input.shape != target.shape:
        raise ValueError(
            f"{op}: target shape {tuple(target.shape)} != input shape {tuple(input.shape)}"
        )
    return _contig(input), _contig(target)


@_tensor_aware
def mse_loss(input: Array, target: Array) -> Array:  # noqa: A002 - torch's name
    """Mean squared error over all elements, as a 0-d array (NaN when empty)."""
    input, target = _mse_operands("mse_loss", input, target)
    return _pick_backend("mse_loss", [input, target]).mse_loss(input, target)


@_tensor_aware
def mse_loss_backward(
    grad_out: Array, input: Array, target: Array,  # noqa: A002 - torch's name
    output_mask: tuple[bool, bool] = (True, True),
) -> tuple[Array | None, Array | None]:
    """Gradients of :func:`mse_loss`: ``(grad_input, grad_target)``, None where
    ``output_mask`` says not needed. grad_input = 2 (input - target) grad_out / size,
    grad_target = -grad_input; ``grad_out`` is the loss's (0-d) gradient."""
    op = "mse_loss_backward"
    input, target = _mse_operands(op, input, target)
    grad_out = _as_float_array(grad_out, op, "grad_out")
    _same_dtype(op, input, "input", grad_out, "grad_out")
    _check_grad_out(op, grad_out, ())
    need_input, need_target = output_mask
    if not (need_input or need_target):
        return None, None
    g = _pick_backend(op, [grad_out, input, target]).mse_loss_backward(grad_out, input, target)
    return (g if need_input else None), (-g if need_target else None)
