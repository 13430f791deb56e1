"""conv2d forward and backward for the Numba-CUDA backend.

Two strategies, picked per call by :func:`use_direct`:

* **direct** (forward only) when a filter is tiny, ``C/groups * KH * KW <= 32``
  -- the MNIST first layer (1x3x3), RGB stems, depthwise 3x3. An im2col
  matrix with K = 9 would make the GEMM memory-bound on a matrix 9x larger
  than the input; instead one thread computes one output pixel for 16 output
  channels: its receptive field sits in registers (the kernel is compiled for
  the exact filter size, so the loops unroll), the 16 filters sit in shared
  memory and are read as broadcasts, and stores are coalesced along the row.
* **im2col + GEMM** otherwise, and for both backward passes. ``cols`` is laid
  out (n, g, C/g*KH*KW, OH*OW) so that per (sample, group) the products are
  exactly the batched GEMMs of :mod:`.gemm` and the output lands in NCHW with
  no transpose:

  - forward:        y[n,g]   = W[g] (Og, Ck)    @ cols[n,g] (Ck, P)   (+ bias)
  - backward input: dcols[n,g] = W[g]^T (Ck, Og) @ gy[n,g] (Og, P), then col2im
  - backward weight: dW[g]   = sum_n gy[n,g] (Og, P) @ cols[n,g]^T (P, Ck)
    (the sum over samples runs inside the GEMM kernel, split-K when the
    weight matrix alone cannot fill the GPU).

  A 1x1 / stride 1 / no-padding conv skips im2col (cols is x itself). ``cols``
  is built for as many samples at a time as fit in ``IM2COL_BUDGET_BYTES``.

col2im is a gather (each input pixel sums the columns that read it), so no
atomics are needed and results are deterministic.
"""

from __future__ import annotations

import functools
from typing import Any

from numba import cuda

from fastnn.backends._cuda import gemm as _gemm
from fastnn.backends._cuda.launch import Runtime, ceil_div, runtime
from fastnn.geometry import conv_out_size

Pair = tuple[int, int]

#: Largest C/groups*KH*KW for which the forward pass uses the direct kernel.
DIRECT_MAX_TAPS = 32
#: Output channels per block of the direct kernel.
_DIRECT_OB = 16
_DIRECT_THREADS = 128
#: Memory the im2col buffer may take; larger batches are processed in chunks.
IM2COL_BUDGET_BYTES = 256 << 20
#: Tests may pin the forward strategy: "direct", "im2col" or None (automatic).
force_path: str | None = None

_THREADS = 256


def _grid1d(n: int, rt: Runtime) -> int:
    return max(1, min(ceil_div(n, _THREADS), 32 * rt.num_sms))


@functools.cache
def _im2col_kernel(T: Any) -> Any:
    zero = T(0)

    @cuda.jit(cache=True)
    def kernel(x, cols, n0, nn, C, H, W, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw):
        # cols (nn, C*KH*KW, OH*OW) for samples n0 .. n0+nn of x (N, C, H, W).
        total = nn * C * KH * KW * OH * OW
        for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
            ow = idx % OW
            t = idx // OW
            oh = t % OH
            t //= OH
            kw = t % KW
            t //= KW
            kh = t % KH
            t //= KH
            c = t % C
            n = t // C
            ih = oh * sh - ph + kh * dh
            iw = ow * sw - pw + kw * dw
            v = zero
            if ih >= 0 and ih < H and iw >= 0 and iw < W:
                v = x[(((n0 + n) * C + c) * H + ih) * W + iw]
            cols[idx] = v

    return kernel


@functools.cache
def _col2im_kernel(T: Any) -> Any:
    zero = T(0)

    @cuda.jit(cache=True)
    def kernel(cols, gx, n0, nn, C, H, W, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw):
        # gx[n0+n, c, h, w] = sum of the cols entries that im2col read from it.
        total = nn * C * H * W
        for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
            w = idx % W
            t = idx // W
            h = t % H
            t //= H  # t = n * C + c
            acc = zero
            for kh in range(KH):
                th = h + ph - kh * dh
                if th >= 0 and th % sh == 0 and th // sh < OH:
                    oh = th // sh
                    for kw in range(KW):
                        tw = w + pw - kw * dw
                        if tw >= 0 and tw % sw == 0 and tw // sw < OW:
                            ow = tw // sw
                            acc += cols[((t * KH + kh) * KW + kw) * (OH * OW) + oh * OW + ow]
            gx[n0 * C * H * W + idx] = acc

    return kernel


