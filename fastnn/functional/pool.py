"""max_pool2d and avg_pool2d, with their backward."""

from __future__ import annotations

from typing import Any

import numpy as np

from fastnn.functional._args import (
    Array,
    Pair,
    _as_float_array,
    _batched,
    _check_alloc,
    _check_grad_out,
    _contig,
    _flag,
    _int,
    _pick_backend,
    _same_dtype,
    _tensor_aware,
    _xp,
)
from fastnn.geometry import pool_geometry

# --------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------


def _check_channels(op: str, x: Array) -> None:
    """torch's rule for pooling: only the batch may be empty."""
    if x.shape[1] == 0:
        raise ValueError(f"{op}: x must have at least one channel, got shape {x.shape}")


class _PoolArgs:
    __slots__ = ("x", "unbatched", "kernel", "stride", "padding", "dilation", "out_shape",
                 "backend")

    def __init__(self, op, x, kernel_size, stride, padding, dilation, ceil_mode, extra=()):
        x = _as_float_array(x, op, "x")
        x, self.unbatched = _batched(x, op)
        ceil_mode = _flag(ceil_mode, op, "ceil_mode")
        n, c, h, w = x.shape
        _check_channels(op, x)
        g = pool_geometry(op, (h, w), kernel_size, stride, padding, dilation, ceil_mode)
        self.x = _contig(x)
        self.kernel, self.stride, self.padding, self.dilation = g[:4]
        self.out_shape = (n, c, *g.out_hw)
        _check_alloc(op, self.out_shape, x.dtype)
        self.backend = _pick_backend(op, [x, *extra])

    def unbatch(self, a: Array) -> Array:
        return a[0] if self.unbatched else a

    def grad_out(self, op: str, grad_out: Array) -> Array:
        _same_dtype(op, self.x, "x", grad_out, "grad_out")
        gy = grad_out[None] if self.unbatched and grad_out.ndim == 3 else grad_out
        _check_grad_out(op, gy, self.out_shape)
        return _contig(gy)


@_tensor_aware
def max_pool2d(
    x: Array,
    kernel_size: Pair,
    stride: Pair | None = None,
    padding: Pair = 0,
    dilation: Pair = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Array | tuple[Array, Array]:
    """Max pooling, as ``torch.nn.functional.max_pool2d``: (N,C,H,W) -> (N,C,OH,OW).

    ``kernel_size``, ``stride``, ``padding`` and ``dilation`` are an int or a
    tuple of one or two ints; ``stride`` None (or empty) means ``kernel_size``.
    Padded cells never win; NaN propagates. With ``return_indices`` returns
    ``(y, indices)``: int64 flat indices into each H*W input plane of each
    window's first maximum (of its last NaN, if any), equal to torch's.
    """
    a = _PoolArgs("max_pool2d", x, kernel_size, stride, padding, dilation, ceil_mode)
    if return_indices:
        xp = _xp(a.x)
        if 0 in a.out_shape:
            y, idx = xp.empty(a.out_shape, a.x.dtype), xp.empty(a.out_shape, np.int64)
        else:
            y, idx = a.backend.max_pool2d_with_indices(
                a.x, a.kernel, a.stride, a.padding, a.dilation, a.out_shape[2:]
            )
        return a.unbatch(y), a.unbatch(idx)
    if 0 in a.out_shape:
        return a.unbatch(_xp(a.x).empty(a.out_shape, dtype=a.x.dtype))
    y = a.backend.max_pool2d(a.x, a.kernel, a.stride, a.padding, a.dilation, a.out_shape[2:])
    return a.unbatch(y)


@_tensor_aware
def max_pool2d_backward(
    grad_out: Array,
    x: Array,
    kernel_size: Pair,
    stride: Pair | None = None,
    padding: Pair = 0,
    dilation: Pair = 1,
    ceil_mode: bool = False,
) -> Array:
    """Gradient of :func:`max_pool2d` w.r.t. x; ties go to the first maximum."""
    op = "max_pool2d_backward"
    grad_out = _as_float_array(grad_out, op, "grad_out")
    a = _PoolArgs(op, x, kernel_size, stride, padding, dilation, ceil_mode, extra=[grad_out])
    gy = a.grad_out(op, grad_out)
    if gy.size == 0 or a.x.size == 0:
        return a.unbatch(_xp(a.x).zeros(a.x.shape, dtype=a.x.dtype))
    gx = a.backend.max_pool2d_backward(gy, a.x, a.kernel, a.stride, a.padding, a.dilation)
    return a.unbatch(gx)


def _divisor(op: str, divisor_override: Any) -> int | None:
    if divisor_override is None:
        return None
    d = _int(divisor_override, op, "divisor_override")
    if d == 0:
        raise ValueError(f"{op}: divisor_override must be non-zero")
    return d


@_tensor_aware
def avg_pool2d(
    x: Array,
    kernel_size: Pair,
    stride: Pair | None = None,
    padding: Pair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> Array:
    """Average pooling, as ``torch.nn.functional.avg_pool2d``: (N,C,H,W) -> (N,C,OH,OW).

    By default padded cells count in the divisor (``count_include_pad=True``).
    """
    op = "avg_pool2d"
    a = _PoolArgs(op, x, kernel_size, stride, padding, 1, ceil_mode)
    cip = _flag(count_include_pad, op, "count_include_pad")
    div = _divisor(op, divisor_override)
    if 0 in a.out_shape:
        return a.unbatch(_xp(a.x).empty(a.out_shape, dtype=a.x.dtype))
    y = a.backend.avg_pool2d(a.x, a.kernel, a.stride, a.padding, a.out_shape[2:], cip, div)
    return a.unbatch(y)


@_tensor_aware
def avg_pool2d_backward(
    grad_out: Array,
    x: Array,
    kernel_size: Pair,
    stride: Pair | None = None,
    padding: Pair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> Array:
    """Gradient of :func:`avg_pool2d` w.r.t. x."""
    op = "avg_pool2d_backward"
    grad_out = _as_float_array(grad_out, op, "grad_out")
    a = _PoolArgs(op, x, kernel_size, stride, padding, 1, ceil_mode, extra=[grad_out])
    cip = _flag(count_include_pad, op, "count_include_pad")
    div = _divisor(op, divisor_override)
    gy = a.grad_out(op, grad_out)
    if gy.size == 0 or a.x.size == 0:
        return a.unbatch(_xp(a.x).zeros(a.x.shape, dtype=a.x.dtype))
    gx = a.backend.avg_pool2d_backward(gy, a.x.shape[2:], a.kernel, a.stride, a.padding, cip, div)
    return a.unbatch(gx)
