"""Fused conv2d + ReLU + max_pool2d, with its backward."""

from __future__ import annotations

from typing import Any

from fastnn._array import array_module, is_array
from fastnn.backends import _composed
from fastnn.functional._args import (
    Array,
    Pair,
    _as_float_array,
    _check_bias,
    _check_grad_out,
    _contig,
    _flag,
    _same_dtype,
    _tensor_aware,
    _xp,
)
from fastnn.functional.activations import relu, relu_backward
from fastnn.functional.conv import _ConvArgs, conv2d, conv2d_backward
from fastnn.functional.pool import max_pool2d, max_pool2d_backward
from fastnn.geometry import as_pair, pool_geometry

# --------------------------------------------------------------------------
# fused conv2d + ReLU + max_pool2d
# --------------------------------------------------------------------------


def _fused_pool_geometry(
    op: str, conv_out_shape: tuple[int, ...], kernel_size: Any, stride: Any, padding: Any,
    dilation: Any, ceil_mode: Any, what: str = "conv output",
) -> tuple[Pair, Pair, Pair, Pair, tuple[int, int, int, int]]:
    """max_pool2d's checks for a pool over the fused op's inner output of shape
    ``conv_out_shape`` (argument names prefixed ``pool_``; ``what`` names it)."""
    ceil_mode = _flag(ceil_mode, op, "pool_ceil_mode")
    g = pool_geometry(op, conv_out_shape[2:], kernel_size, stride, padding, dilation,
                      ceil_mode, prefix="pool_", what=what)
    return g.kernel, g.stride, g.padding, g.dilation, (*conv_out_shape[:2], *g.out_hw)


def argmax_fits(pool_kernel_size: Any) -> bool:
    """Whether a fused op's pool window has room for one-byte argmax codes (at most
    255 taps; code 255 means "no gradient"), so that ``return_argmax`` is allowed.
    A malformed ``pool_kernel_size`` gives True: the op's own checks report it."""
    try:
        kh, kw = as_pair(pool_kernel_size, "max_pool2d", "kernel_size", 1)
    except (TypeError, ValueError):
        return True
    return kh * kw <= _composed.NO_GRAD


def _check_argmax_fits(op: str, k: Pair) -> None:
    if not argmax_fits(k):
        raise ValueError(f"{op}: return_argmax needs a pool window of at most "
                         f"{_composed.NO_GRAD} taps, got pool_kernel_size {k}")


def _argmax_codes(
    op: str, argmax: Any, x: Array, unbatched: bool, out_shape: tuple[int, ...],
) -> Array:
    """The forward's codes, on x's device, batched like x (``unbatched``: the caller
    added x's batch axis), C-contiguous uint8."""
    xp = _xp(x)
    if not is_array(argmax) or array_module(argmax) is not xp:
        raise TypeError(f"{op}: argmax must be the {xp.__name__} array that the forward returned "
                        f"(return_argmax=True), got {type(argmax).__name__}")
    if argmax.dtype != xp.uint8:
        raise TypeError(f"{op}: argmax must be uint8 (the forward's codes), got {argmax.dtype}")
    codes = argmax[None] if unbatched and argmax.ndim == 3 else argmax
    if tuple(codes.shape) != tuple(out_shape):
        raise ValueError(f"{op}: argmax must have the output's shape {tuple(out_shape)}, "
                         f"got {tuple(argmax.shape)}")
    return _contig(codes)


