// BLIS-style GEMM for one ISA build: C[M,N] (+)= op(A) @ op(B), row-major.
//
// Structure (per thread, on its own rectangle of C):
//   for jc over N in NC blocks
//     for pc over K in KC blocks
//       pack op(B)[pc:pc+kc, jc:jc+nc] into kc x NR micro-panels (an
//       untransposed B with few rows of C: by the first row panel's
//       micro-kernels, as they load it; see micro's CopyB)
//       for ic over M in MC blocks
//         pack op(A)[ic:ic+mc, pc:pc+kc] into MR x kc micro-panels (A
//         stored transposed only: a row-major A is read in place)
//         for ir over MR rows: for jr over NR columns:
//           micro-kernel: an MR x NR tile of C held in registers, one rank-1
//           update per k (NR/W vector loads of B, MR broadcasts of A).
// The A micro-panel (MR x KC, 6 KB) stays in L1 while the inner jr loop streams
// the packed B block (sequential, prefetch-friendly) from L2/L3; the C tile is
// prefetched while the k loop runs. Transposes (trans_a / trans_b) are
// absorbed by the packing routines, so there is one micro-kernel per type;
// ragged edges use register tiles of exactly the remaining height/width.
//
// Small problems skip packing: the same micro-kernel reads A and (untransposed)
// B in place through runtime strides; only a transposed B and the ragged last
// column panel are copied into small zero-padded panels. A narrow C (N below
// one vector, e.g. a 10-class output layer) is computed as C^T so that the
// vector lanes run along M.
//
// Threads: C is cut into a tm x tn grid of rectangles (multiples of MR x NR),
// one per thread, chosen to minimise the packing each thread repeats; long-K
// products with a small C (the MNIST linear forward, 128x128x5408) split K
// instead and sum the partial products. Every thread packs into its own
// thread-local buffers, so there is exactly one fork/join per gemm and no
// barrier: a late worker cannot stall the others (the caller runs any chunk
// nobody has claimed), and a pool that runs the chunks serially (nested call)
// stays correct. Inside a parallel_for body gemm plans for one thread.
#include "kernels/gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include "fastnn/cpuinfo.h"
#include "fastnn/parallel.h"
#include "kernels/ops.h"  // poison_fill

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace fastnn {
namespace FASTNN_ISA_NS {
namespace {

// ---------------------------------------------------------------------------
// Vector abstraction: R is one SIMD register of W elements.
// ---------------------------------------------------------------------------
#if defined(__AVX512F__)
struct VF {
  using T = float;
  using R = __m512;
  static constexpr int W = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R load(const T* p) { return _mm512_load_ps(p); }
  static R loadu(const T* p) { return _mm512_loadu_ps(p); }
  static void storeu(T* p, R v) { _mm512_storeu_ps(p, v); }
  static R set1(T x) { return _mm512_set1_ps(x); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  // Keeps v where !(v < 0): NaN and -0 pass, as in relu().
  static R relu(R v) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, zero(), _CMP_NLT_UQ), v); }
  static __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static R load_n(const T* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static void store_n(T* p, R v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
};
struct VD {
  using T = double;
  using R = __m512d;
  static constexpr int W = 8;
  static R zero() { return _mm512_setzero_pd(); }
  static R load(const T* p) { return _mm512_load_pd(p); }
  static R loadu(const T* p) { return _mm512_loadu_pd(p); }
  static void storeu(T* p, R v) { _mm512_storeu_pd(p, v); }
  static R set1(T x) { return _mm512_set1_pd(x); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static R add(R a, R b) { return _mm512_add_pd(a, b); }
  static R relu(R v) { return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(v, zero(), _CMP_NLT_UQ), v); }
  static __mmask8 mask(int n) { return static_cast<__mmask8>((1u << n) - 1u); }
  static R load_n(const T* p, int n) { return _mm512_maskz_loadu_pd(mask(n), p); }
  static void store_n(T* p, R v, int n) { _mm512_mask_storeu_pd(p, mask(n), v); }
};
// Register tiles: MR rows x NV vectors. fp32: 8 x 32 (16 accumulators).
constexpr int kMRf = 8, kNVf = 2;
constexpr int kMRd = 8, kNVd = 2;
#elif defined(__AVX2__)
struct VF {
  using T = float;
  using R = __m256;
  static constexpr int W = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R load(const T* p) { return _mm256_load_ps(p); }
  static R loadu(const T* p) { return _mm256_loadu_ps(p); }
  static void storeu(T* p, R v) { _mm256_storeu_ps(p, v); }
  static R set1(T x) { return _mm256_set1_ps(x); }
#if defined(__FMA__)
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
#else
  static R fma(R a, R b, R c) { return _mm256_add_ps(_mm256_mul_ps(a, b), c); }
#endif
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  // max(0, v) returns v when unordered or equal: NaN and -0 pass, as in relu().
  static R relu(R v) { return _mm256_max_ps(zero(), v); }
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static R load_n(const T* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static void store_n(T* p, R v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
};
struct VD {
  using T = double;
  using R = __m256d;
  static constexpr int W = 4;
  static R zero() { return _mm256_setzero_pd(); }
  static R load(const T* p) { return _mm256_load_pd(p); }
  static R loadu(const T* p) { return _mm256_loadu_pd(p); }
  static void storeu(T* p, R v) { _mm256_storeu_pd(p, v); }
  static R set1(T x) { return _mm256_set1_pd(x); }
#if defined(__FMA__)
  static R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
#else
  static R fma(R a, R b, R c) { return _mm256_add_pd(_mm256_mul_pd(a, b), c); }
#endif
  static R add(R a, R b) { return _mm256_add_pd(a, b); }
  static R relu(R v) { return _mm256_max_pd(zero(), v); }
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static R load_n(const T* p, int n) { return _mm256_maskload_pd(p, mask(n)); }
  static void store_n(T* p, R v, int n) { _mm256_maskstore_pd(p, mask(n), v); }
};
// 16 ymm registers: 6 x 2 accumulators + 2 B vectors + 1 broadcast.
constexpr int kMRf = 6, kNVf = 2;
constexpr int kMRd = 6, kNVd = 2;
#else
// Portable fallback on GCC/Clang vector extensions (SSE2 on x86-64 baseline,
// NEON on aarch64, scalar code elsewhere).
template <typename T_, int W_>
struct VGeneric {
  using T = T_;
  static constexpr int W = W_;
  typedef T R __attribute__((vector_size(sizeof(T) * W)));
  static R zero() { return R{}; }
  static R load(const T* p) {
    R v;
    std::memcpy(&v, p, sizeof(R));
    return v;
  }
  static R loadu(const T* p) { return load(p); }
  static void storeu(T* p, R v) { std::memcpy(p, &v, sizeof(R)); }
  static R set1(T x) { return R{} + x; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static R add(R a, R b) { return a + b; }
  static R relu(R v) { return v < T(0) ? R{} : v; }  // NaN and -0 pass, as in relu()
  static R load_n(const T* p, int n) {
    R v{};
    for (int i = 0; i < n; ++i) v[i] = p[i];
    return v;
  }
  static void store_n(T* p, R v, int n) {
    for (int i = 0; i < n; ++i) p[i] = v[i];
  }
};
using VF = VGeneric<float, 4>;
using VD = VGeneric<double, 2>;
constexpr int kMRf = 4, kNVf = 2;
constexpr int kMRd = 4, kNVd = 2;
#endif

// Register tiles (compile time, per ISA).
template <typename T>
struct Blocking;
template <>
struct Blocking<float> {
  static constexpr int MR = kMRf, NV = kNVf, NR = kNVf * VF::W;
};
template <>
struct Blocking<double> {
  static constexpr int MR = kMRd, NV = kNVd, NR = kNVd * VD::W;
};

// Cache blocking (elements), derived at run time from the cache sizes in force
// (fastnn/cpuinfo.h) rather than tuned constants, so one binary blocks right
// for a 32 KB/1 MB core and a 48 KB/2 MB one alike. Loop order (see the top of
// the file): the MR x KC A micro-panel is reused from L1 across a whole row of
// B micro-panels, each KC x NR B micro-panel streams through L1 beside it, and
// the KC x NC packed B block is reused from L2 by every A micro-panel.
//   KC: A micro-panel + B micro-panel fill ~2/3 of L1d (the rest holds the C
//       tile and the next B panel's prefetched lines): 192 for float32 on a
//       48 KB L1d, 128 on a 32 KB one.
//   NC: the B block takes ~half of L2, leaving room for the A block being
//       packed and the C rows it updates.
//   MC: the A block takes ~a quarter of L2 (it is read once per ic, right
//       after packing, so it only needs to survive that long).
// Sizes are rounded to whole micro-panels and clamped to sane ranges so an
// absurd cache report cannot produce a degenerate plan.
struct Blk {
  int64_t KC, MC, NC;
};

template <typename T>
Blk blocking_for(const CacheSizes& cs) {
  using Bk = Blocking<T>;
  const int64_t s = sizeof(T);
  auto clamp_round = [](int64_t v, int64_t step, int64_t lo, int64_t hi) {
    return std::min(hi, std::max(lo, v / step * step));
  };
  Blk b;
  b.KC = clamp_round(cs.l1d * 2 / 3 / ((Bk::MR + Bk::NR) * s), 16, 64, 1024);
  b.NC = clamp_round(cs.l2 / 2 / (b.KC * s), Bk::NR, Bk::NR, 8192);
  b.MC = clamp_round(cs.l2 / 4 / (b.KC * s), Bk::MR, Bk::MR, 4096);
  return b;
}

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  using type = VF;
};
template <>
struct VecOf<double> {
  using type = VD;
};

#define FASTNN_UNROLL _Pragma("GCC unroll 32")

// Writes an accumulated MRK x (NVK*W) tile into C[0:m, 0:n] (see micro below
// for beta1 and the epilogue).
template <class V, int MRK, int NVK>
inline __attribute__((always_inline)) void store_tile(typename V::R (&acc)[MRK][NVK],
                                                      typename V::T* __restrict c, int64_t ldc,
                                                      int m, int n, bool beta1,
                                                      const typename V::T* bias, bool relu) {
  using R = typename V::R;
  constexpr int W = V::W;
  if (bias != nullptr || relu) {
    R bv[NVK];
    FASTNN_UNROLL for (int v = 0; v < NVK; ++v) {
      const int cols = n - v * W;
      bv[v] = bias == nullptr ? V::zero()
              : cols >= W     ? V::loadu(bias + v * W)
              : cols > 0      ? V::load_n(bias + v * W, cols)
                              : V::zero();
    }
    FASTNN_UNROLL for (int i = 0; i < MRK; ++i) {
      FASTNN_UNROLL for (int v = 0; v < NVK; ++v) {
        typename V::T* p = c + i * ldc + v * W;
        const int cols = n - v * W;
        if (i >= m || cols <= 0) continue;
        R t = acc[i][v];
        if (beta1) t = V::add(cols >= W ? V::loadu(p) : V::load_n(p, cols), t);
        if (bias != nullptr) t = V::add(t, bv[v]);
        if (relu) t = V::relu(t);
        if (cols >= W) {
          V::storeu(p, t);
        } else {
          V::store_n(p, t, cols);
        }
      }
    }
    return;
  }
  if (m == MRK && n == NVK * W) {
    FASTNN_UNROLL for (int i = 0; i < MRK; ++i) {
      FASTNN_UNROLL for (int v = 0; v < NVK; ++v) {
        typename V::T* p = c + i * ldc + v * W;
        V::storeu(p, beta1 ? V::add(V::loadu(p), acc[i][v]) : acc[i][v]);
      }
    }
    return;
  }
  FASTNN_UNROLL for (int i = 0; i < MRK; ++i) {
    if (i >= m) break;
    FASTNN_UNROLL for (int v = 0; v < NVK; ++v) {
      int cols = n - v * W;
      if (cols <= 0) break;
      typename V::T* p = c + i * ldc + v * W;
      if (cols >= W) {
        V::storeu(p, beta1 ? V::add(V::loadu(p), acc[i][v]) : acc[i][v]);
      } else {
        V::store_n(p, beta1 ? V::add(V::load_n(p, cols), acc[i][v]) : acc[i][v], cols);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Micro-kernel: C[0:m, 0:n] (+)= sum_k a(:,k) b(k,:) for an MRK x (NVK*W) tile.
// a(i,k) = a[i*rsa + k*csa], b(k,j) = b[k*rsb + j]; rows i < MRK and columns
// j < NVK*W must be readable (zero padding in packed panels). PackedA means
// a is a packed panel (rsa = 1, csa = MRP); PackedB means rsb = NRP. Constant
// strides let the compiler use immediate offsets. m <= MRK and n <= NVK*W bound
// the C update (masked on the last vector). beta1 adds to C, else C is only
// written. The epilogue (the last K block of a tile only): bias, when not
// null, is added per column (bias[j], j < n) after the sum, then relu clamps
// at 0 (NaN stays NaN): the same operations, in the same order, as a separate
// bias add and ReLU pass over C.
//
// CopyB (B in place, rows rsb apart): each row's NVK*W values, once loaded for
// the FMAs, are also stored into the packed micro-panel bp (kc x NVK*W) that
// the block's other row panels then read, so the first row panel's products
// overlap the copy that packing would otherwise do on its own (only part of
// it: reading B from L3 costs more than one row panel's FMAs). B's rows are
// then prefetched 8 rows ahead: they are rsb apart, a page or more, where the
// hardware prefetchers do not follow.
// ---------------------------------------------------------------------------
template <class V, int MRK, int NVK, bool PackedA, bool PackedB, int MRP, int NRP,
          bool CopyB = false>
inline void micro(int64_t kc, const typename V::T* __restrict a, int64_t rsa, int64_t csa,
                  const typename V::T* __restrict b, int64_t rsb, typename V::T* __restrict c,
                  int64_t ldc, int m, int n, bool beta1, const typename V::T* bias, bool relu,
                  typename V::T* __restrict bp = nullptr) {
  static_assert(!(CopyB && PackedB), "CopyB reads B in place");
  using R = typename V::R;
  constexpr int W = V::W;
  if (PackedA) {
    rsa = 1;
    csa = MRP;
  }
  if (PackedB) rsb = NRP;
  // Pull the C tile towards L1 while the k loop runs (it is read at the end).
  FASTNN_UNROLL for (int i = 0; i < MRK; ++i) {
    FASTNN_UNROLL for (int v = 0; v < NVK; ++v) {
      __builtin_prefetch(c + i * ldc + v * W, 1, 3);
    }
  }
  R acc[MRK][NVK];
  FASTNN_UNROLL for (int i = 0; i < MRK; ++i) {
    FASTNN_UNROLL for (int v = 0; v < NVK; ++v) acc[i][v] = V::zero();
  }
  for (int64_t k = 0; k < kc; ++k) {
    R bv[NVK];
    // The packed B panel streams from L2 (the A panel stays in L1): a few
    // rows of look-ahead, about 2% at two threads in paired runs (Xeon
    // 6/207), within that machine's noise.
    if (PackedB && k + 6 < kc) {
      FASTNN_UNROLL for (int v = 0; v < NVK; ++v) __builtin_prefetch(b + 6 * NRP + v * W, 0, 3);
    }
    if (CopyB && k + 8 < kc) {
      FASTNN_UNROLL for (int v = 0; v < NVK; ++v) __builtin_prefetch(b + 8 * rsb + v * W, 0, 3);
    }
    FASTNN_UNROLL for (int v = 0; v < NVK; ++v) {
      bv[v] = PackedB ? V::load(b + v * W) : V::loadu(b + v * W);
      if constexpr (CopyB) V::storeu(bp + v * W, bv[v]);
    }
    if constexpr (CopyB) bp += NVK * W;
    FASTNN_UNROLL for (int i = 0; i < MRK; ++i) {
      R ai = V::set1(a[i * rsa]);
      FASTNN_UNROLL for (int v = 0; v < NVK; ++v) acc[i][v] = V::fma(ai, bv[v], acc[i][v]);
    }
    a += csa;
    b += rsb;
  }
  store_tile<V, MRK, NVK>(acc, c, ldc, m, n, beta1, bias, relu);
}

// Picks the smallest register tile covering m rows x n columns, so ragged
// edges (M = 10, N = 10, ...) do not pay for a full MR x NR tile.
template <class V, bool PackedA, bool PackedB, int MRP, int NRP, int MRK, int NVK>
struct Tile {
  static inline void run(int64_t kc, const typename V::T* a, int64_t rsa, int64_t csa,
                         const typename V::T* b, int64_t rsb, typename V::T* c, int64_t ldc,
                         int m, int n, bool beta1, const typename V::T* bias, bool relu) {
    if constexpr (NVK > 1) {
      if (n <= (NVK - 1) * V::W) {
        Tile<V, PackedA, PackedB, MRP, NRP, MRK, NVK - 1>::run(kc, a, rsa, csa, b, rsb, c, ldc,
                                                              m, n, beta1, bias, relu);
        return;
      }
    }
    if constexpr (MRK > 1) {
      if (m < MRK) {
        Tile<V, PackedA, PackedB, MRP, NRP, MRK - 1, NVK>::run(kc, a, rsa, csa, b, rsb, c, ldc,
                                                              m, n, beta1, bias, relu);
        return;
      }
    }
    micro<V, MRK, NVK, PackedA, PackedB, MRP, NRP>(kc, a, rsa, csa, b, rsb, c, ldc, m, n,
                                                    beta1, bias, relu);
  }
};

template <class V, bool PackedA, bool PackedB, int MR, int NV>
inline void tile(int64_t kc, const typename V::T* a, int64_t rsa, int64_t csa,
                 const typename V::T* b, int64_t rsb, typename V::T* c, int64_t ldc, int m,
                 int n, bool beta1, const typename V::T* bias = nullptr, bool relu = false) {
  if (m == MR && n == NV * V::W) {
    micro<V, MR, NV, PackedA, PackedB, MR, NV * V::W>(kc, a, rsa, csa, b, rsb, c, ldc, m, n,
                                                      beta1, bias, relu);
  } else {
    Tile<V, PackedA, PackedB, MR, NV * V::W, MR, NV>::run(kc, a, rsa, csa, b, rsb, c, ldc, m, n,
                                                          beta1, bias, relu);
  }
}

// ---------------------------------------------------------------------------
// Packing into micro-panels: dst[k*R + r] for k < kc, r < R, zero-padded for
// r >= rv.
// ---------------------------------------------------------------------------

// dst[k*R + r] = src[k*ld + r]   (rows of the panel are contiguous in src)
template <typename T, int R>
inline void pack_copy(const T* __restrict src, int64_t ld, int rv, int64_t kc,
                      T* __restrict dst) {
  if (rv == R) {
    for (int64_t k = 0; k < kc; ++k) std::memcpy(dst + k * R, src + k * ld, sizeof(T) * R);
    return;
  }
  // A ragged panel (the last one, e.g. N = 10 or 16 against NR = 32): whole
  // and masked vectors per row, not a copy call and a zeroing loop per row.
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  if constexpr (R % W == 0) {
    for (int64_t k = 0; k < kc; ++k) {
      T* d = dst + k * R;
      const T* s = src + k * ld;
      FASTNN_UNROLL for (int v = 0; v < R / W; ++v) {
        const int cols = rv - v * W;
        V::storeu(d + v * W, cols >= W  ? V::loadu(s + v * W)
                             : cols > 0 ? V::load_n(s + v * W, cols)
                                        : V::zero());
      }
    }
    return;
  }
  for (int64_t k = 0; k < kc; ++k) {
    T* d = dst + k * R;
    const T* s = src + k * ld;
    int r = 0;
    for (; r < rv; ++r) d[r] = s[r];
    for (; r < R; ++r) d[r] = T(0);
  }
}

#if defined(__AVX__)
// dst[(k)*R + r] = src[r*ld + k] for an 8 x 8 block of floats.
inline void transpose8x8(const float* src, int64_t ld, float* dst, int64_t R) {
  __m256 r0 = _mm256_loadu_ps(src + 0 * ld), r1 = _mm256_loadu_ps(src + 1 * ld);
  __m256 r2 = _mm256_loadu_ps(src + 2 * ld), r3 = _mm256_loadu_ps(src + 3 * ld);
  __m256 r4 = _mm256_loadu_ps(src + 4 * ld), r5 = _mm256_loadu_ps(src + 5 * ld);
  __m256 r6 = _mm256_loadu_ps(src + 6 * ld), r7 = _mm256_loadu_ps(src + 7 * ld);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * R, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + 1 * R, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * R, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * R, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * R, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * R, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * R, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * R, _mm256_permute2f128_ps(s3, s7, 0x31));
}
// Same for a 4 x 4 block of doubles.
inline void transpose4x4(const double* src, int64_t ld, double* dst, int64_t R) {
  __m256d r0 = _mm256_loadu_pd(src + 0 * ld), r1 = _mm256_loadu_pd(src + 1 * ld);
  __m256d r2 = _mm256_loadu_pd(src + 2 * ld), r3 = _mm256_loadu_pd(src + 3 * ld);
  __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
  __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
  _mm256_storeu_pd(dst + 0 * R, _mm256_permute2f128_pd(t0, t2, 0x20));
  _mm256_storeu_pd(dst + 1 * R, _mm256_permute2f128_pd(t1, t3, 0x20));
  _mm256_storeu_pd(dst + 2 * R, _mm256_permute2f128_pd(t0, t2, 0x31));
  _mm256_storeu_pd(dst + 3 * R, _mm256_permute2f128_pd(t1, t3, 0x31));
}
#endif  // __AVX__

#if defined(__SSE2__)
// 4 x 4 floats and 2 x 2 doubles (ragged row groups, e.g. MR = 6 on AVX2).
inline void transpose4x4(const float* src, int64_t ld, float* dst, int64_t R) {
  __m128 r0 = _mm_loadu_ps(src + 0 * ld), r1 = _mm_loadu_ps(src + 1 * ld);
  __m128 r2 = _mm_loadu_ps(src + 2 * ld), r3 = _mm_loadu_ps(src + 3 * ld);
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  _mm_storeu_ps(dst + 0 * R, r0);
  _mm_storeu_ps(dst + 1 * R, r1);
  _mm_storeu_ps(dst + 2 * R, r2);
  _mm_storeu_ps(dst + 3 * R, r3);
}
inline void transpose2x2(const double* src, int64_t ld, double* dst, int64_t R) {
  __m128d r0 = _mm_loadu_pd(src), r1 = _mm_loadu_pd(src + ld);
  _mm_storeu_pd(dst, _mm_unpacklo_pd(r0, r1));
  _mm_storeu_pd(dst + R, _mm_unpackhi_pd(r0, r1));
}
#endif

// TBlock<T, G>::run transposes a G x G block: dst[k*R + r] = src[r*ld + k].
template <typename T, int G>
struct TBlock {
  static constexpr bool ok = false;
  static void run(const T*, int64_t, T*, int64_t) {}
};
#if defined(__AVX__)
template <>
struct TBlock<float, 8> {
  static constexpr bool ok = true;
  static void run(const float* s, int64_t ld, float* d, int64_t R) { transpose8x8(s, ld, d, R); }
};
template <>
struct TBlock<double, 4> {
  static constexpr bool ok = true;
  static void run(const double* s, int64_t ld, double* d, int64_t R) {
    transpose4x4(s, ld, d, R);
  }
};
#endif
#if defined(__SSE2__)
template <>
struct TBlock<float, 4> {
  static constexpr bool ok = true;
  static void run(const float* s, int64_t ld, float* d, int64_t R) { transpose4x4(s, ld, d, R); }
};
template <>
struct TBlock<double, 2> {
  static constexpr bool ok = true;
  static void run(const double* s, int64_t ld, double* d, int64_t R) {
    transpose2x2(s, ld, d, R);
  }
};
#endif

// Transposes whole groups of G rows starting at row r0; returns the next row.
template <typename T, int R, int G>
inline int transpose_groups(const T* __restrict src, int64_t ld, int rv, int64_t kc,
                            T* __restrict dst, int r0) {
  if constexpr (TBlock<T, G>::ok) {
    const int64_t kc_blocked = kc - kc % G;
    for (; r0 + G <= rv; r0 += G) {
      const T* s = src + r0 * ld;
      T* d = dst + r0;
      for (int64_t k = 0; k < kc_blocked; k += G) TBlock<T, G>::run(s + k, ld, d + k * R, R);
      for (int64_t k = kc_blocked; k < kc; ++k) {
        for (int r = 0; r < G; ++r) d[k * R + r] = s[r * ld + k];
      }
    }
  }
  return r0;
}

// dst[k*R + r] = src[r*ld + k]   (each panel row is a row of src)
template <typename T, int R>
inline void pack_transpose(const T* __restrict src, int64_t ld, int rv, int64_t kc,
                           T* __restrict dst) {
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  // A ragged panel's padding: whole zero vectors first (a zeroing loop per
  // row costs more than the transposes), the rows then written over them.
  bool padded = false;
  if constexpr (R % W == 0) {
    if (rv < R) {
      for (int64_t k = 0; k < kc; ++k) {
        FASTNN_UNROLL for (int v = 0; v < R / W; ++v) {
          if (v >= rv / W) V::storeu(dst + k * R + v * W, V::zero());
        }
      }
      padded = true;
    }
  }
  int r0 = transpose_groups<T, R, 8>(src, ld, rv, kc, dst, 0);
  r0 = transpose_groups<T, R, 4>(src, ld, rv, kc, dst, r0);
  r0 = transpose_groups<T, R, 2>(src, ld, rv, kc, dst, r0);
  for (int r = r0; r < rv; ++r) {
    const T* s = src + r * ld;
    for (int64_t k = 0; k < kc; ++k) dst[k * R + r] = s[k];
  }
  if (rv < R && !padded) {
    for (int64_t k = 0; k < kc; ++k) {
      for (int r = rv; r < R; ++r) dst[k * R + r] = T(0);
    }
  }
}

// Packs rows [i0, i0 + rv) of op(A) (M x K view), columns [k0, k0 + kc), as
// one MR x kc micro-panel.
template <typename T, int R>
inline void pack_a_panel(bool trans, const T* A, int64_t lda, int64_t i0, int64_t k0, int rv,
                         int64_t kc, T* dst) {
  if (trans) {
    pack_copy<T, R>(A + k0 * lda + i0, lda, rv, kc, dst);
  } else {
    pack_transpose<T, R>(A + i0 * lda + k0, lda, rv, kc, dst);
  }
}
// Packs columns [j0, j0 + rv) of op(B) (K x N view), rows [k0, k0 + kc), as
// one kc x NR micro-panel.
template <typename T, int R>
inline void pack_b_panel(bool trans, const T* B, int64_t ldb, int64_t j0, int64_t k0, int rv,
                         int64_t kc, T* dst) {
  if (trans) {
    pack_transpose<T, R>(B + j0 * ldb + k0, ldb, rv, kc, dst);
  } else {
    pack_copy<T, R>(B + k0 * ldb + j0, ldb, rv, kc, dst);
  }
}

// ---------------------------------------------------------------------------
// Thread-local, 64-byte aligned scratch, grown on demand and kept for reuse.
// ---------------------------------------------------------------------------
struct PanelBuffer {
  void* p = nullptr;
  size_t bytes = 0;
  ~PanelBuffer() { std::free(p); }
  template <typename T>
  T* get(size_t n) {
    size_t want = n * sizeof(T);
    if (want > bytes) {
      std::free(p);
      p = nullptr;
      bytes = 0;
      size_t rounded = (want + 4095) & ~size_t(4095);
      if (posix_memalign(&p, 4096, rounded) != 0) throw std::bad_alloc();
      bytes = rounded;
      poison_fill(p, bytes);
    }
    return static_cast<T*>(p);
  }
};
// a: packed A, b: packed B, c: K-split partial products, t: transposed C.
thread_local PanelBuffer t_scratch_a, t_scratch_b, t_scratch_c, t_scratch_t;

struct Problem {
  bool ta, tb;
  int64_t M, N, K;
  int64_t lda, ldb;
  Blk blk;  // of the element type; read once per gemm call
};

// A piece of work: rows [m0, m1), columns [n0, n1) and depth [k0, k1) of the
// product, added to (accumulate) or written into c, which points at the
// destination of element (m0, n0) and has row stride ldc. The epilogue
// (bias, indexed by absolute column, and relu) applies once a tile's last
// K block is stored; a K-split partial has none.
template <typename T>
struct Rect {
  int64_t m0, m1, n0, n1, k0, k1;
  T* c;
  int64_t ldc;
  bool accumulate;
  const T* bias = nullptr;
  bool relu = false;
};

// ---------------------------------------------------------------------------
// Packed (large) path.
// ---------------------------------------------------------------------------
template <typename T>
void packed_rect(const Problem& p, const T* A, const T* B, const Rect<T>& r) {
  using Bk = Blocking<T>;
  using V = typename VecOf<T>::type;
  constexpr int MR = Bk::MR, NR = Bk::NR, NV = Bk::NV;
  const int64_t KC = p.blk.KC;
  // Block sizes are whole micro-panels (blocking_for rounds them).
  const int64_t NC = std::min<int64_t>(p.blk.NC, (r.n1 - r.n0 + NR - 1) / NR * NR);
  const int64_t MC = std::min<int64_t>(p.blk.MC, (r.m1 - r.m0 + MR - 1) / MR * MR);
  const int64_t kcmax = std::min<int64_t>(KC, r.k1 - r.k0);
  T* bufB = t_scratch_b.get<T>(size_t(NC * kcmax));
  T* bufA = p.ta ? t_scratch_a.get<T>(size_t(MC * kcmax)) : nullptr;  // see inplace_a

  for (int64_t jc = r.n0; jc < r.n1; jc += NC) {
    const int64_t nc = std::min(NC, r.n1 - jc);
    for (int64_t pc = r.k0; pc < r.k1; pc += KC) {
      const int64_t kc = std::min(KC, r.k1 - pc);
      const bool beta1 = r.accumulate || pc > r.k0;
      const bool last = pc + kc >= r.k1;
      const T* bias = last && r.bias != nullptr ? r.bias + jc : nullptr;
      const bool relu = last && r.relu;
      // An untransposed B is packed by the first row panel's tiles as they
      // run (micro's CopyB), where the rows are few (one MC block): there the
      // copy is a large share of the work and the products hide part of it
      // (1.02-1.05x at one thread on the MNIST linear backward products and
      // 512^2; at 1024^2, 128 row panels, it was 0.98x). Only a ragged last
      // panel, which needs zero padding, is packed here.
      const bool pack_in_tile = !p.tb && r.m1 - r.m0 >= MR && r.m1 - r.m0 <= MC;
      for (int64_t jr = 0; jr < nc; jr += NR) {
        int rv = int(std::min<int64_t>(NR, nc - jr));
        if (pack_in_tile && rv == NR) continue;
        pack_b_panel<T, NR>(p.tb, B, p.ldb, jc + jr, pc, rv, kc, bufB + jr * kc);
      }
      for (int64_t ic = r.m0; ic < r.m1; ic += MC) {
        const int64_t mc = std::min(MC, r.m1 - ic);
        // A row-major (K contiguous) is read in place: a micro-panel's MR row
        // segments (MR x KC, as small as the packed panel) stay in L1 across
        // the jr loop all the same, and the transposing pack is skipped
        // (1-5% on the linear, 512^3 and ragged products; 2048^2 unchanged).
        const bool inplace_a = !p.ta;  // bufA is allocated only otherwise
        if (!inplace_a) {
          for (int64_t ir = 0; ir < mc; ir += MR) {
            int rv = int(std::min<int64_t>(MR, mc - ir));
            pack_a_panel<T, MR>(p.ta, A, p.lda, ic + ir, pc, rv, kc, bufA + ir * kc);
          }
        }
        for (int64_t ir = 0; ir < mc; ir += MR) {
          const int m = int(std::min<int64_t>(MR, mc - ir));
          T* crow = r.c + (ic - r.m0 + ir) * r.ldc + (jc - r.n0);
          // The block's first row panel (m == MR here) packs B (see above).
          const bool packing = pack_in_tile && ic == r.m0 && ir == 0;
          const T* bsrc = B + pc * p.ldb + jc;
          if (inplace_a) {
            const T* ap = A + (ic + ir) * p.lda + pc;
            for (int64_t jr = 0; jr < nc; jr += NR) {
              const int n = int(std::min<int64_t>(NR, nc - jr));
              const T* bj = bias != nullptr ? bias + jr : nullptr;
              if (packing && n == NR) {
                micro<V, MR, NV, false, false, MR, NR, true>(kc, ap, p.lda, 1, bsrc + jr, p.ldb,
                                                             crow + jr, r.ldc, MR, NR, beta1, bj,
                                                             relu, bufB + jr * kc);
              } else {
                tile<V, false, true, MR, NV>(kc, ap, p.lda, 1, bufB + jr * kc, NR, crow + jr,
                                             r.ldc, m, n, beta1, bj, relu);
              }
            }
            continue;
          }
          const T* ap = bufA + ir * kc;
          for (int64_t jr = 0; jr < nc; jr += NR) {
            const int n = int(std::min<int64_t>(NR, nc - jr));
            const T* bj = bias != nullptr ? bias + jr : nullptr;
            if (packing && n == NR) {
              micro<V, MR, NV, true, false, MR, NR, true>(kc, ap, 1, MR, bsrc + jr, p.ldb,
                                                          crow + jr, r.ldc, MR, NR, beta1, bj,
                                                          relu, bufB + jr * kc);
            } else {
              tile<V, true, true, MR, NV>(kc, ap, 1, MR, bufB + jr * kc, NR, crow + jr, r.ldc, m,
                                          n, beta1, bj, relu);
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Unpacked (small) path, no K blocking: A is read in place (ragged rows use a
// tile of exactly that many rows), B in place unless transposed; a transposed
// B and the ragged last column panel are copied into zero-padded panels.
// ---------------------------------------------------------------------------
template <typename T>
void direct_rect(const Problem& p, const T* A, const T* B, const Rect<T>& r) {
  using Bk = Blocking<T>;
  using V = typename VecOf<T>::type;
  constexpr int MR = Bk::MR, NR = Bk::NR, NV = Bk::NV;
  const int64_t kc = r.k1 - r.k0;
  // op(A)(i, k) = A[i*rsa + k*csa]
  const int64_t rsa = p.ta ? 1 : p.lda, csa = p.ta ? p.lda : 1;
  const int64_t nfull = r.n0 + (r.n1 - r.n0) / NR * NR;
  const int64_t bpanel0 = p.tb ? r.n0 : nfull;  // first column held in bufB
  T* bufB = nullptr;
  if (bpanel0 < r.n1) {
    const int64_t cols = (r.n1 - bpanel0 + NR - 1) / NR * NR;
    bufB = t_scratch_b.get<T>(size_t(cols * kc));
    for (int64_t j = bpanel0; j < r.n1; j += NR) {
      int rv = int(std::min<int64_t>(NR, r.n1 - j));
      pack_b_panel<T, NR>(p.tb, B, p.ldb, j, r.k0, rv, kc, bufB + (j - bpanel0) * kc);
    }
  }
  for (int64_t i = r.m0; i < r.m1; i += MR) {
    const int m = int(std::min<int64_t>(MR, r.m1 - i));
    const T* ap = A + i * rsa + r.k0 * csa;
    T* crow = r.c + (i - r.m0) * r.ldc - r.n0;
    for (int64_t j = r.n0; j < bpanel0; j += NR) {
      tile<V, false, false, MR, NV>(kc, ap, rsa, csa, B + r.k0 * p.ldb + j, p.ldb, crow + j,
                                    r.ldc, m, NR, r.accumulate,
                                    r.bias != nullptr ? r.bias + j : nullptr, r.relu);
    }
    for (int64_t j = bpanel0; j < r.n1; j += NR) {
      const int n = int(std::min<int64_t>(NR, r.n1 - j));
      tile<V, false, true, MR, NV>(kc, ap, rsa, csa, bufB + (j - bpanel0) * kc, NR, crow + j,
                                   r.ldc, m, n, r.accumulate,
                                   r.bias != nullptr ? r.bias + j : nullptr, r.relu);
    }
  }
}

// The epilogue on a finished row of C (after a K-split reduction or the
// transpose back from C^T): row[j] = relu?(row[j] + bias[j]), as the separate
// passes would compute it.
template <typename T>
void apply_epilogue(T* __restrict row, int64_t n, const T* bias, bool relu) {
  if (bias != nullptr) {
    for (int64_t j = 0; j < n; ++j) row[j] += bias[j];
  }
  if (relu) {
    // NaN compares false and passes, like the relu kernel.
    for (int64_t j = 0; j < n; ++j) row[j] = row[j] < T(0) ? T(0) : row[j];
  }
}

// ---------------------------------------------------------------------------
// Work split across threads.
// ---------------------------------------------------------------------------
struct Plan {
  int64_t tm = 1, tn = 1, tk = 1;  // threads over M, N and K (tk > 1 only alone)
  int64_t threads() const { return tm * tn * tk; }
};

// Each thread packs (M/tm + N/tn) * K elements on a tm x tn grid; splitting K
// instead packs (M + N) * K / tk each but then sums tk partial M x N products.
// Long-K, small-output problems (the MNIST linear forward, 128x128x5408) gain
// most from the K split.
template <typename T>
Plan make_plan(const Problem& p, int64_t nt, bool allow_k_split) {
  using Bk = Blocking<T>;
  const int64_t mpanels = (p.M + Bk::MR - 1) / Bk::MR, npanels = (p.N + Bk::NR - 1) / Bk::NR;
  Plan best;
  double best_cost = -1;
  for (int64_t t = std::min(nt, mpanels * npanels); t >= 1 && best_cost < 0; --t) {
    for (int64_t tm = 1; tm <= t; ++tm) {
      if (t % tm) continue;
      const int64_t tn = t / tm;
      if (tm > mpanels || tn > npanels) continue;
      const double cost = (double(p.M) / tm + double(p.N) / tn) * double(p.K);
      if (best_cost < 0 || cost < best_cost) {
        best_cost = cost;
        best.tm = tm;
        best.tn = tn;
      }
    }
  }
  if (allow_k_split && nt > 1) {
    const int64_t tk = std::min<int64_t>(nt, std::max<int64_t>(1, p.K / (2 * p.blk.KC)));
    if (tk > 1) {
      // The reduction reads and writes every partial once.
      const double cost = (double(p.M) + double(p.N)) * double(p.K) / double(tk) +
                          2.0 * double(p.M) * double(p.N);
      if (cost < 0.8 * best_cost || best.threads() < tk) {
        best = Plan{};
        best.tk = tk;
      }
    }
  }
  return best;
}

template <typename T, typename Body>
void run_plan(const Problem& p, const Plan& plan, T* C, int64_t ldc, bool accumulate,
              const T* bias, bool relu, Body body) {
  using Bk = Blocking<T>;
  constexpr int MR = Bk::MR, NR = Bk::NR;
  if (plan.tk > 1) {
    // Thread 0 writes C; the others write partial products that the caller
    // then adds in. Panels of K are multiples of KC so blocking is unchanged.
    const int64_t tk = plan.tk, MN = p.M * p.N;
    T* part = t_scratch_c.get<T>(size_t((tk - 1) * MN));
    const int64_t KC = p.blk.KC;
    const int64_t kblocks = (p.K + KC - 1) / KC;
    auto chunk = [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t k0 = std::min(p.K, kblocks * t / tk * KC);
        const int64_t k1 = std::min(p.K, kblocks * (t + 1) / tk * KC);
        if (t == 0) {
          body(Rect<T>{0, p.M, 0, p.N, k0, k1, C, ldc, accumulate});
        } else if (k0 < k1) {
          body(Rect<T>{0, p.M, 0, p.N, k0, k1, part + (t - 1) * MN, p.N, false});
        } else {
          std::memset(part + (t - 1) * MN, 0, sizeof(T) * size_t(MN));
        }
      }
    };
    parallel_for(tk, 1, chunk);
    for (int64_t i = 0; i < p.M; ++i) {
      T* __restrict crow = C + i * ldc;
      for (int64_t t = 1; t < tk; ++t) {
        const T* __restrict prow = part + (t - 1) * MN + i * p.N;
        for (int64_t j = 0; j < p.N; ++j) crow[j] += prow[j];
      }
      apply_epilogue(crow, p.N, bias, relu);
    }
    return;
  }
  const int64_t tm = plan.tm, tn = plan.tn;
  const int64_t mpanels = (p.M + MR - 1) / MR, npanels = (p.N + NR - 1) / NR;
  auto chunk = [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t ti = t / tn, tj = t % tn;
      const int64_t m0 = std::min(p.M, mpanels * ti / tm * MR);
      const int64_t m1 = std::min(p.M, mpanels * (ti + 1) / tm * MR);
      const int64_t n0 = std::min(p.N, npanels * tj / tn * NR);
      const int64_t n1 = std::min(p.N, npanels * (tj + 1) / tn * NR);
      if (m0 < m1 && n0 < n1) {
        body(Rect<T>{m0, m1, n0, n1, 0, p.K, C + m0 * ldc + n0, ldc, accumulate, bias, relu});
      }
    }
  };
  if (tm * tn == 1) {
    chunk(0, 1);
  } else {
    parallel_for(tm * tn, 1, chunk);
  }
}

template <typename T>
void gemm_impl(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
               int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate,
               const T* bias, bool relu) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i) {
      if (!accumulate) std::memset(C + i * ldc, 0, sizeof(T) * size_t(N));
      apply_epilogue(C + i * ldc, N, bias, relu);
    }
    return;
  }
  const Problem p{trans_a, trans_b, M, N, K, lda, ldb, blocking_for<T>(cache_sizes())};
  const double work = double(M) * double(N) * double(K);
  // A thread pays off once it gets a few microseconds of work (a double FMA
  // costs two float ones). Inside a parallel_for body (e.g. a conv's per-image
  // gemm) the pool is taken, so plan for one thread rather than split work
  // that would then run serially.
  const int64_t nt =
      in_parallel_region()
          ? 1
          : std::max<int64_t>(1, std::min<int64_t>(get_num_threads(),
                                                   int64_t(work * (sizeof(T) / 4.0) /
                                                           (48.0 * 48 * 48))));
  const bool small = K <= 512 && work <= 96.0 * 96 * 96;
  auto run = [&](const Problem& q, const T* a, const T* b, T* c, int64_t ldc_, bool acc,
                 const T* bias_, bool relu_) {
    if (small) {
      run_plan<T>(q, make_plan<T>(q, nt, false), c, ldc_, acc, bias_, relu_,
                  [&](const Rect<T>& r) { direct_rect<T>(q, a, b, r); });
    } else {
      run_plan<T>(q, make_plan<T>(q, nt, true), c, ldc_, acc, bias_, relu_,
                  [&](const Rect<T>& r) { packed_rect<T>(q, a, b, r); });
    }
  };
  // Narrow C (N a few vectors at most, e.g. a 10-class output layer) with a
  // ragged last vector: many vector lanes would idle, so compute C^T = op(B)^T op(A)^T
  // (N x M, M along the vectors, exact-height tiles for the N rows) into
  // scratch and transpose it into C. Compared per k in vector operations
  // (lanes here, lanes_t there). Up to K = 512, where this path reads an
  // untransposed A in place and C^T must transpose it, that pack counts too
  // (about 3 operations per vector of A) and pays only while A sits in L2:
  // measured on a Xeon 6/207 at 1 and 2 threads, the MNIST output layer
  // (128x128x10, B^T) and 1024x128x10 ran 1.2x and 1.4-1.55x faster direct,
  // 512x512x1 1.15-1.4x, while 128x128 with N <= 8 and 128x5408x10 (long K)
  // stayed faster through C^T (1.05-1.3x).
  constexpr int64_t W = VecOf<T>::type::W;
  const bool short_k = K <= 512 && !trans_a;
  const double lanes = double(M) * double((N + W - 1) / W);
  const double lanes_t =
      double(N) * double((M + W - 1) / W) + (short_k ? 3.0 * double((M + W - 1) / W) : 0.0);
  const bool a_in_l2 = !short_k || double(M) * double(K) * sizeof(T) <= cache_sizes().l2 / 4;
  if (N < 4 * W && a_in_l2 && 1.25 * lanes_t < lanes) {
    T* ct = t_scratch_t.get<T>(size_t(N * M));
    Problem q = p;
    q.ta = !trans_b;
    q.tb = !trans_a;
    q.M = N;
    q.N = M;
    q.lda = ldb;
    q.ldb = lda;
    run(q, B, A, ct, M, false, nullptr, false);
    for (int64_t i = 0; i < M; ++i) {
      T* __restrict crow = C + i * ldc;
      for (int64_t j = 0; j < N; ++j) {
        crow[j] = accumulate ? crow[j] + ct[j * M + i] : ct[j * M + i];
      }
      apply_epilogue(crow, N, bias, relu);
    }
    return;
  }
  run(p, A, B, C, ldc, accumulate, bias, relu);
}

}  // namespace

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
          const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  gemm_impl<T>(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate, nullptr, false);
}

template <typename T>
void gemm_bias_relu(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
                    int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate,
                    const T* bias, bool relu) {
  gemm_impl<T>(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate, bias, relu);
}

template <typename T>
void gemm_blocking(int64_t out[5]) {
  using Bk = Blocking<T>;
  const Blk b = blocking_for<T>(cache_sizes());
  out[0] = Bk::MR;
  out[1] = Bk::NR;
  out[2] = b.KC;
  out[3] = b.MC;
  out[4] = b.NC;
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t,
                          const float*, int64_t, float*, int64_t, bool);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, const double*, int64_t,
                           const double*, int64_t, double*, int64_t, bool);
template void gemm_bias_relu<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t,
                                    const float*, int64_t, float*, int64_t, bool, const float*,
                                    bool);
template void gemm_bias_relu<double>(bool, bool, int64_t, int64_t, int64_t, const double*,
                                     int64_t, const double*, int64_t, double*, int64_t, bool,
                                     const double*, bool);
template void gemm_blocking<float>(int64_t*);
template void gemm_blocking<double>(int64_t*);

}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
