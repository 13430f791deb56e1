"""Fused kernels of the cuda training step (:mod:`fastnn.training.cuda_step`).

One seed-model step (conv -> relu -> maxpool -> flatten -> linear -> relu ->
linear, cross-entropy, backward, optimizer) is eight launches with these:

* ``conv_pool_fwd``: conv (stride 1, no padding) + bias + ReLU + max pool
  (kernel == stride), one thread per pooled output; it keeps the argmax of
  each window for the backward. With ``GATHER`` it reads the batch straight
  from the uint8 dataset through the batch's index array and the loader's
  256-entry normalisation table, so a batch costs no launch of its own.
* ``linear_fwd``: ``y = x @ w.T + b`` with an optional ReLU epilogue.
* ``softmax_ce``: softmax cross-entropy, its gradient, the batch's mean loss
  and the epoch's running loss sum, in one single-block kernel (deterministic:
  no atomics).
* ``linear_bwd``: one launch for ``dx = dy @ w`` (masked by ``x > 0`` when x
  came out of a ReLU, i.e. the ReLU backward is fused), ``dw = dy.T @ x`` and
  ``db = sum(dy)``; the blocks of the grid are split between the three.
* ``conv_pool_bwd``: max-pool backward, ReLU backward and the conv's weight
  and bias gradients in one launch (one block per weight, a fixed-order tree
  reduction: deterministic).

The GEMMs here are plain 16x16 shared-memory tiles: the sizes of a small MLP
head (at most a few hundred outputs) where launch count, not FLOPs, dominates.
Large products belong to :mod:`fastnn.backends._cuda.gemm`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numba
from numba import cuda, float64

# The simulator runs one Python thread per CUDA thread: smaller blocks there
# keep the tests fast and still span several tiles.
_SIM = bool(numba.config.ENABLE_CUDASIM)
_TS = 8 if _SIM else 16  # GEMM tile edge: TS x TS threads, one output each
_NTH = 32 if _SIM else 128  # threads of the reducing kernels (a power of two)


def gemm_tiles(m: int, n: int) -> int:
    """Blocks of a ``_TS`` x ``_TS`` tiling of an (m, n) output."""
    return -(-m // _TS) * -(-n // _TS)


@functools.cache
def _tile_dot(T: Any) -> Any:
    zero = T(0)

    @cuda.jit(device=True)
    def tile_dot(A, sai, sak, B, sbk, sbj, M, N, K, tile, As, Bs):
        """sum_k A[i, k] * B[k, j] for this thread's (i, j) of output tile ``tile``
        (row-major over ceil(N / TS) tiles per row); A[i, k] = A[i*sai + k*sak],
        B[k, j] = B[k*sbk + j*sbj]. Returns (i, j, acc)."""
        ty = cuda.threadIdx.y
        tx = cuda.threadIdx.x
        tiles_n = (N + _TS - 1) // _TS
        i = (tile // tiles_n) * _TS + ty
        j = (tile % tiles_n) * _TS + tx
        acc = zero
        for k0 in range(0, K, _TS):
            ka = k0 + tx
            As[ty, tx] = A[i * sai + ka * sak] if (i < M and ka < K) else zero
            kb = k0 + ty
            Bs[ty, tx] = B[kb * sbk + j * sbj] if (kb < K and j < N) else zero
            cuda.syncthreads()
            for kk in range(_TS):
                acc += As[ty, kk] * Bs[kk, tx]
            cuda.syncthreads()
        return i, j, acc

    return tile_dot


@functools.cache
def linear_fwd(T: Any, HAS_BIAS: bool, RELU: bool) -> Any:
    """y (N, O) = x (N, K) @ w (O, K).T (+ b) (then ReLU); grid: gemm_tiles(N, NO)."""
    zero = T(0)
    tile_dot = _tile_dot(T)

    @cuda.jit(cache=True)
    def kernel(x, w, b, y, N, NO, K):
        As = cuda.shared.array((_TS, _TS), T)
        Bs = cuda.shared.array((_TS, _TS), T)
        i, j, acc = tile_dot(x, K, 1, w, 1, K, N, NO, K, cuda.blockIdx.x, As, Bs)
        if i < N and j < NO:
            if HAS_BIAS:
                acc += b[j]
            if RELU and not (acc > zero or acc != acc):
                acc = zero
            y[i * NO + j] = acc

    return kernel


@functools.cache
def linear_bwd(T: Any, NEED_DX: bool, MASK: bool, HAS_BIAS: bool) -> Any:
    """dx (N, K) = dy (N, NO) @ w (NO, K) [* (x > 0)], dw (NO, K) = dy.T @ x, db = sum(dy).

    Grid: gemm_tiles(N, K) blocks for dx (if NEED_DX), gemm_tiles(NO, K) for dw,
    then ceil(NO / 256) for db (if HAS_BIAS); 16 x 16 threads.
    """
    zero = T(0)
    tile_dot = _tile_dot(T)

    @cuda.jit(cache=True)
    def kernel(dy, x, w, dx, dw, db, N, NO, K):
        As = cuda.shared.array((_TS, _TS), T)
        Bs = cuda.shared.array((_TS, _TS), T)
        blk = cuda.blockIdx.x
        n_dx = (N + _TS - 1) // _TS * ((K + _TS - 1) // _TS) if NEED_DX else 0
        n_dw = (NO + _TS - 1) // _TS * ((K + _TS - 1) // _TS)
        if blk < n_dx:
            i, j, acc = tile_dot(dy, NO, 1, w, K, 1, N, K, NO, blk, As, Bs)
            if i < N and j < K:
                if MASK and not x[i * K + j] > zero:
                    acc = zero
                dx[i * K + j] = acc
        elif blk < n_dx + n_dw:
            i, j, acc = tile_dot(dy, 1, NO, x, K, 1, NO, K, N, blk - n_dx, As, Bs)
            if i < NO and j < K:
                dw[i * K + j] = acc
        elif HAS_BIAS:
            o = (blk - n_dx - n_dw) * _TS * _TS + cuda.threadIdx.y * _TS + cuda.threadIdx.x
            if o < NO:
                s = zero
                for n in range(N):
                    s += dy[n * NO + o]
                db[o] = s

    return kernel


def linear_bwd_blocks(n: int, o: int, k: int, need_dx: bool, has_bias: bool) -> int:
    """The grid of :func:`linear_bwd` for these sizes."""
    return ((gemm_tiles(n, k) if need_dx else 0) + gemm_tiles(o, k)
            + (-(-o // (_TS * _TS)) if has_bias else 0))


@functools.cache
def conv_pool_fwd(T: Any, GATHER: bool, HAS_BIAS: bool, CI: int, KH: int, KW: int,
                  PK: int) -> Any:
    """out, arg (N, C, PH, PW) = maxpool_PK(relu(conv(x, w) + b)), argmax in the window.

    x is (N, CI, H, W) of T, or with GATHER the uint8 dataset (n, H, W) read
    at rows ``idx[0:N]`` through ``lut`` (CI == 1). Grid-stride, 1-D.
    """
    zero = T(0)
    neg_inf = T(-math.inf)

    @cuda.jit(cache=True)
    def kernel(x, idx, lut, w, b, out, arg, N, C, H, W, PH, PW):
        total = N * C * PH * PW
        for t in range(cuda.grid(1), total, cuda.gridsize(1)):
            pw = t % PW
            r = t // PW
            ph = r % PH
            r //= PH
            c = r % C
            n = r // C
            src = idx[n] if GATHER else n
            best = neg_inf
            barg = 0
            for dy in range(PK):
                for dx in range(PK):
                    oh = ph * PK + dy
                    ow = pw * PK + dx
                    acc = b[c] if HAS_BIAS else zero
                    for ci in range(CI):
                        for kh in range(KH):
                            for kw in range(KW):
                                pos = ((src * CI + ci) * H + oh + kh) * W + ow + kw
                                v = lut[x[pos]] if GATHER else x[pos]
                                acc += v * w[((c * CI + ci) * KH + kh) * KW + kw]
                    # NaN wins, as in max_pool2d; the first maximum wins ties.
                    if (acc > best or acc != acc) and best == best:
                        best = acc
                        barg = dy * PK + dx
            out[t] = best if (best > zero or best != best) else zero
            arg[t] = barg

    return kernel


@functools.cache
def conv_pool_bwd(T: Any, GATHER: bool, HAS_BIAS: bool, CI: int, KH: int, KW: int,
                  PK: int) -> Any:
    """dw (C, CI, KH, KW) and db (C,) from dout (N, C, PH, PW), through the max pool's
    argmax and the ReLU (gradient only where out > 0). Grid (C, CI*KH*KW [+1 for db]),
    _NTH threads; block (c, j) reduces one weight over N * PH * PW in a fixed order."""
    zero = T(0)
    NJ = CI * KH * KW

    @cuda.jit(cache=True)
    def kernel(x, idx, lut, dout, out, arg, dw, db, N, C, H, W, PH, PW):
        red = cuda.shared.array(_NTH, T)
        tid = cuda.threadIdx.x
        c = cuda.blockIdx.x
        j = cuda.blockIdx.y
        ci = j // (KH * KW)
        kh = (j // KW) % KH
        kw = j % KW
        s = zero
        for q in range(tid, N * PH * PW, _NTH):
            pw = q % PW
            r = q // PW
            ph = r % PH
            n = r // PH
            o = ((n * C + c) * PH + ph) * PW + pw
            if out[o] > zero:
                g = dout[o]
                if j == NJ:
                    s += g
                else:
                    a = arg[o]
                    src = idx[n] if GATHER else n
                    pos = ((src * CI + ci) * H + ph * PK + a // PK + kh) * W + pw * PK \
                        + a % PK + kw
                    v = lut[x[pos]] if GATHER else x[pos]
                    s += g * v
        red[tid] = s
        cuda.syncthreads()
        step = _NTH // 2
        while step > 0:
            if tid < step:
                red[tid] += red[tid + step]
            cuda.syncthreads()
            step //= 2
        if tid == 0:
            if j == NJ:
                if HAS_BIAS:
                    db[c] = red[0]
            else:
                dw[c * NJ + j] = red[0]

    return kernel


@functools.cache
def softmax_ce(T: Any, GATHER: bool) -> Any:
    """grad (N, K) = (softmax(logits) - onehot) / N; loss[0] = mean loss (T);
    acc[0] += sum of row losses, acc[1] += N (float64). One block of _NTH threads,
    one row per thread at a time. Labels are ``labels[idx[row]]`` with GATHER.
    A label outside [0, K) makes its row's loss and gradient NaN."""
    neg_inf = T(-math.inf)
    nan = T(math.nan)
    zero = T(0)
    one = T(1)

    @cuda.jit(cache=True)
    def kernel(logits, labels, idx, grad, loss, acc, N, K):
        red = cuda.shared.array(_NTH, float64)
        tid = cuda.threadIdx.x
        inv_n = T(N)
        s = float64(0)
        for row in range(tid, N, _NTH):
            base = row * K
            m = neg_inf
            for j in range(K):
                v = logits[base + j]
                if v > m or v != v:
                    m = v
            se = zero
            for j in range(K):
                se += math.exp(logits[base + j] - m)
            lse = math.log(se)
            label = labels[idx[row]] if GATHER else labels[row]
            if label >= 0 and label < K:
                for j in range(K):
                    p = math.exp(logits[base + j] - m - lse)
                    if j == label:
                        p -= one
                    grad[base + j] = p / inv_n
                s += float64(lse - (logits[base + label] - m))
            else:
                for j in range(K):
                    grad[base + j] = nan
                s += float64(nan)
        red[tid] = s
        cuda.syncthreads()
        step = _NTH // 2
        while step > 0:
            if tid < step:
                red[tid] += red[tid + step]
            cuda.syncthreads()
            step //= 2
        if tid == 0:
            loss[0] = T(red[0] / float64(N))
            acc[0] += red[0]
            acc[1] += float64(N)

    return kernel


REDUCE_THREADS = _NTH
TILE = _TS
