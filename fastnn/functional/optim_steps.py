"""In-place optimizer updates (SGD, Adam/AdamW)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from fastnn.functional._args import (
    _FLOAT_DTYPES,
    Array,
    _int,
    _is_cupy,
    _pick_backend,
    _tensor_aware,
)

# --------------------------------------------------------------------------
# optimizer steps (in place)
# --------------------------------------------------------------------------


def _check_state(op: str, param: Array, **arrays: Any) -> None:
    """Optimizer state is updated in place: same type, dtype, shape, contiguous, writeable."""
    if not (_is_cupy(param) or isinstance(param, np.ndarray)) or param.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: param must be a float32/float64 NumPy or CuPy array")
    flags = param.flags
    if not flags.c_contiguous:
        raise ValueError(f"{op}: param must be C-contiguous (it is updated in place)")
    if not getattr(flags, "writeable", True):
        raise ValueError(f"{op}: param is read-only but is updated in place")
    kind, dtype, shape = type(param), param.dtype, param.shape
    for name, a in arrays.items():
        if a is None:
            continue
        if type(a) is not kind or a.dtype != dtype or a.shape != shape:
            raise ValueError(
                f"{op}: {name} must be a {dtype} array of shape {tuple(shape)} "
                f"like param, got {getattr(a, 'dtype', type(a).__name__)} "
                f"{tuple(getattr(a, 'shape', ()))}"
            )
        flags = a.flags
        if not flags.c_contiguous:
            raise ValueError(f"{op}: {name} must be C-contiguous")
        if name != "grad" and not getattr(flags, "writeable", True):
            raise ValueError(f"{op}: {name} is read-only but is updated in place")


def _finite(op: str, **values: float) -> None:
    for name, v in values.items():
        # Plain floats first: the ABC check costs ~1 us, and an optimizer makes
        # this call for every parameter of every step.
        if type(v) is not float and not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{op}: {name} must be a finite number, got {v!r}")


@_tensor_aware
def sgd_step(
    param: Array,
    grad: Array,
    momentum_buf: Array | None,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> None:
    """One in-place SGD update with torch.optim.SGD semantics (dampening 0)."""
    op = "sgd_step"
    _check_state(op, param, grad=grad, momentum_buf=momentum_buf)
    _finite(op, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if momentum != 0 and momentum_buf is None:
        raise ValueError(f"{op}: momentum_buf is required when momentum != 0")
    if param.size == 0:
        return
    _pick_backend(op, [param]).sgd_step(
        param, grad, momentum_buf, float(lr), float(momentum), float(weight_decay), bool(nesterov)
    )


@_tensor_aware
def adam_step(
    param: Array,
    grad: Array,
    exp_avg: Array,
    exp_avg_sq: Array,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> None:
    """One in-place Adam (``decoupled=False``) or AdamW update; ``step`` counts from 1."""
    op = "adam_step"
    _check_state(op, param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    _finite(op, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    step = _int(step, op, "step")
    if step < 1:
        raise ValueError(f"{op}: step must be >= 1, got {step}")
    if param.size == 0:
        return
    _pick_backend(op, [param]).adam_step(
        param, grad, exp_avg, exp_avg_sq, step, float(lr), float(beta1), float(beta2),
        float(eps), float(weight_decay), bool(decoupled),
    )
