"""matmul, linear and the fused linear + ReLU, with their backward."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from fastnn.functional._args import (
    Array,
    _as_float_array,
    _check_bias,
    _check_grad_out,
    _contig,
    _pick_backend,
    _same_dtype,
    _tensor_aware,
    _xp,
)
from fastnn.functional.activations import relu, relu_backward

# --------------------------------------------------------------------------
# matmul and linear
# --------------------------------------------------------------------------


def _matmul_operands(op: str, a: Any, b: Any, extra: tuple = ()) -> tuple[Array, Array, ModuleType]:
    a = _as_float_array(a, op, "a")
    b = _as_float_array(b, op, "b")
    _same_dtype(op, a, "a", b, "b")
    for name, m in (("a", a), ("b", b)):
        if m.ndim not in (2, 3):
            raise ValueError(f"{op}: {name} must be 2-D or 3-D (batched), got shape {m.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"{op}: inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}"
        )
    if a.ndim == 3 and b.ndim == 3 and a.shape[0] != b.shape[0]:
        if 1 not in (a.shape[0], b.shape[0]):
            raise ValueError(
                f"{op}: batch sizes differ: a has {a.shape[0]}, b has {b.shape[0]}"
            )
    return a, b, _pick_backend(op, [a, b, *extra])


def _mm(backend: ModuleType, a: Array, b: Array, ta: bool = False, tb: bool = False) -> Array:
    """op(a) @ op(b) for 2-D/3-D contiguous operands, broadcasting a batch of 1."""
    xp = _xp(a)
    m = a.shape[-1] if ta else a.shape[-2]
    k = a.shape[-2] if ta else a.shape[-1]
    n = b.shape[-2] if tb else b.shape[-1]
    batch = max(a.shape[0] if a.ndim == 3 else 1, b.shape[0] if b.ndim == 3 else 1)
    out_shape = (batch, m, n) if 3 in (a.ndim, b.ndim) else (m, n)
    if 0 in (m, n, batch):
        return xp.zeros(out_shape, dtype=a.dtype)
    if k == 0:
        return xp.zeros(out_shape, dtype=a.dtype)
    if a.ndim == 3 and b.ndim == 2 and not ta:
        # (B,M,K) @ (K,N) is one (B*M,K) @ (K,N) product: no batching needed.
        return backend.matmul(_contig(a).reshape(-1, a.shape[-1]), _contig(b), False, tb).reshape(
            out_shape
        )
    if a.ndim != b.ndim or (a.ndim == 3 and a.shape[0] != b.shape[0]):
        a3 = a if a.ndim == 3 else a[None]
        b3 = b if b.ndim == 3 else b[None]
        a = xp.broadcast_to(a3, (batch, *a3.shape[1:]))
        b = xp.broadcast_to(b3, (batch, *b3.shape[1:]))
    return backend.matmul(_contig(a), _contig(b), ta, tb)


@_tensor_aware
def matmul(a: Array, b: Array) -> Array:
    """``a @ b`` for 2-D (M,K)@(K,N) or batched 3-D (B,M,K)@(B,K,N) operands.

    A 2-D operand, or a batch of 1, broadcasts against a 3-D one.
    """
    a, b, backend = _matmul_operands("matmul", a, b)
    return _mm(backend, a, b)


def _reduce_batch(g: Array, like: Array) -> Array:
    """Sum a broadcast batch dimension back to ``like``'s shape."""
    if g.shape == like.shape:
        return g
    if like.ndim == 2:
        return _contig(g.reshape(-1, *like.shape).sum(axis=0))
    return _contig(g.sum(axis=0, keepdims=True))


@_tensor_aware
def matmul_backward(grad_out: Array, a: Array, b: Array) -> tuple[Array, Array]:
    """Gradients of :func:`matmul`: ``(grad_out @ b^T, a^T @ grad_out)``."""
    op = "matmul_backward"
    grad_out = _as_float_array(grad_out, op, "grad_out")
    a, b, backend = _matmul_operands(op, a, b, extra=(grad_out,))
    _same_dtype(op, a, "a", grad_out, "grad_out")
    batch = max(a.shape[0] if a.ndim == 3 else 1, b.shape[0] if b.ndim == 3 else 1)
    m, n = a.shape[-2], b.shape[-1]
    expected = (batch, m, n) if 3 in (a.ndim, b.ndim) else (m, n)
    _check_grad_out(op, grad_out, expected)
    gy = _contig(grad_out)
    ga = _reduce_batch(_mm(backend, gy, _contig(b), False, True), a)
    if a.ndim == 3 and b.ndim == 2:
        gb = _mm(backend, _contig(a).reshape(-1, a.shape[-1]), gy.reshape(-1, n), True, False)
    else:
        gb = _reduce_batch(_mm(backend, _contig(a), gy, True, False), b)
    return ga, gb


