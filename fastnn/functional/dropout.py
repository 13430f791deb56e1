"""Inverted dropout: the mask is drawn in one place, :func:`dropout_mask`."""

from __future__ import annotations

import numbers
from types import ModuleType
from typing import Any

import numpy as np

from fastnn.functional._args import (
    Array,
    _as_float_array,
    _check_grad_out,
    _contig,
    _pick_backend,
    _same_dtype,
    _tensor_aware,
    _xp,
)


def _probability(op: str, p: Any) -> float:
    if not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{op}: p must be a probability in [0, 1], got {p!r}")
    return float(p)


def dropout_mask(
    shape: tuple[int, ...], p: float, rng: np.random.Generator | None = None,
    xp: ModuleType = np, dtype: Any = np.float32,
) -> Array:
    """Inverted dropout's scaled keep mask: 1/(1-p) with probability 1-p, else 0.

    ``xp`` is numpy (the mask comes from ``rng``, default a fresh generator) or
    cupy (CuPy's global generator; ``rng`` is not used). p == 1 gives zeros.
    """
    p = _probability("dropout_mask", p)
    if p == 1:
        return xp.zeros(shape, dtype=dtype)
    if xp is np:
        keep = (rng or np.random.default_rng()).random(shape) >= p
    else:
        keep = xp.random.random(shape) >= p
    mask = keep.astype(dtype)
    mask *= np.dtype(dtype).type(1.0 / (1.0 - p))
    return mask


@_tensor_aware
def dropout_forward(
    x: Array, p: float = 0.5, training: bool = True, rng: np.random.Generator | None = None
) -> tuple[Array, Array | None]:
    """``(y, mask)`` of inverted dropout; ``mask`` (for :func:`dropout_backward`) is
    None when dropout is the identity (eval, or p == 0), and y is then x itself."""
    x = _as_float_array(x, "dropout", "x")
    p = _probability("dropout", p)
    if not training or p == 0:
        return x, None
    mask = dropout_mask(x.shape, p, rng, _xp(x), x.dtype)
    if x.size == 0:
        return _xp(x).empty(x.shape, dtype=x.dtype), mask
    return _pick_backend("dropout", [x, mask]).dropout_masked(_contig(x), mask), mask


@_tensor_aware
def dropout(
    x: Array, p: float = 0.5, training: bool = True, rng: np.random.Generator | None = None
) -> Array:
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p)."""
    y, mask = dropout_forward(x, p, training, rng)
    return y.copy() if mask is None else y


@_tensor_aware
def dropout_backward(grad_out: Array, mask: Array | None) -> Array:
    """grad_out * mask, with ``mask`` from :func:`dropout_forward` (None: the identity)."""
    op = "dropout_backward"
    grad_out = _as_float_array(grad_out, op, "grad_out")
    if mask is None:
        return grad_out.copy()
    mask = _as_float_array(mask, op, "mask")
    _same_dtype(op, mask, "mask", grad_out, "grad_out")
    _check_grad_out(op, grad_out, mask.shape)
    if mask.size == 0:
        return _xp(mask).empty(mask.shape, dtype=mask.dtype)
    return _pick_backend(op, [grad_out, mask]).dropout_masked(_contig(grad_out), _contig(mask))
