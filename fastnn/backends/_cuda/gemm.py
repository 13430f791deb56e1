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
  the padded tile are BM + 4 wide so the transposing stores hit distinct banks
  and every row start stays 16-byte aligned.
* Thread (tx, ty) owns runs of 4 consecutive rows (``g*SM + 4*ty + 0..3``)
  and columns (``g*SN + 4*tx + 0..3``), so one k step reads its operands with
  (TM + TN)/4 ``ld.shared.v4.f32`` (16-byte) loads; a warp's reads cover
  distinct or identical (broadcast) 16-byte words, free of bank conflicts.
* The k loop is unrolled by hand (8 steps per pass, ``_kstep`` inlined), so
  ptxas can issue the next step's shared reads during the current FMAs.
* Double buffering: the next tile is fetched from global memory into registers
  before the current tile is multiplied, then stored into the other shared
  buffer, so global latency overlaps the FMAs and one barrier per tile suffices.
* Wide loads: when an operand's contiguous dimension and batch strides are
  multiples of the group width (``vector_width``: 4 floats, 2 doubles, 2 floats
  on the 64x64 tile) and its base is aligned to it, each thread fetches its
  share of a tile with ``ld.global.v4.f32`` / ``.v2`` vector loads
  (:mod:`.vector`); otherwise with scalar loads. Groups along m / n are parked
  in shared memory with one vector store.
* Registers: the float32 kernels fit 128 registers per thread with no spills
  (launch bounds enforce it, ``tests/test_cuda_ptx.py`` checks it with ptxas),
  so two 256-thread blocks of the large tile share an SM.
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

from fastnn.backends._cuda import vector
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
_MAX_REGS = 128