@functools.cache
def _direct_kernel(T: Any, CG: int, KH: int, KW: int, HAS_BIAS: bool) -> Any:
    CK = CG * KH * KW
    OB = _DIRECT_OB
    NTH = _DIRECT_THREADS
    zero = T(0)

    @cuda.jit(cache=True)
    def kernel(x, w, bias, y, N, C, H, W, CO, OH, OW, sh, sw, ph, pw, dh, dw, Og):
        tid = cuda.threadIdx.x
        o0 = cuda.blockIdx.y * OB
        wsm = cuda.shared.array((OB, CK), T)
        for i in range(tid, OB * CK, NTH):
            oo = i // CK
            if o0 + oo < CO:
                wsm[oo, i - oo * CK] = w[o0 * CK + i]
        cuda.syncthreads()
        OHW = OH * OW
        pix = cuda.blockIdx.x * NTH + tid
        if pix < N * OHW:
            n = pix // OHW
            p = pix - n * OHW
            oh = p // OW
            ow = p - oh * OW
            h0 = oh * sh - ph
            w0 = ow * sw - pw
            xv = cuda.local.array(CK, T)
            cur_g = -1
            for oo in range(OB):
                o = o0 + oo
                if o < CO:
                    g = o // Og
                    if g != cur_g:  # (re)load the receptive field of group g
                        cur_g = g
                        for cg in range(CG):
                            base = (n * C + g * CG + cg) * H
                            for kh in range(KH):
                                ih = h0 + kh * dh
                                for kw in range(KW):
                                    iw = w0 + kw * dw
                                    v = zero
                                    if ih >= 0 and ih < H and iw >= 0 and iw < W:
                                        v = x[(base + ih) * W + iw]
                                    xv[(cg * KH + kh) * KW + kw] = v
                    acc = zero
                    if HAS_BIAS:
                        acc = bias[o]
                    for q in range(CK):
                        acc = cuda.fma(xv[q], wsm[oo, q], acc)
                    y[(n * CO + o) * OHW + p] = acc

    return kernel


def use_direct(cg: int, kh: int, kw: int) -> bool:
    """Whether the forward pass takes the direct kernel for this filter size."""
    if force_path is not None:
        return force_path == "direct"
    return cg * kh * kw <= DIRECT_MAX_TAPS


def _is_pointwise(kh: int, kw: int, stride: Pair, padding: Pair) -> bool:
    """A 1x1 conv with stride 1 and no padding reads x as its own im2col matrix."""
    return kh == 1 and kw == 1 and stride == (1, 1) and padding == (0, 0)


