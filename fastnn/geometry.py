"""Sliding-window geometry: the one home of output sizes, padding resolution and
the accept/reject rules of conv2d, max_pool2d and avg_pool2d.

Pure Python (ints only). ``fastnn.functional`` calls :func:`conv_geometry` and
:func:`pool_geometry` before any backend runs; the backends and the benchmark
use :func:`conv_out_size`; the C++ bindings keep only memory-safety checks, so
every policy rule below lives here and nowhere else.

The accepted set is torch 2.13's (``tests/test_geometry.py`` sweeps it against
torch):

* geometry arguments are an int or a tuple/list of one or two ints (NumPy ints
  included; bools and floats are TypeErrors); a pooling ``stride`` of None or an
  empty tuple/list means ``kernel_size``;
* kernel_size, stride and dilation >= 1, padding >= 0 (and all < 2**31, which
  keeps every backend's index arithmetic far from int64 overflow);
* conv2d: the dilated kernel must fit the padded input; the input's height and
  width must be non-zero (N and C may be 0); ``padding="same"`` needs stride 1
  and pads ``d*(k-1)`` in total, the odd cell at the bottom/right;
* pooling: padding <= kernel_size // 2 (of the kernel, not of the dilated
  kernel); the output size must be >= 1 per axis; with ``ceil_mode`` the last
  window must start inside the input or its left padding, and windows are
  clipped to the input (so a 1x1 input with kernel 2 and ceil_mode gives 1x1).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

Pair = tuple[int, int]

#: Exclusive upper bound on every kernel size, stride, padding and dilation.
MAX_GEOMETRY = 2**31


# --------------------------------------------------------------------------
# Argument normalisation
# --------------------------------------------------------------------------


def as_int(v: Any, op: str, name: str) -> int:
    """``v`` as a Python int; bools, floats and non-integers are TypeErrors naming ``name``."""
    if type(v) is int:  # the common case, without the slow ABC check below
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__} {v!r}")
    return int(v)


def as_pair(v: Any, op: str, name: str, minimum: int) -> Pair:
    """An int or a tuple/list of one or two ints, as a pair of ints >= ``minimum``."""
    if type(v) is int and minimum <= v < MAX_GEOMETRY:  # the common case, fast
        return (v, v)
    if isinstance(v, (tuple, list)):
        if len(v) not in (1, 2):
            raise ValueError(
                f"{op}: {name} must be an int or a pair (or a one-element tuple), got {v!r}"
            )
        out = (as_int(v[0], op, name), as_int(v[-1], op, name))
    else:
        i = as_int(v, op, name)
        out = (i, i)
    if min(out) < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{op}: {name} must be {kind}, got {v!r}")
    if max(out) >= MAX_GEOMETRY:
        raise ValueError(f"{op}: {name} must be < 2**31, got {v!r}")
    return out


# --------------------------------------------------------------------------
# Output sizes and padding
# --------------------------------------------------------------------------


def conv_out_size(size: int, k: int, s: int, p: int, d: int = 1) -> int:
    """Floor-mode number of windows along one axis (conv2d, and pooling without ceil_mode).

    May be <= 0 when the dilated kernel does not fit the padded input.
    """
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def pool_out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Number of pooling windows along one axis, torch's rule (may be <= 0)."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    # The last (ceil_mode) window must start inside the input or the left padding.
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def same_padding(kernel_hw: Pair, dilation: Pair) -> tuple[Pair, Pair]:
    """``padding="same"`` (stride 1) as symmetric padding plus the extra bottom/right cell.

    The total padding per axis is ``d*(k-1)``; when it is odd (even kernels with
    odd dilation) the extra cell goes after the input, as in torch.
    """
    total = (dilation[0] * (kernel_hw[0] - 1), dilation[1] * (kernel_hw[1] - 1))
    pad = (total[0] // 2, total[1] // 2)
    return pad, (total[0] - 2 * pad[0], total[1] - 2 * pad[1])


# --------------------------------------------------------------------------
# Validated geometries
# --------------------------------------------------------------------------


class ConvGeometry(NamedTuple):
    """conv2d geometry. ``extra`` is the asymmetric "same" padding at the bottom/right,
    which the caller applies by padding the input; ``out_hw`` counts it."""

    stride: Pair
    padding: Pair
    dilation: Pair
    extra: Pair
    out_hw: Pair


class PoolGeometry(NamedTuple):
    """Pooling geometry; ``out_hw`` already applies ceil_mode."""

    kernel: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    out_hw: Pair


def _exact(v: Any) -> bool:
    """Whether ``v`` is None, a str, an exact int or a pair of exact ints: a geometry
    argument whose validation can be cached. (Equal-hashing look-alikes, such as
    True for 1, take the uncached path and its type checks.)"""
    t = type(v)
    return t is int or t is str or v is None or (
        t is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int)


def conv_geometry(
    op: str, input_hw: Pair, kernel_hw: Pair, stride: Any, padding: Any, dilation: Any,
) -> ConvGeometry:
    """Validate conv2d's stride, padding ("same", "valid", int or pair) and dilation
    for an (H, W) input and a (KH, KW) kernel; raise ValueError/TypeError naming them.

    The result of a valid call is cached (a training loop repeats the same few
    geometries), so a repeated call costs one dictionary lookup."""
    if (type(input_hw) is tuple and type(kernel_hw) is tuple and _exact(stride)
            and _exact(padding) and _exact(dilation)):
        return _conv_geometry_cached(op, input_hw, kernel_hw, stride, padding, dilation)
    return _conv_geometry(op, input_hw, kernel_hw, stride, padding, dilation)


def _conv_geometry(
    op: str, input_hw: Pair, kernel_hw: Pair, stride: Any, padding: Any, dilation: Any,
) -> ConvGeometry:
    stride = as_pair(stride, op, "stride", 1)
    dilation = as_pair(dilation, op, "dilation", 1)
    kh, kw = kernel_hw
    if kh < 1 or kw < 1:
        raise ValueError(f"{op}: weight must have a non-empty kernel, got {kh}x{kw}")
    extra = (0, 0)
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{op}: padding='same' requires stride=1, got {stride}")
            pad, extra = same_padding(kernel_hw, dilation)
        else:
            raise ValueError(
                f"{op}: padding must be 'same', 'valid', an int or a pair, got {padding!r}"
            )
    else:
        pad = as_pair(padding, op, "padding", 0)
    h, w = input_hw
    eff = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    hp, wp = h + 2 * pad[0] + extra[0], w + 2 * pad[1] + extra[1]
    if eff[0] > hp or eff[1] > wp:
        raise ValueError(
            f"{op}: kernel size {eff[0]}x{eff[1]} (after dilation) is larger than the "
            f"padded input {hp}x{wp}"
        )
    if h < 1 or w < 1:
        raise ValueError(f"{op}: x must have a non-empty height and width, got {h}x{w}")
    out_hw = (
        conv_out_size(h + extra[0], kh, stride[0], pad[0], dilation[0]),
        conv_out_size(w + extra[1], kw, stride[1], pad[1], dilation[1]),
    )
    return ConvGeometry(stride, pad, dilation, extra, out_hw)


# Errors are raised afresh on every call (lru_cache keeps only results).
_conv_geometry_cached = functools.lru_cache(maxsize=1024)(_conv_geometry)


def pool_stride(stride: Any, kernel: Pair, op: str, name: str = "stride") -> Pair:
    """A pooling stride; None or an empty tuple/list means the kernel size (torch's default)."""
    if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0):
        return kernel
    return as_pair(stride, op, name, 1)