def numba_type(dtype: Any) -> Any:
    """The Numba scalar type of a float32/float64 NumPy dtype."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return float32
    if dtype == np.float64:
        return float64
    raise TypeError(f"the cuda backend supports float32 and float64, got {dtype}")


@cuda.jit(device=True, inline="always")
def _frag(f, S, row, T4, stride, SHV):  # noqa: N803
    """``f[4g:4g+4] = S[row + g*stride : +4]`` for g < T4: one vector read each when ``SHV``."""
    for g in range(T4):
        if SHV:
            vector.load_vec(f, 4 * g, S, row + g * stride, 4)
        else:
            for v in range(4):
                f[4 * g + v] = S[row + g * stride + v]


@cuda.jit(device=True, inline="always")
def _kstep(acc, fa, fb, As, Bs, rowa, rowb, TM, TN, SM, SN, SHV):  # noqa: N803
    """One k step of a GEMM thread: TM values of A and TN of B from shared memory, TM*TN FMAs.

    ``As``/``Bs`` are flat shared tiles; this thread's values for the step are
    ``TM // 4`` runs of 4 at ``rowa + g*SM`` (``TN // 4`` at ``rowb + g*SN``),
    read with 16-byte vector loads when ``SHV``. ``acc`` is (TM, TN) row-major,
    ``fa``/``fb`` hold the step's operands. Inlined into the kernel at the Numba
    IR level, so the loop bounds are the caller's constants and every loop here
    unrolls into straight-line register code. (Module-level, not a closure of
    the kernel factory: see ``vector``'s note on the cache.)
    """
    _frag(fa, As, rowa, TM // 4, SM, SHV)
    _frag(fb, Bs, rowb, TN // 4, SN, SHV)
    for i in range(TM):
        for j in range(TN):
            acc[i * TN + j] = cuda.fma(fa[i], fb[j], acc[i * TN + j])


@cuda.jit(device=True, inline="always")
def _fetch(regs, X, off, k0, o0, row0, col, K, LEN, U, V, OS, K_ROWS, zero):  # noqa: N803
    """Load this thread's share of one operand tile into ``regs``: U groups of V values.

    The operand (flat ``X`` from ``off``) is stored (LEN, K) row-major, or
    (K, LEN) when ``K_ROWS`` (LEN is M for A, N for B; ``o0`` the tile's start
    along it, ``k0`` along k). Group u is row ``row0 + u*OS`` of the stored
    tile, elements ``col .. col+V-1`` of that row, read with one vector load
    (V > 1: the caller checked alignment). A group past the matrix edge is
    zero: with V > 1 the contiguous length is a multiple of V, so a group is
    all in or all out.
    """
    for u in range(U):
        row = row0 + u * OS
        if K_ROWS:  # stored (K, LEN): rows are k, groups run along m / n
            ok = k0 + row < K and o0 + col < LEN
            src = off + (k0 + row) * LEN + o0 + col
        else:  # stored (LEN, K): rows are m / n, groups run along k
            ok = o0 + row < LEN and k0 + col < K
            src = off + (o0 + row) * K + k0 + col
        if ok:
            vector.load_vec(regs, u * V, X, src, V)
        else:
            for v in range(V):
                regs[u * V + v] = zero


@cuda.jit(device=True, inline="always")
def _park(S, regs, base, P, row0, col, U, V, OS, K_ROWS, SHV):  # noqa: N803
    """Store ``_fetch``'s groups into the k-major shared tile ``S`` (rows of P from ``base``).

    A group along m / n (``K_ROWS``) is consecutive in the tile's k-row: one
    vector store when ``SHV``. A group along k is a column of the tile: V
    scalar stores, P apart.
    """
    for u in range(U):
        row = row0 + u * OS
        if K_ROWS:
            dst = base + row * P + col
            if SHV:
                vector.store_vec(S, dst, regs, u * V, V)
            else:
                for v in range(V):
                    S[dst + v] = regs[u * V + v]
        else:
            dst = base + col * P + row
            for v in range(V):
                S[dst + v * P] = regs[u * V + v]


def _jit_options(T: Any, threads: int) -> dict[str, Any]:
    """``cuda.jit`` options of a GEMM kernel with ``threads`` per block.

    float32: launch bounds cap registers at 128 per thread (65536 per SM), so
    that two 256-thread blocks of the large tile fit on an SM. The kernels
    need no more than that; the bound keeps a compiler change from silently
    halving the occupancy (ptxas would spill instead, which the PTX test
    reports). float64 accumulators alone take 2*TM*TN registers: no bound.
    """
    if not vector.LAUNCH_BOUNDS or T != float32:
        return {}
    return {"launch_bounds": (threads, max(1, 65536 // (threads * _MAX_REGS)))}


def vector_width(T: Any, cfg: tuple[int, int, int, int, int], operand: str) -> int:
    """Elements per global vector load of a wide ``operand`` ("a" or "b") tile fetch.

    Each thread stages ``BM*BK/threads`` (or ``BN*BK/threads``) values of a
    tile; they are fetched in groups of this many consecutive elements (at
    most 16 bytes, one ``ld.global.v4.f32`` / ``.v2.f64``). A wide operand's
    contiguous dimension, strides and base address must be multiples of it.
    """
    bm, bn, bk, tm, tn = cfg
    staged = (bm if operand == "a" else bn) * bk // ((bm // tm) * (bn // tn))
    return vector.chunk_elems(staged, np.dtype(T.name).itemsize)


@functools.cache
def _gemm_kernel(
    T: Any, cfg: tuple[int, int, int, int, int], TRANS_A: bool, TRANS_B: bool,
    WIDE_A: bool, WIDE_B: bool, HAS_BIAS: bool,
) -> Any:
    BM, BN, BK, TM, TN = cfg
    TX = BN // TN  # threads along n
    TY = BM // TM  # threads along m
    NT = TX * TY
    # Tile fetch: each thread stages LA (LB) values per tile as UA (UB) groups of
    # VA (VB) consecutive elements of the operand's contiguous dimension; a group
    # is one vector load when the operand is wide, else VA = 1 (scalar loads).
    LA = BM * BK // NT
    LB = BN * BK // NT
    VA = vector_width(T, cfg, "a") if WIDE_A else 1
    VB = vector_width(T, cfg, "b") if WIDE_B else 1
    UA = LA // VA
    UB = LB // VB
    # Groups per row of the stored tile (its contiguous dimension: k, or m / n
    # when transposed), and rows between a thread's successive groups.
    QA = (BM if TRANS_A else BK) // VA
    QB = (BK if TRANS_B else BN) // VB
    OA = NT // QA
    OB = NT // QB
    # Shared tiles, k-major and flat: As[buf][k][m] at (buf*BK + k)*PA + m. Rows are
    # padded by 4 so that the transposing stores hit distinct banks while every row
    # start stays 16-byte aligned for the vector reads.
    PA = BM + _PAD
    PB = BN + _PAD
    SA = 2 * BK * PA
    TMN = TM * TN
    SB = 2 * BK * PB
    # Thread (tx, ty) owns TM/4 runs of 4 consecutive rows, run g starting at
    # g*SM + 4*ty, and TN/4 runs of 4 consecutive columns (g*SN + 4*tx), so its
    # operands for one k step are (TM + TN)/4 vector reads of shared memory.
    SM = BM // (TM // 4)
    SN = BN // (TN // 4)
    SHV = vector.SHARED_VECTORS
    ALIGN_KW = vector.SHARED_ALIGN_KW
    ALIGN = vector.SMEM_ALIGN
    zero = T(0)

    @cuda.jit(cache=True, **_jit_options(T, NT))
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
        b_out = b // G
        b_in = b - b_out * G
        KT = (K + BK - 1) // BK
        total = R * KT
        per = (total + S - 1) // S
        t_begin = s * per
        t_end = t_begin + per
        if t_end > total:  # (builtin min/max are avoided in kernels: see launch.py)
            t_end = total

        if ALIGN_KW:  # (a compile-time constant: the other branch is pruned before typing)
            As = cuda.shared.array(SA, T, alignment=ALIGN)
            Bs = cuda.shared.array(SB, T, alignment=ALIGN)
        else:
            As = cuda.shared.array(SA, T)
            Bs = cuda.shared.array(SB, T)
        acc = cuda.local.array(TMN, T)
        fa = cuda.local.array(TM, T)
        fb = cuda.local.array(TN, T)
        ra = cuda.local.array(LA, T)
        rb = cuda.local.array(LB, T)
        for i in range(TMN):
            acc[i] = zero

        # This thread's groups in a fetched tile: row a_row + u*OA of the stored
        # (BM x BK, or BK x BM when transposed) tile, columns a_col .. a_col+VA-1.
        a_row = tid // QA
        a_col = (tid % QA) * VA
        b_row = tid // QB
        b_col = (tid % QB) * VB

        # The tile being fetched: product r, k offset k0, operand offsets aoff/boff.
        # Advanced incrementally (no division per tile).
        r = t_begin // KT if KT > 0 else 0  # (K == 0: no tiles, C = 0)
        k0 = (t_begin - r * KT) * BK
        aoff = b_out * sAo + b_in * sAi + r * sAr
        boff = b_out * sBo + b_in * sBi + r * sBr

        # Iteration t multiplies tile t (if t >= t_begin) while tile t + 1 is
        # fetched into registers and then parked in the other shared buffer.
        for t in range(t_begin - 1, t_end):
            nxt = t + 1 < t_end
            if nxt:
                # ---- fetch the A (BM x BK) and B (BK x BN) tiles into registers
                _fetch(ra, A, aoff, k0, m0, a_row, a_col, K, M, UA, VA, OA, TRANS_A, zero)
                _fetch(rb, B, boff, k0, n0, b_row, b_col, K, N, UB, VB, OB, not TRANS_B, zero)
                k0 += BK
                if k0 >= K:
                    k0 = 0
                    aoff += sAr
                    boff += sBr

            # ---- multiply the current tile
            if t >= t_begin:
                cb = (t - t_begin) & 1
                # The k loop unrolled by hand, 8 steps per pass (BK is 8 or 16): left
                # to itself LLVM unrolls only 2, and straight-line steps let ptxas
                # issue the next step's shared reads during this step's FMAs.
                for k8 in range(0, BK, 8):
                    ra0 = (cb * BK + k8) * PA + 4 * ty
                    rb0 = (cb * BK + k8) * PB + 4 * tx
                    _kstep(acc, fa, fb, As, Bs, ra0, rb0, TM, TN, SM, SN, SHV)
                    _kstep(acc, fa, fb, As, Bs, ra0 + PA, rb0 + PB, TM, TN, SM, SN, SHV)
                    _kstep(acc, fa, fb, As, Bs, ra0 + 2 * PA, rb0 + 2 * PB, TM, TN, SM, SN, SHV)
                    _kstep(acc, fa, fb, As, Bs, ra0 + 3 * PA, rb0 + 3 * PB, TM, TN, SM, SN, SHV)
                    _kstep(acc, fa, fb, As, Bs, ra0 + 4 * PA, rb0 + 4 * PB, TM, TN, SM, SN, SHV)
                    _kstep(acc, fa, fb, As, Bs, ra0 + 5 * PA, rb0 + 5 * PB, TM, TN, SM, SN, SHV)
                    _kstep(acc, fa, fb, As, Bs, ra0 + 6 * PA, rb0 + 6 * PB, TM, TN, SM, SN, SHV)
                    _kstep(acc, fa, fb, As, Bs, ra0 + 7 * PA, rb0 + 7 * PB, TM, TN, SM, SN, SHV)

            # ---- park the fetched tile in the other buffer (k-major)
            if nxt:
                sb = (t + 1 - t_begin) & 1
                _park(As, ra, sb * BK * PA, PA, a_row, a_col, UA, VA, OA, TRANS_A, SHV)
                _park(Bs, rb, sb * BK * PB, PB, b_row, b_col, UB, VB, OB, not TRANS_B, SHV)
            cuda.syncthreads()

        # ---- epilogue: guarded stores (C is dense (S, NB, M, N))
        coff = (s * NB + b) * M * N
        for i in range(TM):
            gm = m0 + (i // 4) * SM + 4 * ty + i % 4
            if gm < M:
                bv = zero
                if HAS_BIAS:
                    bv = bias[b_in * sbias + gm]
                for j in range(TN):
                    gn = n0 + (j // 4) * SN + 4 * tx + j % 4
                    if gn < N:
                        if HAS_BIAS:
                            C[coff + gm * N + gn] = acc[i * TN + j] + bv
                        else:  # (acc + 0 is not folded away: -0.0 + 0 is +0.0)
                            C[coff + gm * N + gn] = acc[i * TN + j]

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


def _is_wide(
    a: Any, width: int, contiguous_len: int, strides: tuple[int, ...], rt: Runtime
) -> bool:
    """Whether ``a`` may be fetched in aligned groups of ``width`` elements (vector loads).

    Every group starts at a multiple of ``width`` from ``a``'s base (the
    contiguous dimension and all batch strides are multiples of it) and never
    straddles the end of a row, and the base is ``width * itemsize`` aligned.
    """
    if contiguous_len % width or any(s % width for s in strides):
        return False
    return rt.is_aligned(a, width * a.dtype.itemsize)


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

    wide_a = _is_wide(a, vector_width(T, cfg, "a"), m if trans_a else k, a_strides, rt)
    wide_b = _is_wide(b, vector_width(T, cfg, "b"), k if trans_b else n, b_strides, rt)
    kernel = _gemm_kernel(T, cfg, bool(trans_a), bool(trans_b), wide_a, wide_b, bias is not None)
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
                a, b, out, bias_arg, m, n, k, groups,
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
