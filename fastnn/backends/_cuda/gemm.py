"""Tiled, register-blocked GEMM for the Numba-CUDA backend.

One kernel computes, for every batch entry ``bt``::

    C[bt] (M, N) = sum over r < R of op(A[bt, r]) @ op(B[bt, r])  (+ bias[row])

where ``op`` optionally transposes. Operands are flat 1-D arrays addressed
with two-level batch strides, which is what conv needs: batch entry ``bt`` is
split into ``(bt // G, bt % G)`` (sample, group) with strides ``(s_outer,
s_inner)``, and the ``R`` loop walks a third stride (samples again, for the
weight gradient, which sums over the batch inside the kernel). A plain
(batched) matmul is ``G = 1, R = 1``.

Kernel design (the classic SGEMM structure):

* A block computes a BM x BN tile of C with BM/TM x BN/TN threads; each thread
  owns a TM x TN sub-block held in registers (8x8 for the 128x128 tile, 4x4 for
  the 64x64 and 32x32 tiles), so every shared-memory value it reads feeds TM or
  TN FMAs instead of one.
* A and B tiles (BK deep) are staged in shared memory, A stored k-major
  (``As[k][m]``) so the inner loop reads a column of A and a row of B. Rows of
  the padded tile are BM + 4 wide so the transposing stores hit distinct banks.
  Thread (tx, ty) owns rows ``ty + i*TY`` and columns ``tx + j*TX``: reads of B
  and the final stores of C are consecutive across a warp (no bank conflicts,
  coalesced writes).
* Double buffering: the next tile is fetched from global memory into registers
  before the current tile is multiplied, then stored into the other shared
  buffer, so global latency overlaps the FMAs and one barrier per tile suffices.
* Wide loads: when the contiguous dimension of an operand is even (and the
  data 8/16-byte aligned), the operand is read through a complex64/complex128
  view, i.e. two floats (or doubles) per load instruction.
* Split-K: when the output has too few tiles to fill the GPU (a weight
  gradient is a small matrix reduced over a long batch), the reduction is cut
  into S slices written to a workspace and summed by a second kernel, which
  keeps the result deterministic (no atomics).

Tile shapes are chosen per call from the output size (``choose_config``).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numba import cuda, float32, float64

from fastnn.backends._cuda.launch import Runtime, ceil_div, runtime

#: name -> (BM, BN, BK, TM, TN); 256, 256 and 64 threads per block.
CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "large": (128, 128, 8, 8, 8),
    "medium": (64, 64, 8, 4, 4),
    "small": (32, 32, 16, 4, 4),
}

#: Tests (and benchmarks) may pin a tile config or a split count here.
force_config: str | None = None
force_splits: int | None = None

_MAX_GRID_YZ = 65535
_PAD = 4


def numba_type(dtype: Any) -> Any:
    """The Numba scalar type of a float32/float64 NumPy dtype."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return float32
    if dtype == np.float64:
        return float64
    raise TypeError(f"the cuda backend supports float32 and float64, got {dtype}")


