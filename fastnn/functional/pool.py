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
    _int,
    _pair,
    _pick_backend,
    _same_dtype,
    _tensor_aware,
    _xp,
)

# --------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------


def _pool_out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    # torch: the last window must start inside the input or the left padding.
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool_geometry(
    op: str, shape: tuple[int, ...], kernel_size: Any, stride: Any, padding: Any,
    dilation: Any, ceil_mode: Any, prefix: str = "", what: str = "input",
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int],
           tuple[int, int, int, int]]:
    """Validate pooling arguments over an (N, C, H, W) ``shape``; torch's rules.

    Returns kernel, stride, padding, dilation and the output shape. ``prefix``
    names the arguments (``pool_`` in the fused op), ``what`` the pooled array.
    """
    k = _pair(kernel_size, op, f"{prefix}kernel_size", 1)
    s = k if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) \
        else _pair(stride, op, f"{prefix}stride", 1)
    p = _pair(padding, op, f"{prefix}padding", 0)
    d = _pair(dilation, op, f"{prefix}dilation", 1)
    if not isinstance(ceil_mode, (bool, np.bool_)):
        raise TypeError(
            f"{op}: {prefix}ceil_mode must be a bool, got {type(ceil_mode).__name__}"
        )
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(
            f"{op}: {prefix}padding {p} must be at most half of {prefix}kernel_size {k} "
            "(torch's rule)"
        )
    n, c, h, w = shape
    eff = (d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1)
    if eff[0] > h + 2 * p[0] or eff[1] > w + 2 * p[1]:
        raise ValueError(
            f"{op}: {prefix}kernel_size {eff[0]}x{eff[1]} (after dilation) is larger than the "
            f"padded {what} {h + 2 * p[0]}x{w + 2 * p[1]}"
        )
    oh = _pool_out_size(h, k[0], s[0], p[0], d[0], bool(ceil_mode))
    ow = _pool_out_size(w, k[1], s[1], p[1], d[1], bool(ceil_mode))
    return k, s, p, d, (n, c, oh, ow)


class _PoolArgs:
    __slots__ = ("x", "unbatched", "kernel", "stride", "padding", "dilation", "out_shape",
                 "backend")

    def __init__(self, op, x, kernel_size, stride, padding, dilation, ceil_mode, extra=()):
        x = _as_float_array(x, op, "x")
        x, self.unbatched = _batched(x, op)
        k, s, p, d, out_shape = _pool_geometry(
            op, x.shape, kernel_size, stride, padding, dilation, ceil_mode
        )
        self.x = _contig(x)
        self.kernel, self.stride, self.padding, self.dilation = k, s, p, d
        self.out_shape = out_shape
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
) -> Array:
    """Max pooling, as ``torch.nn.functional.max_pool2d``: (N,C,H,W) -> (N,C,OH,OW).

    ``stride`` defaults to ``kernel_size``. Padded cells never win; NaN propagates.
    """
    a = _PoolArgs("max_pool2d", x, kernel_size, stride, padding, dilation, ceil_mode)
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
    div = _divisor(op, divisor_override)
    if 0 in a.out_shape:
        return a.unbatch(_xp(a.x).empty(a.out_shape, dtype=a.x.dtype))
    y = a.backend.avg_pool2d(
        a.x, a.kernel, a.stride, a.padding, a.out_shape[2:], bool(count_include_pad), div
    )
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
    div = _divisor(op, divisor_override)
    gy = a.grad_out(op, grad_out)
    if gy.size == 0 or a.x.size == 0:
        return a.unbatch(_xp(a.x).zeros(a.x.shape, dtype=a.x.dtype))
    gx = a.backend.avg_pool2d_backward(
        gy, a.x.shape[2:], a.kernel, a.stride, a.padding, bool(count_include_pad), div
    )
    return a.unbatch(gx)