def _chunk(n: int, per_sample_bytes: int) -> int:
    return max(1, min(n, IM2COL_BUDGET_BYTES // max(per_sample_bytes, 1)))


def _im2col(rt: Runtime, x: Any, cols: Any, n0: int, nn: int, geom: tuple) -> None:
    c, h, w, kh, kw, oh, ow, (sh, sw), (ph, pw), (dh, dw) = geom
    T = _gemm.numba_type(x.dtype)
    total = nn * c * kh * kw * oh * ow
    rt.launch(_im2col_kernel(T), (_grid1d(total, rt),), _THREADS,
              x, cols, n0, nn, c, h, w, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw)


def conv2d(
    x: Any, weight: Any, bias: Any, stride: Pair, padding: Pair, dilation: Pair, groups: int
) -> Any:
    """y (N, O, OH, OW) = conv(x (N, C, H, W), weight (O, C/groups, KH, KW)) + bias (O,)."""
    rt = runtime()
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    oh = conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    y = rt.empty((n, o, oh, ow), x.dtype)
    if y.size == 0:
        return y
    og = o // groups
    ck = cg * kh * kw
    xf, wf, yf = x.reshape(-1), weight.reshape(-1), y.reshape(-1)
    bf = None if bias is None else bias.reshape(-1)
    T = _gemm.numba_type(x.dtype)
    if use_direct(cg, kh, kw):
        kernel = _direct_kernel(T, cg, kh, kw, bf is not None)
        grid = (ceil_div(n * oh * ow, _DIRECT_THREADS), ceil_div(o, _DIRECT_OB))
        rt.launch(kernel, grid, _DIRECT_THREADS, xf, wf, wf if bf is None else bf, yf,
                  n, c, h, w, o, oh, ow, *stride, *padding, *dilation, og)
        return y
    p = oh * ow
    pointwise = _is_pointwise(kh, kw, stride, padding)
    nc = n if pointwise else _chunk(n, c * kh * kw * p * x.dtype.itemsize)
    cols = None if pointwise else rt.empty(nc * c * kh * kw * p, x.dtype)
    geom = (c, h, w, kh, kw, oh, ow, stride, padding, dilation)
    for n0 in range(0, n, nc):
        nn = min(nc, n - n0)
        if pointwise:
            src = xf[n0 * c * p:(n0 + nn) * c * p]
        else:
            _im2col(rt, xf, cols, n0, nn, geom)
            src = cols
        _gemm.gemm(
            wf, src, yf[n0 * o * p:(n0 + nn) * o * p], og, p, ck,
            batch=nn * groups, groups=groups,
            a_strides=(0, og * ck, 0), b_strides=(groups * ck * p, ck * p, 0),
            bias=bf, bias_stride=og,
        )
    return y


def conv2d_backward_input(
    grad_out: Any, weight: Any, input_hw: Pair, stride: Pair, padding: Pair,
    dilation: Pair, groups: int,
) -> Any:
    """grad_x (N, C, H, W) from grad_out (N, O, OH, OW) and weight (O, C/groups, KH, KW)."""
    rt = runtime()
    n, o, oh, ow = grad_out.shape
    _, cg, kh, kw = weight.shape
    h, w = input_hw
    c = cg * groups
    gx = rt.empty((n, c, h, w), grad_out.dtype)
    if gx.size == 0:
        return gx
    if grad_out.size == 0:
        gx.fill(0)
        return gx
    og = o // groups
    ck = cg * kh * kw
    p = oh * ow
    gyf, wf, gxf = grad_out.reshape(-1), weight.reshape(-1), gx.reshape(-1)
    pointwise = _is_pointwise(kh, kw, stride, padding)
    nc = n if pointwise else _chunk(n, c * kh * kw * p * grad_out.dtype.itemsize)
    cols = None if pointwise else rt.empty(nc * c * kh * kw * p, grad_out.dtype)
    T = _gemm.numba_type(grad_out.dtype)
    for n0 in range(0, n, nc):
        nn = min(nc, n - n0)
        dst = gxf[n0 * c * p:(n0 + nn) * c * p] if pointwise else cols
        _gemm.gemm(
            wf, gyf[n0 * o * p:(n0 + nn) * o * p], dst, ck, p, og,
            trans_a=True, batch=nn * groups, groups=groups,
            a_strides=(0, og * ck, 0), b_strides=(o * p, og * p, 0),
        )
        if not pointwise:
            total = nn * c * h * w
            rt.launch(_col2im_kernel(T), (_grid1d(total, rt),), _THREADS,
                      cols, gxf, n0, nn, c, h, w, kh, kw, oh, ow,
                      *stride, *padding, *dilation)
    return gx


def conv2d_backward_weight(
    grad_out: Any, x: Any, kernel_hw: Pair, stride: Pair, padding: Pair,
    dilation: Pair, groups: int,
) -> Any:
    """grad_w (O, C/groups, KH, KW) from grad_out (N, O, OH, OW) and x (N, C, H, W)."""
    rt = runtime()
    n, o, oh, ow = grad_out.shape
    c, h, w = x.shape[1:]
    kh, kw = kernel_hw
    cg = c // groups
    gw = rt.empty((o, cg, kh, kw), x.dtype)
    if gw.size == 0:
        return gw
    if n == 0 or oh * ow == 0:
        gw.fill(0)
        return gw
    og = o // groups
    ck = cg * kh * kw
    p = oh * ow
    gyf, xf, gwf = grad_out.reshape(-1), x.reshape(-1), gw.reshape(-1)
    pointwise = _is_pointwise(kh, kw, stride, padding)
    nc = n if pointwise else _chunk(n, c * kh * kw * p * x.dtype.itemsize)
    cols = None if pointwise else rt.empty(nc * c * kh * kw * p, x.dtype)
    geom = (c, h, w, kh, kw, oh, ow, stride, padding, dilation)
    partial = None
    for n0 in range(0, n, nc):
        nn = min(nc, n - n0)
        if pointwise:
            src = xf[n0 * c * p:(n0 + nn) * c * p]
        else:
            _im2col(rt, xf, cols, n0, nn, geom)
            src = cols
        dst = gwf
        if n0 > 0:  # later chunks accumulate through a temporary
            if partial is None:
                partial = rt.empty(gwf.size, x.dtype)
            dst = partial
        _gemm.gemm(
            gyf[n0 * o * p:(n0 + nn) * o * p], src, dst, og, ck, p,
            trans_b=True, batch=groups, groups=groups,
            a_strides=(0, og * p, o * p), b_strides=(0, ck * p, c * kh * kw * p),
            reduce=nn,
        )
        if n0 > 0:
            gwf += partial
    return gw