def _linear_operands(op: str, x: Any, weight: Any, extra: tuple = ()):
    x = _as_float_array(x, op, "x")
    weight = _as_float_array(weight, op, "weight")
    _same_dtype(op, x, "x", weight, "weight")
    if weight.ndim != 2:
        raise ValueError(
            f"{op}: weight must be 2-D (out_features, in_features), got shape {weight.shape}"
        )
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: x's last dimension must equal in_features={weight.shape[1]}, "
            f"got x of shape {tuple(x.shape)}"
        )
    return x, weight, _pick_backend(op, [x, weight, *extra])


@_tensor_aware
def linear(x: Array, weight: Array, bias: Array | None = None) -> Array:
    """``x @ weight.T + bias``: x (..., in), weight (out, in), bias (out,) -> (..., out)."""
    x, weight, backend = _linear_operands("linear", x, weight)
    b = _check_bias("linear", bias, weight.shape[0], x)
    x2 = _contig(x).reshape(-1, x.shape[-1])
    y = _mm(backend, x2, _contig(weight), False, True)
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], weight.shape[0])


@_tensor_aware
def linear_backward(
    grad_out: Array,
    x: Array,
    weight: Array,
    *,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients of :func:`linear`: ``(grad_x, grad_weight, grad_bias)``."""
    op = "linear_backward"
    grad_out = _as_float_array(grad_out, op, "grad_out")
    x, weight, backend = _linear_operands(op, x, weight, extra=(grad_out,))
    _same_dtype(op, x, "x", grad_out, "grad_out")
    _check_grad_out(op, grad_out, (*x.shape[:-1], weight.shape[0]))
    gy = _contig(grad_out).reshape(-1, weight.shape[0])
    x2 = _contig(x).reshape(-1, x.shape[-1])
    need_x, need_w, need_b = output_mask
    gx = _mm(backend, gy, _contig(weight)).reshape(x.shape) if need_x else None
    gw = _mm(backend, gy, x2, True, False) if need_w else None
    gb = gy.sum(axis=0, dtype=gy.dtype) if need_b else None
    return gx, gw, gb


# --------------------------------------------------------------------------
# fused linear + ReLU
# --------------------------------------------------------------------------


def _rows(a: Array) -> Array:
    """(..., n) -> (rows, n), C-contiguous (also when n or a batch dimension is 0)."""
    rows = 1
    for d in a.shape[:-1]:
        rows *= d
    return _contig(a).reshape(rows, a.shape[-1])


@_tensor_aware
def linear_relu(x: Array, weight: Array, bias: Array | None = None) -> Array:
    """``relu(x @ weight.T + bias)`` in one op: x (..., in), weight (out, in) -> (..., out).

    Equal to ``relu(linear(x, weight, bias))`` within float rounding (on the cpu
    backend bit for bit: the bias add and the ReLU run in the gemm's epilogue,
    so the pre-activation is never written out and re-read).
    """
    op = "linear_relu"
    x, weight, backend = _linear_operands(op, x, weight)
    b = _check_bias(op, bias, weight.shape[0], x)
    x2 = _rows(x)
    if 0 in (*x2.shape, weight.shape[0]):
        # Degenerate shapes: _mm gives the zeros a backend need not handle.
        y = _mm(backend, x2, _contig(weight), False, True)
        if b is not None:
            y += b
        y = relu(y)
    else:
        y = backend.linear_relu(x2, _contig(weight), b)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@_tensor_aware
def linear_relu_backward(
    grad_out: Array,
    x: Array,
    weight: Array,
    y: Array,
    *,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients ``(grad_x, grad_weight, grad_bias)`` of :func:`linear_relu`.

    ``y`` is the forward's output (the ReLU mask is ``y > 0``); an entry is None
    where ``output_mask`` is False. The mask is applied in the same pass that
    sums grad_bias, and the two gradient products read the masked gradient.
    """
    op = "linear_relu_backward"
    grad_out = _as_float_array(grad_out, op, "grad_out")
    y = _as_float_array(y, op, "y")
    x, weight, backend = _linear_operands(op, x, weight, extra=(grad_out, y))
    _same_dtype(op, x, "x", grad_out, "grad_out")
    _same_dtype(op, x, "x", y, "y")
    out_shape = (*x.shape[:-1], weight.shape[0])
    _check_grad_out(op, grad_out, out_shape)
    if tuple(y.shape) != out_shape:
        raise ValueError(f"{op}: y must have shape {out_shape}, got {tuple(y.shape)}")
    need_x, need_w, need_b = (bool(m) for m in output_mask)
    gy = _rows(grad_out)
    x2 = _rows(x)
    if 0 in (*x2.shape, weight.shape[0]):
        # Degenerate shapes: the separate ops, through _mm's zeros.
        g = relu_backward(gy, _rows(y))
        gx = _mm(backend, g, _contig(weight)) if need_x else None
        gw = _mm(backend, g, x2, True, False) if need_w else None
        gb = g.sum(axis=0, dtype=g.dtype) if need_b else None
    else:
        gx, gw, gb = backend.linear_relu_backward(
            gy, x2, _contig(weight), _rows(y), need_x, need_w, need_b
        )
    if gx is not None:
        gx = gx.reshape(x.shape)
    return gx, gw, gb
