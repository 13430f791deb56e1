"""max_pool2d and avg_pool2d, forward and backward, for the Numba-CUDA backend.

Semantics match :mod:`fastnn.backends.numpy_ref` (torch's):

* windows are clipped to the input; ``out_hw`` already applies ceil_mode, so a
  window may run past the padded input;
* max: padded cells never win, NaN propagates, a window with no real cell
  outputs -inf; the winner of a window is torch's -- scanning in row-major
  window order a cell wins when it is greater than the running max or is NaN,
  so the first maximum, or the last NaN. ``max_pool2d_with_indices`` returns
  its flat index in the input plane; the backward pass recomputes it and
  routes the window's gradient there;
* avg: the divisor is ``divisor_override`` if given (any nonzero int,
  negative included, as torch allows), else the window size
  clipped to the padded input (count_include_pad) or the number of real cells;
  a window with no real cell outputs 0.

Forward kernels use one thread per output cell. The backward kernels are
gathers, one thread per input cell summing the windows that contain it, so
overlapping windows need no atomics and results are deterministic.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from numba import cuda

from fastnn.backends._cuda.gemm import numba_type
from fastnn.backends._cuda.launch import Runtime, ceil_div, runtime

Pair = tuple[int, int]
_THREADS = 256


def _grid1d(n: int, rt: Runtime) -> int:
    return max(1, min(ceil_div(n, _THREADS), 32 * rt.num_sms))


# Builtin min/max are avoided inside kernels: Numba 0.68 types them through a
# *args overload that its CUDA target cannot compile (see launch.py).
@cuda.jit(device=True)
def _imin(a, b):
    return a if a < b else b


@cuda.jit(device=True)
def _imax(a, b):
    return a if a > b else b


@functools.cache
def _max_fwd_kernel(T: Any, with_indices: bool) -> Any:
    """y[idx] = the window max; with_indices (a compile-time constant) also writes
    ind[idx] = the winner's flat index in its plane (``ind`` is ignored without it)."""
    neg_inf = T(-math.inf)

    @cuda.jit(cache=True)
    def kernel(x, y, ind, total, H, W, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw):
        for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
            ow = idx % OW
            t = idx // OW
            oh = t % OH
            nc = t // OH
            h0 = oh * sh - ph
            w0 = ow * sw - pw
            # torch's index for a window with no real cell: its first tap at or
            # after the plane's top-left corner.
            hf = h0 + ((dh - 1 - h0) // dh) * dh if h0 < 0 else h0
            wf = w0 + ((dw - 1 - w0) // dw) * dw if w0 < 0 else w0
            best = neg_inf
            where = hf * W + wf
            for i in range(KH):
                h = h0 + i * dh
                if h >= 0 and h < H:
                    for j in range(KW):
                        w = w0 + j * dw
                        if w >= 0 and w < W:
                            v = x[(nc * H + h) * W + w]
                            # v != v: a NaN replaces anything (the last NaN wins) and
                            # only a NaN replaces a NaN; ties keep the first maximum.
                            if v > best or v != v:
                                best = v
                                where = h * W + w
            y[idx] = best
            if with_indices:
                ind[idx] = where

    return kernel


@functools.cache
def _max_bwd_kernel(T: Any) -> Any:
    zero = T(0)

    @cuda.jit(cache=True)
    def kernel(gy, x, gx, total, H, W, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw):
        for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
            w = idx % W
            t = idx // W
            h = t % H
            nc = t // H
            acc = zero
            for i in range(KH):
                th = h + ph - i * dh
                if th >= 0 and th % sh == 0 and th // sh < OH:
                    oh = th // sh
                    for j in range(KW):
                        tw = w + pw - j * dw
                        if tw >= 0 and tw % sw == 0 and tw // sw < OW:
                            ow = tw // sw
                            # Recompute the winner of window (oh, ow): the first real
                            # cell, replaced by a strictly larger one or by any NaN.
                            h0 = oh * sh - ph
                            w0 = ow * sw - pw
                            best = zero
                            bi = -1
                            bj = -1
                            for ii in range(KH):
                                hh = h0 + ii * dh
                                if hh >= 0 and hh < H:
                                    for jj in range(KW):
                                        ww = w0 + jj * dw
                                        if ww >= 0 and ww < W:
                                            v = x[(nc * H + hh) * W + ww]
                                            if bi < 0 or v > best or v != v:
                                                best = v
                                                bi = ii
                                                bj = jj
                            if bi == i and bj == j:
                                acc += gy[(nc * OH + oh) * OW + ow]
            gx[idx] = acc

    return kernel


@functools.cache
def _avg_fwd_kernel(T: Any) -> Any:
    zero = T(0)

    @cuda.jit(cache=True)
    def kernel(x, y, total, H, W, OH, OW, KH, KW, sh, sw, ph, pw, include_pad, has_override,
               override):
        for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
            ow = idx % OW
            t = idx // OW
            oh = t % OH
            nc = t // OH
            h0 = oh * sh - ph
            w0 = ow * sw - pw
            h1 = _imin(h0 + KH, H + ph)
            w1 = _imin(w0 + KW, W + pw)
            hs = _imax(h0, 0)
            ws = _imax(w0, 0)
            he = _imin(h1, H)
            we = _imin(w1, W)
            out = zero
            if he > hs and we > ws:
                acc = zero
                for h in range(hs, he):
                    for w in range(ws, we):
                        acc += x[(nc * H + h) * W + w]
                if has_override:
                    div = override
                elif include_pad:
                    div = (h1 - h0) * (w1 - w0)
                else:
                    div = (he - hs) * (we - ws)
                if div != 0:  # only a zero divisor_override can make it 0
                    out = acc / T(div)
            y[idx] = out

    return kernel


@functools.cache
def _avg_bwd_kernel(T: Any) -> Any:
    zero = T(0)

    @cuda.jit(cache=True)
    def kernel(gy, gx, total, H, W, OH, OW, KH, KW, sh, sw, ph, pw, include_pad, has_override,
               override):
        for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
            w = idx % W
            t = idx // W
            h = t % H
            nc = t // H
            acc = zero
            for i in range(KH):
                th = h + ph - i
                if th >= 0 and th % sh == 0 and th // sh < OH:
                    oh = th // sh
                    h0 = oh * sh - ph
                    h1 = _imin(h0 + KH, H + ph)
                    nh = _imin(h1, H) - _imax(h0, 0)
                    for j in range(KW):
                        tw = w + pw - j
                        if tw >= 0 and tw % sw == 0 and tw // sw < OW:
                            ow = tw // sw
                            w0 = ow * sw - pw
                            w1 = _imin(w0 + KW, W + pw)
                            nw = _imin(w1, W) - _imax(w0, 0)
                            if has_override:
                                div = override
                            elif include_pad:
                                div = (h1 - h0) * (w1 - w0)
                            else:
                                div = nh * nw
                            if div != 0:
                                acc += gy[(nc * OH + oh) * OW + ow] / T(div)
            gx[idx] = acc

    return kernel


def max_pool2d(
    x: Any, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair, out_hw: Pair
) -> Any:
    """x (N, C, H, W) -> y (N, C, OH, OW), (OH, OW) = out_hw."""
    rt = runtime()
    n, c, h, w = x.shape
    y = rt.empty((n, c, *out_hw), x.dtype)
    total = y.size
    if total:
        unused = rt.empty((1,), "int64")
        rt.launch(_max_fwd_kernel(numba_type(x.dtype), False), (_grid1d(total, rt),),
                  _THREADS, x.reshape(-1), y.reshape(-1), unused, total, h, w, *out_hw,
                  *kernel_size, *stride, *padding, *dilation)
    return y


def max_pool2d_with_indices(
    x: Any, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair, out_hw: Pair
) -> tuple[Any, Any]:
    """x (N, C, H, W) -> (y, int64 flat indices into each H*W plane), both (N, C, OH, OW)."""
    rt = runtime()
    n, c, h, w = x.shape
    y = rt.empty((n, c, *out_hw), x.dtype)
    ind = rt.empty((n, c, *out_hw), "int64")
    total = y.size
    if total:
        rt.launch(_max_fwd_kernel(numba_type(x.dtype), True), (_grid1d(total, rt),), _THREADS,
                  x.reshape(-1), y.reshape(-1), ind.reshape(-1), total, h, w, *out_hw,
                  *kernel_size, *stride, *padding, *dilation)
    return y, ind


def max_pool2d_backward(
    grad_out: Any, x: Any, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair
) -> Any:
    """grad_x (N, C, H, W) from grad_out (N, C, OH, OW) and x."""
    rt = runtime()
    n, c, h, w = x.shape
    oh, ow = grad_out.shape[2:]
    gx = rt.empty(x.shape, x.dtype)
    total = gx.size
    if total and grad_out.size == 0:
        gx.fill(0)
    elif total:
        rt.launch(_max_bwd_kernel(numba_type(x.dtype)), (_grid1d(total, rt),), _THREADS,
                  grad_out.reshape(-1), x.reshape(-1), gx.reshape(-1), total, h, w, oh, ow,
                  *kernel_size, *stride, *padding, *dilation)
    return gx


def avg_pool2d(
    x: Any, kernel_size: Pair, stride: Pair, padding: Pair, out_hw: Pair,
    count_include_pad: bool, divisor_override: int | None,
) -> Any:
    """x (N, C, H, W) -> y (N, C, OH, OW), (OH, OW) = out_hw."""
    rt = runtime()
    n, c, h, w = x.shape
    y = rt.empty((n, c, *out_hw), x.dtype)
    total = y.size
    if total:
        rt.launch(_avg_fwd_kernel(numba_type(x.dtype)), (_grid1d(total, rt),), _THREADS,
                  x.reshape(-1), y.reshape(-1), total, h, w, *out_hw, *kernel_size,
                  *stride, *padding, bool(count_include_pad), divisor_override is not None,
                  int(divisor_override or 0))
    return y


def avg_pool2d_backward(
    grad_out: Any, input_hw: Pair, kernel_size: Pair, stride: Pair, padding: Pair,
    count_include_pad: bool, divisor_override: int | None,
) -> Any:
    """grad_x (N, C, H, W) from grad_out (N, C, OH, OW); (H, W) = input_hw."""
    rt = runtime()
    n, c, oh, ow = grad_out.shape
    h, w = input_hw
    gx = rt.empty((n, c, h, w), grad_out.dtype)
    total = gx.size
    if total and grad_out.size == 0:
        gx.fill(0)
    elif total:
        rt.launch(_avg_bwd_kernel(numba_type(grad_out.dtype)), (_grid1d(total, rt),),
                  _THREADS, grad_out.reshape(-1), gx.reshape(-1), total, h, w, oh, ow,
                  *kernel_size, *stride, *padding, bool(count_include_pad),
                  divisor_override is not None, int(divisor_override or 0))
    return gx