def pool_geometry(
    op: str, input_hw: Pair, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
    ceil_mode: bool, *, prefix: str = "", what: str = "input",
) -> PoolGeometry:
    """Validate max_pool2d / avg_pool2d arguments for an (H, W) input (avg: dilation 1).

    ``prefix`` names the arguments (``pool_`` in the fused op), ``what`` the
    pooled array in messages. ``ceil_mode`` must already be a bool. Valid results
    are cached, as :func:`conv_geometry`'s.
    """
    if (type(ceil_mode) is bool and type(input_hw) is tuple and _exact(kernel_size)
            and _exact(stride) and _exact(padding) and _exact(dilation)):
        return _pool_geometry_cached(op, input_hw, kernel_size, stride, padding, dilation,
                                     ceil_mode, prefix, what)
    return _pool_geometry(op, input_hw, kernel_size, stride, padding, dilation, ceil_mode,
                          prefix, what)


def _pool_geometry(
    op: str, input_hw: Pair, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
    ceil_mode: bool, prefix: str, what: str,
) -> PoolGeometry:
    k = as_pair(kernel_size, op, f"{prefix}kernel_size", 1)
    s = pool_stride(stride, k, op, f"{prefix}stride")
    p = as_pair(padding, op, f"{prefix}padding", 0)
    d = as_pair(dilation, op, f"{prefix}dilation", 1)
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(
            f"{op}: {prefix}padding {p} must be at most half of {prefix}kernel_size {k}"
        )
    h, w = input_hw
    if h < 1 or w < 1:
        raise ValueError(f"{op}: the {what} must have a non-empty height and width, got {h}x{w}")
    oh = pool_out_size(h, k[0], s[0], p[0], d[0], ceil_mode)
    ow = pool_out_size(w, k[1], s[1], p[1], d[1], ceil_mode)
    if oh < 1 or ow < 1:
        eff = (d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1)
        raise ValueError(
            f"{op}: {prefix}kernel_size {eff[0]}x{eff[1]} (after dilation) is larger than the "
            f"padded {what} {h + 2 * p[0]}x{w + 2 * p[1]}"
            + (" even with ceil_mode" if ceil_mode else "")
        )
    return PoolGeometry(k, s, p, d, (oh, ow))


_pool_geometry_cached = functools.lru_cache(maxsize=1024)(_pool_geometry)