@_tensor_aware
def conv2d_relu_max_pool2d(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    stride: Pair = 1,
    padding: Pair | str = 0,
    dilation: Pair = 1,
    groups: int = 1,
    pool_kernel_size: Pair = 2,
    pool_stride: Pair | None = None,
    pool_padding: Pair = 0,
    pool_dilation: Pair = 1,
    pool_ceil_mode: bool = False,
    return_argmax: bool = False,
) -> Array | tuple[Array, Array]:
    """``max_pool2d(relu(conv2d(x, weight, bias, ...)), pool_kernel_size, ...)`` in one op.

    x (N, C, H, W) or (C, H, W); weight (O, C/groups, KH, KW); bias (O,) or None.
    Returns (N, O, POH, POW), bit-identical to the three separate ops. On the cpu
    backend the (N, O, OH, OW) conv output is never materialised; the other
    backends compose the separate ops.

    ``return_argmax``: return ``(y, argmax)``, where argmax (uint8, y's shape)
    names each pooled output's winning window tap ``kh * KW + kw`` (its first
    maximum), or 255 where no gradient passes (the maximum is <= 0, or NaN).
    Passed to :func:`conv2d_relu_max_pool2d_backward`, it spares the backward
    the conv recompute; it is 1/4 the size of a float32 output.
    """
    op = "conv2d_relu_max_pool2d"
    return_argmax = _flag(return_argmax, op, "return_argmax")
    a = _ConvArgs(op, x, weight, stride, padding, dilation, groups)
    b = _check_bias(op, bias, a.out_shape[1], a.x)
    k, s, p, d, out_shape = _fused_pool_geometry(
        op, a.out_shape, pool_kernel_size, pool_stride, pool_padding, pool_dilation,
        pool_ceil_mode,
    )
    if return_argmax:
        _check_argmax_fits(op, k)
    if 0 in out_shape or a.x.shape[1] == 0:
        # Degenerate shapes: the separate ops already handle them.
        conv = conv2d(a.x, a.weight, b, a.stride, a.padding, a.dilation, a.groups)
        if not return_argmax:
            return a.unbatch(max_pool2d(relu(conv), k, s, p, d, bool(pool_ceil_mode)))
        y, ind = max_pool2d(relu(conv), k, s, p, d, bool(pool_ceil_mode), return_indices=True)
        codes = _composed.window_codes(y, ind, conv.shape[3], s, p, d, k[1])
        return a.unbatch(y), a.unbatch(codes)
    y = a.backend.conv2d_relu_max_pool2d(
        a.x, a.weight, b, a.stride, a.padding, a.dilation, a.groups, k, s, p, d, out_shape[2:],
        return_argmax,
    )
    if return_argmax:
        return a.unbatch(y[0]), a.unbatch(y[1])
    return a.unbatch(y)


@_tensor_aware
def conv2d_relu_max_pool2d_backward(
    grad_out: Array,
    x: Array,
    weight: Array,
    bias: Array | None = None,
    stride: Pair = 1,
    padding: Pair | str = 0,
    dilation: Pair = 1,
    groups: int = 1,
    pool_kernel_size: Pair = 2,
    pool_stride: Pair | None = None,
    pool_padding: Pair = 0,
    pool_dilation: Pair = 1,
    pool_ceil_mode: bool = False,
    *,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
    argmax: Array | None = None,
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients ``(grad_x, grad_weight, grad_bias)`` of :func:`conv2d_relu_max_pool2d`.

    grad_out has the fused output's shape (N, O, POH, POW). ``argmax``: the
    forward's (``return_argmax=True``); the cpu backend then routes the
    gradient by it. Without it the forward is recomputed (``bias`` is needed
    for that), so nothing but the inputs has to be kept between forward and
    backward. An entry is None where ``output_mask`` is False. Same values as
    backpropagating through the three separate ops, up to the summation order
    of grad_weight/grad_bias.
    """
    op = "conv2d_relu_max_pool2d_backward"
    grad_out = _as_float_array(grad_out, op, "grad_out")
    a = _ConvArgs(op, x, weight, stride, padding, dilation, groups, extra_arrays=[grad_out])
    _same_dtype(op, a.x, "x", grad_out, "grad_out")
    b = _check_bias(op, bias, a.out_shape[1], a.x)
    k, s, p, d, out_shape = _fused_pool_geometry(
        op, a.out_shape, pool_kernel_size, pool_stride, pool_padding, pool_dilation,
        pool_ceil_mode,
    )
    gy = grad_out[None] if a.unbatched and grad_out.ndim == 3 else grad_out
    _check_grad_out(op, gy, out_shape)
    gy = _contig(gy)
    if argmax is not None:
        argmax = _argmax_codes(op, argmax, a.x, a.unbatched, out_shape)
    need_x, need_w, need_b = (bool(m) for m in output_mask)
    if gy.size == 0 or a.x.size == 0 or a.weight.size == 0:
        # Degenerate shapes: backpropagate through the separate ops.
        r = relu(conv2d(a.x, a.weight, b, a.stride, a.padding, a.dilation, a.groups))
        g = relu_backward(max_pool2d_backward(gy, r, k, s, p, d, bool(pool_ceil_mode)), r)
        gx, gw, gb = conv2d_backward(g, a.x, a.weight, a.stride, a.padding, a.dilation,
                                     a.groups, output_mask=(need_x, need_w, need_b))
    else:
        gx, gw, gb = a.backend.conv2d_relu_max_pool2d_backward(
            gy, a.x, a.weight, b, a.stride, a.padding, a.dilation, a.groups, k, s, p, d,
            need_x, need_w, need_b, argmax,
        )
    if gx is not None:
        if a.extra != (0, 0):
            hp, wp = a.x.shape[2:]
            gx = _xp(a.x).ascontiguousarray(gx[:, :, : hp - a.extra[0], : wp - a.extra[1]])
        gx = a.unbatch(gx)
    return gx, gw, gb