@functools.cache
def _gemm_kernel(
    T: Any, cfg: tuple[int, int, int, int, int], TRANS_A: bool, TRANS_B: bool,
    WIDE_A: bool, WIDE_B: bool, HAS_BIAS: bool,
) -> Any:
    BM, BN, BK, TM, TN = cfg
    TX = BN // TN  # threads along n
    TY = BM // TM  # threads along m
    NT = TX * TY
    LA = BM * BK // NT  # A values each thread stages per tile
    LB = BN * BK // NT
    LA2 = LA // 2
    LB2 = LB // 2
    HBK = BK // 2
    HBM = BM // 2
    HBN = BN // 2
    PA = BM + _PAD
    PB = BN + _PAD
    zero = T(0)

    @cuda.jit(cache=True)
    def kernel(A, B, C, bias, M, N, K, G, sAo, sAi, sAr, sBo, sBi, sBr, sbias, R, S, NB,
               b0, m_base):
        tid = cuda.threadIdx.x
        tx = tid % TX
        ty = tid // TX
        n0 = cuda.blockIdx.x * BN
        m0 = m_base + cuda.blockIdx.y * BM
        z = cuda.blockIdx.z
        b = b0 + z // S
        s = z % S
        bo = b // G
        bi = b - bo * G
        a_base = bo * sAo + bi * sAi
        b_base = bo * sBo + bi * sBi
        KT = (K + BK - 1) // BK
        total = R * KT
        per = (total + S - 1) // S
        t_begin = s * per
        t_end = t_begin + per
        if t_end > total:  # (builtin min/max are avoided in kernels: see launch.py)
            t_end = total

        As = cuda.shared.array((2, BK, PA), T)
        Bs = cuda.shared.array((2, BK, PB), T)
        acc = cuda.local.array((TM, TN), T)
        ar = cuda.local.array(TM, T)
        br = cuda.local.array(TN, T)
        ra = cuda.local.array(LA, T)
        rb = cuda.local.array(LB, T)
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = zero

        # Iteration t multiplies tile t (if t >= t_begin) while tile t + 1 is
        # fetched into registers and then parked in the other shared buffer.
        for t in range(t_begin - 1, t_end):
            nxt = t + 1 < t_end
            if nxt:
                r = (t + 1) // KT
                k0 = (t + 1 - r * KT) * BK
                aoff = a_base + r * sAr
                boff = b_base + r * sBr
                # ---- fetch A tile (BM x BK) into registers
                if WIDE_A:
                    for u in range(LA2):
                        p = tid + u * NT
                        if TRANS_A:  # stored (K, M): pairs along m
                            gm = m0 + 2 * (p % HBM)
                            gk = k0 + p // HBM
                            if gm < M and gk < K:
                                va = A[(aoff + gk * M + gm) >> 1]
                                ra[2 * u] = va.real
                                ra[2 * u + 1] = va.imag
                            else:
                                ra[2 * u] = zero
                                ra[2 * u + 1] = zero
                        else:  # stored (M, K): pairs along k
                            gk = k0 + 2 * (p % HBK)
                            gm = m0 + p // HBK
                            if gm < M and gk < K:
                                va = A[(aoff + gm * K + gk) >> 1]
                                ra[2 * u] = va.real
                                ra[2 * u + 1] = va.imag
                            else:
                                ra[2 * u] = zero
                                ra[2 * u + 1] = zero
                else:
                    for u in range(LA):
                        idx = tid + u * NT
                        if TRANS_A:
                            gm = m0 + idx % BM
                            gk = k0 + idx // BM
                            if gm < M and gk < K:
                                ra[u] = A[aoff + gk * M + gm]
                            else:
                                ra[u] = zero
                        else:
                            gk = k0 + idx % BK
                            gm = m0 + idx // BK
                            if gm < M and gk < K:
                                ra[u] = A[aoff + gm * K + gk]
                            else:
                                ra[u] = zero
                # ---- fetch B tile (BK x BN) into registers
                if WIDE_B:
                    for u in range(LB2):
                        p = tid + u * NT
                        if TRANS_B:  # stored (N, K): pairs along k
                            gk = k0 + 2 * (p % HBK)
                            gn = n0 + p // HBK
                            if gn < N and gk < K:
                                vb = B[(boff + gn * K + gk) >> 1]
                                rb[2 * u] = vb.real
                                rb[2 * u + 1] = vb.imag
                            else:
                                rb[2 * u] = zero
                                rb[2 * u + 1] = zero
                        else:  # stored (K, N): pairs along n
                            gn = n0 + 2 * (p % HBN)
                            gk = k0 + p // HBN
                            if gn < N and gk < K:
                                vb = B[(boff + gk * N + gn) >> 1]
                                rb[2 * u] = vb.real
                                rb[2 * u + 1] = vb.imag
                            else:
                                rb[2 * u] = zero
                                rb[2 * u + 1] = zero
                else:
                    for u in range(LB):
                        idx = tid + u * NT
                        if TRANS_B:
                            gk = k0 + idx % BK
                            gn = n0 + idx // BK
                            if gn < N and gk < K:
                                rb[u] = B[boff + gn * K + gk]
                            else:
                                rb[u] = zero
                        else:
                            gn = n0 + idx % BN
                            gk = k0 + idx // BN
                            if gn < N and gk < K:
                                rb[u] = B[boff + gk * N + gn]
                            else:
                                rb[u] = zero

            # ---- multiply the current tile
            if t >= t_begin:
                cb = (t - t_begin) & 1
                for kk in range(BK):
                    for i in range(TM):
                        ar[i] = As[cb, kk, ty + i * TY]
                    for j in range(TN):
                        br[j] = Bs[cb, kk, tx + j * TX]
                    for i in range(TM):
                        for j in range(TN):
                            acc[i, j] = cuda.fma(ar[i], br[j], acc[i, j])

            # ---- park the fetched tile in the other buffer
            if nxt:
                sb = (t + 1 - t_begin) & 1
                if WIDE_A:
                    for u in range(LA2):
                        p = tid + u * NT
                        if TRANS_A:
                            mm = 2 * (p % HBM)
                            kk = p // HBM
                            As[sb, kk, mm] = ra[2 * u]
                            As[sb, kk, mm + 1] = ra[2 * u + 1]
                        else:
                            kk = 2 * (p % HBK)
                            mm = p // HBK
                            As[sb, kk, mm] = ra[2 * u]
                            As[sb, kk + 1, mm] = ra[2 * u + 1]
                else:
                    for u in range(LA):
                        idx = tid + u * NT
                        if TRANS_A:
                            As[sb, idx // BM, idx % BM] = ra[u]
                        else:
                            As[sb, idx % BK, idx // BK] = ra[u]
                if WIDE_B:
                    for u in range(LB2):
                        p = tid + u * NT
                        if TRANS_B:
                            kk = 2 * (p % HBK)
                            nn = p // HBK
                            Bs[sb, kk, nn] = rb[2 * u]
                            Bs[sb, kk + 1, nn] = rb[2 * u + 1]
                        else:
                            nn = 2 * (p % HBN)
                            kk = p // HBN
                            Bs[sb, kk, nn] = rb[2 * u]
                            Bs[sb, kk, nn + 1] = rb[2 * u + 1]
                else:
                    for u in range(LB):
                        idx = tid + u * NT
                        if TRANS_B:
                            Bs[sb, idx % BK, idx // BK] = rb[u]
                        else:
                            Bs[sb, idx // BN, idx % BN] = rb[u]
            cuda.syncthreads()

        # ---- epilogue: guarded, coalesced stores (C is dense (S, NB, M, N))
        coff = (s * NB + b) * M * N
        for i in range(TM):
            gm = m0 + ty + i * TY
            if gm < M:
                if HAS_BIAS:
                    bv = bias[bi * sbias + gm]
                    for j in range(TN):
                        gn = n0 + tx + j * TX
                        if gn < N:
                            C[coff + gm * N + gn] = acc[i, j] + bv
                else:  # (acc + 0 is not folded away: -0.0 + 0 is +0.0)
                    for j in range(TN):
                        gn = n0 + tx + j * TX
                        if gn < N:
                            C[coff + gm * N + gn] = acc[i, j]

    return kernel


@functools.cache
def _sum_splits_kernel(T: Any) -> Any:
    zero = T(0)

    @cuda.jit(cache=True)
    def kernel(ws, out, S, L):
        # out[i] = sum_s ws[s*L + i], in a fixed order (deterministic).
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for i in range(start, L, step):
            acc = zero
            for s in range(S):
                acc += ws[s * L + i]
            out[i] = acc

    return kernel


def choose_config(m: int, n: int, batch: int, rt: Runtime) -> str:
    """The largest tile whose grid still covers every SM once (else ``small``)."""
    if force_config is not None:
        return force_config
    for name in ("large", "medium"):
        bm, bn = CONFIGS[name][:2]
        if ceil_div(m, bm) * ceil_div(n, bn) * batch >= rt.num_sms:
            return name
    return "small"


def _wide_view(a: Any, contiguous_len: int, strides: tuple[int, ...], rt: Runtime) -> Any:
    """``a`` viewed as complex (two floats per element) when pairs never straddle, else None."""
    itemsize = a.dtype.itemsize
    if contiguous_len % 2 or a.size % 2 or any(s % 2 for s in strides):
        return None
    if not rt.is_aligned(a, 2 * itemsize):
        return None
    return a.view(np.complex64 if itemsize == 4 else np.complex128)


def gemm(
    a: Any, b: Any, c: Any, m: int, n: int, k: int, *,
    trans_a: bool = False, trans_b: bool = False, batch: int = 1, groups: int = 1,
    a_strides: tuple[int, int, int] = (0, 0, 0), b_strides: tuple[int, int, int] = (0, 0, 0),
    reduce: int = 1, bias: Any = None, bias_stride: int = 0,
) -> None:
    """``c[bt] = sum_r op(a[bt, r]) @ op(b[bt, r]) (+ bias)`` for ``bt < batch``; writes ``c``.

    Parameters
    ----------
    a, b : flat (1-D, contiguous) arrays of one float dtype. Entry ``(bt, r)``
        of ``a`` starts at ``(bt // groups) * a_strides[0] + (bt % groups) *
        a_strides[1] + r * a_strides[2]`` and is an (M, K) row-major matrix, or
        (K, M) when ``trans_a``; likewise ``b`` is (K, N), or (N, K) when
        ``trans_b``.
    c : flat dense output of ``batch * m * n`` elements, (batch, M, N) row-major.
    reduce : R, the number of products summed into each output matrix.
    bias : optional flat array; row ``i`` of batch entry ``bt`` adds
        ``bias[(bt % groups) * bias_stride + i]`` (conv's per-channel bias).
    """
    if m == 0 or n == 0 or batch == 0:
        return
    rt = runtime()
    T = numba_type(c.dtype)
    name = choose_config(m, n, batch, rt)
    cfg = CONFIGS[name]
    bm, bn, bk = cfg[:3]
    tiles = ceil_div(m, bm) * ceil_div(n, bn) * batch
    ktiles = reduce * ceil_div(k, bk)
    if force_splits is not None and bias is None:
        splits = max(1, min(force_splits, max(ktiles, 1)))
    elif bias is None and tiles < rt.num_sms and ktiles >= 8:
        # Enough slices for ~2 blocks per SM, each at least 4 tiles deep.
        splits = max(1, min(ceil_div(2 * rt.num_sms, tiles), ktiles // 4, 64))
    else:
        splits = 1
    if splits > 1 and bias is not None:
        raise ValueError("gemm: split-K with a fused bias is not supported")

    a_wide = _wide_view(a, m if trans_a else k, a_strides, rt)
    b_wide = _wide_view(b, k if trans_b else n, b_strides, rt)
    kernel = _gemm_kernel(
        T, cfg, bool(trans_a), bool(trans_b), a_wide is not None, b_wide is not None,
        bias is not None,
    )
    a_arg = a if a_wide is None else a_wide
    b_arg = b if b_wide is None else b_wide
    out = c if splits == 1 else rt.empty(splits * batch * m * n, c.dtype)
    # Any array of T stands in for a missing bias (never read). Not ``c``: the
    # simulator copies each argument back after the launch, so an output passed
    # twice would be overwritten by its stale copy.
    bias_arg = a if bias is None else bias
    threads = (bn // cfg[4]) * (bm // cfg[3])
    grid_x = ceil_div(n, bn)
    m_tiles = ceil_div(m, bm)
    per_z = max(1, _MAX_GRID_YZ // splits)
    for mt0 in range(0, m_tiles, _MAX_GRID_YZ):
        gy = min(_MAX_GRID_YZ, m_tiles - mt0)
        for b0 in range(0, batch, per_z):
            nb = min(per_z, batch - b0)
            rt.launch(
                kernel, (grid_x, gy, nb * splits), threads,
                a_arg, b_arg, out, bias_arg, m, n, k, groups,
                a_strides[0], a_strides[1], a_strides[2],
                b_strides[0], b_strides[1], b_strides[2],
                bias_stride, reduce, splits, batch, b0, mt0 * bm,
            )
    if splits > 1:
        length = batch * m * n
        blocks = min(ceil_div(length, 256), 8 * rt.num_sms)
        rt.launch(_sum_splits_kernel(T), (blocks,), 256, out, c, splits, length)


def matmul(a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
    """op(a) @ op(b) for 2-D or batched 3-D operands of one ndim (the backend contract's
    ``matmul``): one :func:`gemm` call with plain batch strides."""
    if a.ndim != b.ndim or a.ndim not in (2, 3):
        raise ValueError(f"matmul: a and b must both be 2-D or 3-D, got {a.ndim}-D and {b.ndim}-D")
    batch = a.shape[0] if a.ndim == 3 else 1
    m = a.shape[-1] if transpose_a else a.shape[-2]
    k = a.shape[-2] if transpose_a else a.shape[-1]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    out = runtime().empty((batch, m, n) if a.ndim == 3 else (m, n), a.dtype)
    gemm(a.reshape(-1), b.reshape(-1), out.reshape(-1), m, n, k,
         trans_a=transpose_a, trans_b=transpose_b, batch=batch,
         a_strides=(m * k, 0, 0), b_strides=(k * n, 0, 0))
    return out
