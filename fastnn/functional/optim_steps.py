"""In-place optimizer updates (SGD, Adam/AdamW)."""

from __future__ import annotations

import math
import numbers
from typing import Any

from fastnn.backends._array_ops import check_step_arrays
from fastnn.functional._args import Array, _int, _pick_backend, _tensor_aware

# --------------------------------------------------------------------------
# optimizer steps (in place)
# --------------------------------------------------------------------------


def _check_state(op: str, param: Array, **arrays: Any) -> None:
    """Optimizer state is updated in place: same type, dtype, shape, contiguous, writeable."""
    check_step_arrays(op, None, param, [(name, a, name != "grad") for name, a in arrays.items()])


def _check_lists(op: str, params: Any, **lists: Any) -> int:
    """The multi-tensor ops' sequences: lists or tuples, each as long as ``params``
    (a None entry of ``lists`` stands for "not given"). Returns that length."""
    for name, seq in (("params", params), *lists.items()):
        if seq is not None and not isinstance(seq, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a list or tuple of arrays, "
                            f"got {type(seq).__name__}")
    n = len(params)
    for name, seq in lists.items():
        if seq is not None and len(seq) != n:
            raise ValueError(f"{op}: {name} has {len(seq)} entries, params has {n}")
    return n


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


def sgd_step_multi(
    params: list[Array] | tuple[Array, ...],
    grads: list[Array] | tuple[Array, ...],
    momentum_bufs: list[Array | None] | tuple[Array | None, ...] | None,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> None:
    """:func:`sgd_step` on each ``(params[i], grads[i], momentum_bufs[i])``, with one
    set of options: what an optimizer does for a parameter group, at a fraction
    of the per-call cost (the options are checked here once; the backend checks
    every entry's arrays, as the single-tensor step does, before it updates any).
    ``momentum_bufs`` may be None when momentum == 0."""
    op = "sgd_step_multi"
    n = _check_lists(op, params, grads=grads, momentum_bufs=momentum_bufs)
    _finite(op, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if momentum != 0 and momentum_bufs is None:
        raise ValueError(f"{op}: momentum_bufs is required when momentum != 0")
    if n == 0:
        return
    _pick_backend(op, list(params)).sgd_step_multi(
        params, grads, momentum_bufs, float(lr), float(momentum), float(weight_decay),
        bool(nesterov))


def adam_step_multi(
    params: list[Array] | tuple[Array, ...],
    grads: list[Array] | tuple[Array, ...],
    exp_avgs: list[Array] | tuple[Array, ...],
    exp_avg_sqs: list[Array] | tuple[Array, ...],
    steps: list[int] | tuple[int, ...],
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> None:
    """:func:`adam_step` on each ``(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i])``
    at its own 1-based ``steps[i]``, with one set of options: what an optimizer
    does for a parameter group, at a fraction of the per-call cost (the options
    are checked here once; the backend checks every entry's arrays, as the
    single-tensor step does, before it updates any)."""
    op = "adam_step_multi"
    n = _check_lists(op, params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                     steps=steps)
    _finite(op, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    counts = [_int(steps[i], op, f"steps[{i}]") for i in range(n)]
    for i, step in enumerate(counts):
        if step < 1:
            raise ValueError(f"{op}: steps[{i}] must be >= 1, got {step}")
    if n == 0:
        return
    _pick_backend(op, list(params)).adam_step_multi(
        params, grads, exp_avgs, exp_avg_sqs, counts, float(lr), float(beta1), float(beta2),
        float(eps), float(weight_decay), bool(decoupled))
