// conv2d forward, backward-input and backward-weight for one ISA build.
//
// Strategies, chosen per shape:
//
// * one input channel, 3x3, stride 1, no padding (the MNIST first layer,
//   1 -> 32 channels): kernels/conv_small.h, which avoids the im2col matrix.
// * small-K direct kernels, when K = C/groups * KH * KW <= 9 (e.g. that layer
//   with padding): the K im2col rows of a block of output
//   pixels sit in vector registers and every output channel is a short chain of
//   FMAs on them (bias fused). A generic GEMM would spend most of its time
//   packing such skinny operands.
// * Winograd for stride-1 undilated 3x3 convs with >= 8 channels each way
//   (deeper layers, e.g. 32 -> 64 on 13x13): F(4x4, 3x3) on AVX-512 float32
//   where its tiles fit the plane (winograd_f4.h: output rows 13..16 wide;
//   winograd_f4_rows.h: 5..12 and 17..28 wide), else F(2x2, 3x3) (winograd.h).
// * im2col + gemm otherwise (other deep layers, strides, dilations): per image and
//   group, a block of output rows is unfolded into a (K, rows*OW) column matrix
//   small enough to stay in L2, and the ISA's gemm does the work. 1x1 stride-1
//   unpadded convs use the input directly as the column matrix.
//
// Work is split over (image, group, row block) for forward and backward-input,
// and over contiguous image ranges with private weight-gradient partials
// (summed in a fixed order, so results do not depend on timing) for
// backward-weight. When there are fewer tasks than threads the loop runs on
// the caller and gemm parallelizes inside instead.
#include <algorithm>

#include "fastnn/cpuinfo.h"
#include "fastnn/parallel.h"
#include "kernels/ops.h"
#include "kernels/conv_small.h"
#include "kernels/image_ranges.h"
#include "kernels/simd.h"
#include "kernels/winograd.h"
#include "kernels/winograd_f4.h"
#include "kernels/winograd_f4_rows.h"

namespace fastnn {
namespace FASTNN_ISA_NS {

namespace {

using simd::Vec;
using simd::kVecRegs;

// Largest K handled by the register-resident small-K kernels.
constexpr int64_t kSmallK = 9;
// Elements of one im2col block for the gemm path: one core's L2 of float32.
const int64_t kColBlock = cache_sizes().l2 / int64_t(sizeof(float));

struct Geom {
  int64_t G, Cg, Og, K, P;  // groups, channels/outputs per group, K = Cg*KH*KW, OH*OW
  bool direct;              // 1x1, stride 1, no padding: x is its own im2col
  bool small;               // small-K direct kernels
  bool wino;                // Winograd F(4x4) or F(2x2) (all three passes)
};

// Winograd (stride-1 undilated 3x3): F(4x4, 3x3) (AVX-512 float32; output
// rows 13..16 wide, e.g. the 32 -> 64 13x13 layer, in winograd_f4.h, 5..12
// and 17..28 wide, e.g. the strong preset's planes, in winograd_f4_rows.h) where
// its padded product count is clearly below F(2x2)'s, else F(2x2, 3x3)
// (winograd.h; every ISA and dtype); see wino4_*.
// Winograd pays off once both channel counts fill a gemm reasonably. Its
// transformed input and products for one image take 16 * (Cin + Cout) * tiles
// elements; larger planes use the row-blocked im2col path instead.
constexpr int64_t kWinoMinChannels = 8;
constexpr int64_t kWinoMaxElems = int64_t(1) << 21;

Geom geom(const Conv2dParams& p) {
  Geom g;
  g.G = p.groups;
  g.Cg = p.C / p.groups;
  g.Og = p.O / p.groups;
  g.K = g.Cg * p.KH * p.KW;
  g.P = p.OH * p.OW;
  g.direct = p.KH == 1 && p.KW == 1 && p.sh == 1 && p.sw == 1 && p.ph == 0 && p.pw == 0 &&
             p.OH == p.H && p.OW == p.W;
  g.small = g.K <= kSmallK;
  const int64_t tiles = std::max((p.OH + 1) / 2 * ((p.OW + 1) / 2), (p.H + 1) / 2 * ((p.W + 1) / 2));
  g.wino = p.KH == 3 && p.KW == 3 && p.sh == 1 && p.sw == 1 && p.dh == 1 && p.dw == 1 &&
           g.Cg >= kWinoMinChannels && g.Og >= kWinoMinChannels && p.OH >= 2 && p.OW >= 2 &&
           16 * (g.Cg + g.Og) * tiles <= kWinoMaxElems;
  return g;
}

// Output rows per block: the gemm path keeps a block's columns near L2 size;
// the small-K path takes whole images unless there are too few to keep every
// thread busy.
int64_t rows_per_block(const Conv2dParams& p, const Geom& g, int64_t images) {
  if (g.direct) return p.OH;
  const int64_t cap = std::max<int64_t>(1, kColBlock / std::max<int64_t>(1, g.K * p.OW));
  int64_t rows = std::min(p.OH, cap);
  const int64_t want = 4 * get_num_threads();  // tasks for decent load balance
  const int64_t have = images * g.G;
  if (have < want && p.OH > 1) {
    const int64_t split = std::min(p.OH, (want + have - 1) / have);
    rows = std::min(rows, (p.OH + split - 1) / split);
  }
  return std::max<int64_t>(1, rows);
}

// Runs body(t0, t1) over [0, tasks): through the pool when there is one task
// per thread at least, else on the caller (so a gemm inside can use the pool).
template <typename F>
void run_tasks(int64_t tasks, const F& body) {
  if (tasks <= 0) return;
  if (tasks >= get_num_threads() && get_num_threads() > 1) {
    parallel_for(tasks, 1, [&](int64_t b, int64_t e) { body(b, e); });
  } else {
    body(0, tasks);
  }
}

// --- row helpers --------------------------------------------------------------

template <typename T>
inline void copy_row(T* __restrict dst, const T* __restrict src, int64_t n) {
  using V = Vec<T>;
  int64_t i = 0;
  for (; i + V::L <= n; i += V::L) V::storeu(dst + i, V::loadu(src + i));
  if (i < n) V::storep(dst + i, V::loadp(src + i, n - i), n - i);
}

// dst[i] = src[2*i] for i < n (stride-2 im2col rows). Reads only the 2n-1
// elements it uses, so the last row of an array is safe.
template <typename T>
inline void copy_row_s2(T* __restrict dst, const T* __restrict src, int64_t n) {
  using V = Vec<T>;
  for (int64_t i = 0; i < n; i += V::L) {
    const int64_t m = std::min<int64_t>(V::L, n - i), e = 2 * m - 1;
    typename V::reg even, odd;
    V::deinterleave(V::loadp(src + 2 * i, std::min<int64_t>(e, V::L)),
                    V::loadp(src + 2 * i + V::L, std::max<int64_t>(0, e - V::L)), even, odd);
    V::storep(dst + i, even, m);
  }
}

// dst[2*i] += src[i] for i < n (stride-2 col2im rows); odd cells untouched.
template <typename T>
inline void add_row_s2(T* __restrict dst, const T* __restrict src, int64_t n) {
  using V = Vec<T>;
  for (int64_t i = 0; i < n; i += V::L) {
    const int64_t m = std::min<int64_t>(V::L, n - i), e = 2 * m - 1;
    const int64_t nlo = std::min<int64_t>(e, V::L), nhi = std::max<int64_t>(0, e - V::L);
    typename V::reg even, odd, lo, hi;
    V::deinterleave(V::loadp(dst + 2 * i, nlo), V::loadp(dst + 2 * i + V::L, nhi), even, odd);
    V::interleave(V::add(even, V::loadp(src + i, m)), odd, lo, hi);
    V::storep(dst + 2 * i, lo, nlo);
    V::storep(dst + 2 * i + V::L, hi, nhi);
  }
}

// Unfolds output rows [oh0, oh1) of one image/group xg (Cg, H, W) into
// col (K, (oh1-oh0)*OW); row (c*KH + kh)*KW + kw, matching OIHW weights.
template <typename T>
void im2col(const Conv2dParams& p, int64_t Cg, const T* __restrict xg, int64_t oh0, int64_t oh1,
            T* __restrict col) {
  const int64_t OW = p.OW, ld = (oh1 - oh0) * OW;
  for (int64_t c = 0; c < Cg; ++c) {
    const T* plane = xg + c * p.H * p.W;
    for (int64_t kh = 0; kh < p.KH; ++kh) {
      for (int64_t kw = 0; kw < p.KW; ++kw) {
        T* dst = col + ((c * p.KH + kh) * p.KW + kw) * ld;
        const int64_t off = kw * p.dw - p.pw;  // input column = ow*sw + off
        int64_t lo, hi;
        valid_range(p.W, p.sw, off, OW, lo, hi);
        for (int64_t oh = oh0; oh < oh1; ++oh, dst += OW) {
          const int64_t ih = oh * p.sh - p.ph + kh * p.dh;
          if (ih < 0 || ih >= p.H || lo >= hi) {
            zero_row(dst, OW);
            continue;
          }
          const T* src = plane + ih * p.W;
          for (int64_t o = 0; o < lo; ++o) dst[o] = T(0);
          if (p.sw == 1) {
            copy_row(dst + lo, src + lo + off, hi - lo);
          } else if (p.sw == 2) {
            copy_row_s2(dst + lo, src + 2 * lo + off, hi - lo);
          } else {
            for (int64_t o = lo; o < hi; ++o) dst[o] = src[o * p.sw + off];
          }
          for (int64_t o = hi; o < OW; ++o) dst[o] = T(0);
        }
      }
    }
  }
}

// The column matrix of output rows [oh0, oh1) of one image/group xg, with its
// row stride in ldc: xg itself for 1x1 stride-1 unpadded convs, else unfolded
// into col.
template <typename T>
const T* columns(const Conv2dParams& p, const Geom& g, const T* xg, int64_t oh0, int64_t oh1,
                 T* col, int64_t& ldc) {
  if (g.direct) {
    ldc = g.P;
    return xg + oh0 * p.OW;
  }
  im2col(p, g.Cg, xg, oh0, oh1, col);
  ldc = (oh1 - oh0) * p.OW;
  return col;
}

// Adjoint of im2col: adds col (K, (oh1-oh0)*OW) into gxg (Cg, H, W).
template <typename T>
void col2im_add(const Conv2dParams& p, int64_t Cg, const T* __restrict col, int64_t oh0,
                int64_t oh1, T* __restrict gxg) {
  const int64_t OW = p.OW, ld = (oh1 - oh0) * OW;
  for (int64_t c = 0; c < Cg; ++c) {
    T* plane = gxg + c * p.H * p.W;
    for (int64_t kh = 0; kh < p.KH; ++kh) {
      for (int64_t kw = 0; kw < p.KW; ++kw) {
        const T* src = col + ((c * p.KH + kh) * p.KW + kw) * ld;
        const int64_t off = kw * p.dw - p.pw;
        int64_t lo, hi;
        valid_range(p.W, p.sw, off, OW, lo, hi);
        if (lo >= hi) continue;
        for (int64_t oh = oh0; oh < oh1; ++oh, src += OW) {
          const int64_t ih = oh * p.sh - p.ph + kh * p.dh;
          if (ih < 0 || ih >= p.H) continue;
          T* dst = plane + ih * p.W;
          if (p.sw == 1) {
            add_row(dst + lo + off, src + lo, hi - lo);
          } else if (p.sw == 2) {
            add_row_s2(dst + 2 * lo + off, src + lo, hi - lo);
          } else {
            for (int64_t o = lo; o < hi; ++o) dst[o * p.sw + off] += src[o];
          }
        }
      }
    }
  }
}

// --- small-K kernels ----------------------------------------------------------

// Vectors per column block: as many as registers allow (K*NV + NV + 1 live).
template <int K>
constexpr int small_nv() {
  return std::max(1, std::min(2, (kVecRegs - 2) / (K + 1)));
}

// y (Og, n) [ld ldy] = w (Og, K) @ col (K, n) [ld ldc] (+ bias per row).
template <typename T, int K>
void small_fwd(const T* __restrict w, const T* __restrict bias, const T* __restrict col,
               int64_t ldc, int64_t Og, int64_t n, T* __restrict y, int64_t ldy) {
  using V = Vec<T>;
  using R = typename V::reg;
  constexpr int NV = small_nv<K>();
  constexpr int64_t step = NV * V::L;
  int64_t p0 = 0;
  for (; p0 + step <= n; p0 += step) {
    R c[K][NV];
    for (int k = 0; k < K; ++k)
      for (int v = 0; v < NV; ++v) c[k][v] = V::loadu(col + k * ldc + p0 + v * V::L);
    for (int64_t o = 0; o < Og; ++o) {
      // Og output rows are written a few lines at a time; claim the lines of
      // a later block early so the stores do not wait for them.
      T* next = y + o * ldy + p0 + 2 * step;
      __builtin_prefetch(next, 1);
      if (step * sizeof(T) > 64) __builtin_prefetch(next + 64 / sizeof(T), 1);
      const T* wo = w + o * K;
      R acc[NV];
      const R b0 = bias ? V::set1(bias[o]) : V::zero();
      for (int v = 0; v < NV; ++v) acc[v] = b0;
      for (int k = 0; k < K; ++k) {
        const R wk = V::set1(wo[k]);
        for (int v = 0; v < NV; ++v) acc[v] = V::fma(wk, c[k][v], acc[v]);
      }
      for (int v = 0; v < NV; ++v) V::storeu(y + o * ldy + p0 + v * V::L, acc[v]);
    }
  }
  for (; p0 < n; p0 += V::L) {  // tail, one (partial) vector at a time
    const int64_t m = std::min<int64_t>(V::L, n - p0);
    R c[K];
    for (int k = 0; k < K; ++k) c[k] = V::loadp(col + k * ldc + p0, m);
    for (int64_t o = 0; o < Og; ++o) {
      R acc = bias ? V::set1(bias[o]) : V::zero();
      for (int k = 0; k < K; ++k) acc = V::fma(V::set1(w[o * K + k]), c[k], acc);
      V::storep(y + o * ldy + p0, acc, m);
    }
  }
}

// dcol (K, n) [ld ldd] = w^T (K, Og) @ gy (Og, n) [ld ldg].
template <typename T, int K>
void small_bwd_in(const T* __restrict w, const T* __restrict gy, int64_t ldg, int64_t Og,
                  int64_t n, T* __restrict dcol, int64_t ldd) {
  using V = Vec<T>;
  using R = typename V::reg;
  constexpr int NV = small_nv<K>();
  constexpr int64_t step = NV * V::L;
  int64_t p0 = 0;
  for (; p0 + step <= n; p0 += step) {
    R acc[K][NV];
    for (int k = 0; k < K; ++k)
      for (int v = 0; v < NV; ++v) acc[k][v] = V::zero();
    for (int64_t o = 0; o < Og; ++o) {
      // Og rows are read a few lines at a time: too many streams for the
      // hardware prefetcher, so fetch the next block's lines explicitly.
      const T* next = gy + o * ldg + p0 + 2 * step;
      __builtin_prefetch(next);
      if (step * sizeof(T) > 64) __builtin_prefetch(next + 64 / sizeof(T));
      R g[NV];
      for (int v = 0; v < NV; ++v) g[v] = V::loadu(gy + o * ldg + p0 + v * V::L);
      for (int k = 0; k < K; ++k) {
        const R wk = V::set1(w[o * K + k]);
        for (int v = 0; v < NV; ++v) acc[k][v] = V::fma(wk, g[v], acc[k][v]);
      }
    }
    for (int k = 0; k < K; ++k)
      for (int v = 0; v < NV; ++v) V::storeu(dcol + k * ldd + p0 + v * V::L, acc[k][v]);
  }
  for (; p0 < n; p0 += V::L) {
    const int64_t m = std::min<int64_t>(V::L, n - p0);
    R acc[K];
    for (int k = 0; k < K; ++k) acc[k] = V::zero();
    for (int64_t o = 0; o < Og; ++o) {
      const R g = V::loadp(gy + o * ldg + p0, m);
      for (int k = 0; k < K; ++k) acc[k] = V::fma(V::set1(w[o * K + k]), g, acc[k]);
    }
    for (int k = 0; k < K; ++k) V::storep(dcol + k * ldd + p0, acc[k], m);
  }
}

// Vector partial sums acc (RB rows starting at gy's row, K, L lanes) +=
// gy (RB, n) [ld ldg] (x) col (K, n) [ld ldc], lane-wise: the lanes are summed
// only once at the end of all images (a horizontal sum per image and (o, k)
// would cost as much as the products of a small image).
template <typename T, int K, int RB>
void small_bwd_w_rows(const T* __restrict gy, int64_t ldg, const T* __restrict col, int64_t ldc,
                      int64_t n, T* __restrict accv) {
  using V = Vec<T>;
  using R = typename V::reg;
  R acc[RB][K];
  for (int r = 0; r < RB; ++r)
    for (int k = 0; k < K; ++k) acc[r][k] = V::loadu(accv + (r * K + k) * V::L);
  int64_t p0 = 0;
  for (; p0 + V::L <= n; p0 += V::L) {
    // Rows are short, so the hardware prefetcher barely ramps up before a row
    // ends: fetch the next row block at the same offset while this one runs
    // (prefetches past the array end are harmless).
    for (int r = 0; r < RB; ++r) __builtin_prefetch(gy + (r + RB) * ldg + p0);
    R g[RB];
    for (int r = 0; r < RB; ++r) g[r] = V::loadu(gy + r * ldg + p0);
    for (int k = 0; k < K; ++k) {
      const R c = V::loadu(col + k * ldc + p0);
      for (int r = 0; r < RB; ++r) acc[r][k] = V::fma(g[r], c, acc[r][k]);
    }
  }
  if (p0 < n) {  // zero-filled partial vectors add nothing
    const int64_t m = n - p0;
    R g[RB];
    for (int r = 0; r < RB; ++r) g[r] = V::loadp(gy + r * ldg + p0, m);
    for (int k = 0; k < K; ++k) {
      const R c = V::loadp(col + k * ldc + p0, m);
      for (int r = 0; r < RB; ++r) acc[r][k] = V::fma(g[r], c, acc[r][k]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int k = 0; k < K; ++k) V::storeu(accv + (r * K + k) * V::L, acc[r][k]);
}

// accv (Og, K, L lanes) += lane-wise gy (Og, n) (x) col (K, n).
template <typename T, int K>
void small_bwd_w(const T* gy, int64_t ldg, const T* col, int64_t ldc, int64_t Og, int64_t n,
                 T* accv) {
  constexpr int64_t L = Vec<T>::L;
  // Rows per pass: RB*K accumulators + RB gy vectors + col in registers.
  constexpr int RB = std::max(1, std::min(4, (kVecRegs - 4) / (K + 1)));
  int64_t o = 0;
  for (; o + RB <= Og; o += RB)
    small_bwd_w_rows<T, K, RB>(gy + o * ldg, ldg, col, ldc, n, accv + o * K * L);
  for (; o < Og; ++o) small_bwd_w_rows<T, K, 1>(gy + o * ldg, ldg, col, ldc, n, accv + o * K * L);
}

// Run-time K -> template K.
#define FASTNN_SMALLK_SWITCH(K, CALL) \
  switch (K) {                        \
    case 1: CALL(1); break;           \
    case 2: CALL(2); break;           \
    case 3: CALL(3); break;           \
    case 4: CALL(4); break;           \
    case 5: CALL(5); break;           \
    case 6: CALL(6); break;           \
    case 7: CALL(7); break;           \
    case 8: CALL(8); break;           \
    case 9: CALL(9); break;           \
    default: break;                   \
  }

template <typename T>
void fill_bias_rows(T* y, int64_t ld, const T* bias, int64_t rows, int64_t n) {
  using V = Vec<T>;
  for (int64_t o = 0; o < rows; ++o) {
    const typename V::reg b = V::set1(bias ? bias[o] : T(0));
    T* row = y + o * ld;
    int64_t i = 0;
    for (; i + V::L <= n; i += V::L) V::storeu(row + i, b);
    if (i < n) V::storep(row + i, b, n - i);
  }
}

// --- one input channel, 3x3 (conv_small.h) ------------------------------------

// Forward over (image, row block) tasks; row blocks as for the small-K path.
template <typename T>
void conv_small_forward(const Conv2dParams& p, const Geom& g, const T* x, const T* w, const T* b,
                        T* y) {
  constexpr int64_t L = Vec<T>::L;
  const int64_t rows = rows_per_block(p, g, p.N);
  const int64_t nblk = (p.OH + rows - 1) / rows;
  const bool wino = conv_small::wino_applies(p);
  Scratch<T> u(kSlotWeights, wino ? p.O * 12 : 0);
  if (wino) conv_small::wino_fwd_weights(w, p.O, u.get());
  // Shift planes (3, (rows+2)*OW) or tile planes (12, rows*OW/2), aligned.
  const int64_t ld = ((wino ? rows * (p.OW / 2) : (rows + 2) * p.OW) + L - 1) / L * L;
  run_tasks(p.N * nblk, [&](int64_t t0, int64_t t1) {
    Scratch<T> xs(kSlotCol, (wino ? 12 : 3) * ld);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = t % nblk, n = t / nblk;
      const int64_t oh0 = blk * rows, oh1 = std::min(p.OH, oh0 + rows);
      const T* xb = x + (n * p.H + oh0) * p.W;
      T* yb = y + n * p.O * g.P + oh0 * p.OW;
      if (wino) {
        conv_small::wino_tile_planes(xb, oh1 - oh0 + 2, p.W, xs.get(), ld);
        conv_small::wino_fwd(u.get(), b, xs.get(), ld, (oh1 - oh0) * (p.OW / 2), p.O, yb, g.P);
      } else {
        conv_small::shift_planes(xb, p.W, oh1 - oh0 + 2, p.OW, xs.get(), ld);
        conv_small::fwd<T, conv_small::kFwdNV, conv_small::kFwdCO>(w, b, xs.get(), ld, p.OW, p.O,
                                                                   (oh1 - oh0) * p.OW, yb, g.P);
      }
    }
  });
}

// Backward-input, one image per task: dcol, then the flat 9-way col2im sum.
template <typename T>
void conv_small_backward_input(const Conv2dParams& p, const Geom& g, const T* gy, const T* w,
                               T* gx) {
  constexpr int64_t L = Vec<T>::L;
  if (conv_small::wino_applies(p)) {
    const int64_t TT = p.OW / 2, Q = p.OH * TT, ld = (Q + L - 1) / L * L;
    Scratch<T> u(kSlotWeights, p.O * 12);
    conv_small::wino_bwd_in_weights(w, p.O, u.get());
    run_tasks(p.N, [&](int64_t n0, int64_t n1) {
      Scratch<T> dv(kSlotCol, 12 * ld + 4 * (TT + 1 + L));
      for (int64_t n = n0; n < n1; ++n) {
        conv_small::wino_bwd_in_dv(u.get(), gy + n * p.O * g.P, g.P, p.O, Q, dv.get(), ld);
        conv_small::wino_bwd_in_col2im(dv.get(), ld, p.OH, TT, gx + n * p.H * p.W,
                                       dv.get() + 12 * ld);
      }
    });
    return;
  }
  // dcol planes start on vector boundaries, so its block stores are aligned.
  const int64_t ldd = (g.P + L - 1) / L * L;
  run_tasks(p.N, [&](int64_t n0, int64_t n1) {
    Scratch<T> d(kSlotCol, 9 * ldd);
    for (int64_t n = n0; n < n1; ++n) {
      conv_small::bwd_in_image<T, conv_small::kDcolNV>(p.OH, p.OW, w, gy + n * p.O * g.P, g.P,
                                                       p.O, d.get(), ldd, gx + n * p.H * p.W);
    }
  });
}

// Backward-weight: contiguous image ranges with private lane-wise partials,
// each range's lanes summed once, ranges added in order (deterministic).
template <typename T>
void conv_small_backward_weight(const Conv2dParams& p, const Geom& g, const T* gy, const T* x,
                                T* gw) {
  constexpr int64_t L = Vec<T>::L;
  const int64_t wsize = p.O * 9;
  const bool wino = conv_small::wino_applies(p);
  // Shift planes (3, H*OW), or for Winograd 2 of them + the tile blocks
  // (ceil(Q/L), 12, L) of the Q = OH*OW/2 tiles; planes vector-aligned.
  const int64_t ld = (p.H * p.OW + L - 1) / L * L;
  const int64_t blocks_len = (p.OH * (p.OW / 2) + L - 1) / L * 12 * L;
  const int64_t lane_len = p.O * (wino ? 12 * conv_small::Folded<T>::kLen : 9 * L);
  sum_over_image_ranges(kSlotPartial, p.N, wsize, gw, [&](int64_t n0, int64_t n1, T* acc) {
    Scratch<T> xs(kSlotCol, wino ? 2 * ld + blocks_len : 3 * ld);
    Scratch<T> lanes(kSlotLanes, lane_len);
    lanes.zero(lane_len);
    for (int64_t n = n0; n < n1; ++n) {
      const T* xn = x + n * p.H * p.W;
      const T* gyn = gy + n * p.O * g.P;
      if (wino) {
        T* vb = xs.get() + 2 * ld;
        conv_small::wino_bwd_w_blocks(xn, p.H, p.W, xs.get(), ld, vb);
        conv_small::wino_bwd_w(gyn, g.P, vb, p.OH, p.OW, p.O, lanes.get());
      } else {
        conv_small::shift_planes(xn, p.W, p.H, p.OW, xs.get(), ld);
        conv_small::bwd_w(gyn, g.P, xs.get(), ld, p.OW, p.O, g.P, lanes.get());
      }
    }
    if (wino) {
      conv_small::wino_bwd_w_finish(lanes.get(), p.O, acc);
    } else {
      for (int64_t i = 0; i < wsize; ++i) acc[i] = Vec<T>::hsum(Vec<T>::loadu(lanes.get() + i * L));
    }
  });
}

// --- Winograd F(4x4, 3x3) -----------------------------------------------------
// Used instead of F(2x2) where winograd_f4_rows.h (AVX-512 float32, output
// rows 5..12 or 17..28 wide) or winograd_f4.h (13..16 wide, enough tile rows
// to fill its 16-tile vectors) applies. Each returns false, doing nothing,
// when it does not apply; double and the other ISA builds stay on F(2x2),
// whose rounding error is lower.

template <typename T>
bool wino4_forward(const Conv2dParams&, const Geom&, const T*, const T*, const T*, T*) {
  return false;
}
template <typename T>
bool wino4_backward_input(const Conv2dParams&, const Geom&, const T*, const T*, T*) {
  return false;
}
template <typename T>
bool wino4_backward_weight(const Conv2dParams&, const Geom&, const T*, const T*, T*) {
  return false;
}

#if defined(__AVX512F__)
// y (N, R, OH, OW) = conv3x3(x (N, C, H, W)) per group, with F(4x4) by tile
// rows where that applies, else winograd_f4.h's layout (the caller checked
// that one of them does); the filter of (r, c) is w[r*rs + c*cs].
void wino4_conv(int64_t G, int64_t N, int64_t C, int64_t R, int64_t H, int64_t W, int64_t OH,
                int64_t OW, int64_t ph, int64_t pw, const float* x, int64_t x_img, const float* w,
                int64_t rs, int64_t cs, int64_t w_group, bool rotate, const float* b, float* y,
                int64_t y_img) {
  namespace f4 = winograd::f4;
  namespace f4r = winograd::f4rows;
  const bool rows = f4r::preferred(OH, OW);
  const f4::Shape s = f4::make_shape(C, R, H, W, OH, OW, ph, pw);
  const f4r::Shape sr = f4r::make_shape(C, R, H, W, OH, OW, ph, pw);
  Scratch<float> U(kSlotWeights, 36 * s.OB * f4::RO * C);
  for (int64_t gi = 0; gi < G; ++gi) {
    f4::transform_weights(w + gi * w_group, R, C, rs, cs, rotate, U.get());
    const float* xg = x + gi * C * H * W;
    const float* bg = b ? b + gi * R : nullptr;
    float* yg = y + gi * R * OH * OW;
    if (rows) {
      f4r::forward(sr, N, xg, x_img, U.get(), bg, yg, y_img);
    } else {
      f4::forward(s, N, xg, x_img, U.get(), bg, yg, y_img);
    }
  }
}

inline bool wino4_applies(int64_t OH, int64_t OW) {
  return winograd::f4rows::preferred(OH, OW) || winograd::f4::preferred(OH, OW);
}

template <>
bool wino4_forward<float>(const Conv2dParams& p, const Geom& g, const float* x, const float* w,
                          const float* b, float* y) {
  if (!wino4_applies(p.OH, p.OW)) return false;
  wino4_conv(g.G, p.N, g.Cg, g.Og, p.H, p.W, p.OH, p.OW, p.ph, p.pw, x, p.C * p.H * p.W, w, g.K,
             9, g.Og * g.K, false, b, y, p.O * g.P);
  return true;
}

template <>
bool wino4_backward_input<float>(const Conv2dParams& p, const Geom& g, const float* gy,
                                 const float* w, float* gx) {
  namespace f4r = winograd::f4rows;
  if (f4r::adjoint_preferred(p.H, p.W, p.OH, p.OW)) {
    // On the forward's own output tiles, where gx's plane needs more (any
    // padding; see winograd_f4_rows.h). Rows of the products are input
    // channels: the filter of (c, o) is w[o][c], unrotated.
    const f4r::Shape s = f4r::make_shape(g.Og, g.Cg, p.H, p.W, p.OH, p.OW, p.ph, p.pw);
    Scratch<float> U(kSlotWeights, 36 * s.OB * winograd::f4::RO * g.Og);
    for (int64_t gi = 0; gi < g.G; ++gi) {
      winograd::f4::transform_weights(w + gi * g.Og * g.K, g.Cg, g.Og, 9, g.K, false, U.get());
      f4r::backward_input(s, p.N, gy + gi * g.Og * g.P, p.O * g.P, U.get(),
                          gx + gi * g.Cg * p.H * p.W, p.C * p.H * p.W);
    }
    return true;
  }
  if (p.ph > 2 || p.pw > 2 || !wino4_applies(p.H, p.W)) return false;
  // 3x3 conv of grad_out with rotated, channel-swapped filters, padding 2 - p.
  wino4_conv(g.G, p.N, g.Og, g.Cg, p.OH, p.OW, p.H, p.W, 2 - p.ph, 2 - p.pw, gy, p.O * g.P, w, 9,
             g.K, g.Og * g.K, true, nullptr, gx, p.C * p.H * p.W);
  return true;
}

template <>
bool wino4_backward_weight<float>(const Conv2dParams& p, const Geom& g, const float* gy,
                                  const float* x, float* gw) {
  namespace f4 = winograd::f4;
  namespace f4r = winograd::f4rows;
  if (!wino4_applies(p.OH, p.OW)) return false;
  const bool rows = f4r::preferred(p.OH, p.OW);
  const f4::Shape s = f4::make_shape(g.Cg, g.Og, p.H, p.W, p.OH, p.OW, p.ph, p.pw);
  const f4r::Shape sr = f4r::make_shape(g.Cg, g.Og, p.H, p.W, p.OH, p.OW, p.ph, p.pw);
  // Image ranges with private dU partials, which the untransform adds in
  // range order (in double), so the result does not depend on thread timing.
  const int64_t chunks = image_ranges(p.N);
  const int64_t Cp = f4::padded_channels(g.Cg), usize = 36 * g.Og * Cp;
  Scratch<float> dU(kSlotPartial, chunks * g.G * usize);
  for_image_ranges(p.N, chunks, [&](int64_t c, int64_t n0, int64_t n1) {
    zero_row(dU.get() + c * g.G * usize, g.G * usize);
    for (int64_t gi = 0; gi < g.G; ++gi)
      if (rows) {
        f4r::weight_grad_range(sr, n0, n1, gy + gi * g.Og * g.P, p.O * g.P,
                               x + gi * g.Cg * p.H * p.W, p.C * p.H * p.W,
                               dU.get() + (c * g.G + gi) * usize);
      } else {
        f4::weight_grad_range(s, n0, n1, gy + gi * g.Og * g.P, p.O * g.P,
                              x + gi * g.Cg * p.H * p.W, p.C * p.H * p.W,
                              dU.get() + (c * g.G + gi) * usize);
      }
  });
  for (int64_t gi = 0; gi < g.G; ++gi)
    f4::untransform_weight_grad(dU.get() + gi * usize, chunks, g.G * usize, g.Og, g.Cg, Cp, g.K,
                                int64_t(9), gw + gi * g.Og * g.K);
  return true;
}
#endif

}  // namespace

template <typename T>
void conv2d_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y) {
  const Geom g = geom(p);
  if (p.N == 0 || p.O == 0 || g.P == 0) return;
  if (g.K == 0) {  // no input channels: the output is just the bias
    run_tasks(p.N, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) fill_bias_rows(y + n * p.O * g.P, g.P, b, p.O, g.P);
    });
    return;
  }
  if (g.wino && wino4_forward(p, g, x, w, b, y)) return;
  if (g.wino) {
    const winograd::Shape s = winograd::make_shape(g.Cg, g.Og, p.H, p.W, p.OH, p.OW, p.ph, p.pw);
    Scratch<T> U(kSlotWeights, winograd::packed_weights_size(g.Og, g.Cg));
    for (int64_t gi = 0; gi < g.G; ++gi) {
      winograd::transform_weights(w + gi * g.Og * g.K, g.Og, g.Cg, g.K, int64_t(9), false,
                                  U.get());
      winograd::forward(s, p.N, x + gi * g.Cg * p.H * p.W, p.C * p.H * p.W, U.get(),
                        b ? b + gi * g.Og : nullptr, y + gi * g.Og * g.P, p.O * g.P);
    }
    return;
  }
  if (conv_small::applies(p)) return conv_small_forward(p, g, x, w, b, y);
  const int64_t rows = rows_per_block(p, g, p.N);
  const int64_t nblk = (p.OH + rows - 1) / rows;
  const int64_t col_elems = g.direct ? 0 : g.K * rows * p.OW;
  run_tasks(p.N * g.G * nblk, [&](int64_t t0, int64_t t1) {
    Scratch<T> col(kSlotCol, col_elems);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = t % nblk, ng = t / nblk, gi = ng % g.G, n = ng / g.G;
      const int64_t oh0 = blk * rows, oh1 = std::min(p.OH, oh0 + rows);
      const int64_t npix = (oh1 - oh0) * p.OW;
      const T* xg = x + (n * p.C + gi * g.Cg) * p.H * p.W;
      T* yg = y + (n * p.O + gi * g.Og) * g.P + oh0 * p.OW;
      const T* wg = w + gi * g.Og * g.K;
      const T* bg = b ? b + gi * g.Og : nullptr;
      int64_t ldc;
      const T* cols = columns(p, g, xg, oh0, oh1, col.get(), ldc);
      if (g.small) {
#define FASTNN_CALL(KK) small_fwd<T, KK>(wg, bg, cols, ldc, g.Og, npix, yg, g.P)
        FASTNN_SMALLK_SWITCH(g.K, FASTNN_CALL)
#undef FASTNN_CALL
      } else {
        if (bg) fill_bias_rows(yg, g.P, bg, g.Og, npix);
        gemm<T>(false, false, g.Og, npix, g.K, wg, g.K, cols, ldc, yg, g.P, bg != nullptr);
      }
    }
  });
}

template <typename T>
void conv2d_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx) {
  const Geom g = geom(p);
  if (p.N == 0 || p.C == 0) return;
  const int64_t plane = p.H * p.W;
  if (p.O == 0 || g.P == 0) {
    run_tasks(p.N, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) zero_row(gx + n * p.C * plane, p.C * plane);
    });
    return;
  }
  if (g.wino && wino4_backward_input(p, g, gy, w, gx)) return;
  if (g.wino && p.ph <= 2 && p.pw <= 2) {
    // The adjoint of a stride-1 3x3 conv is a 3x3 conv of grad_out with the
    // filters rotated 180 degrees, in/out channels swapped, padding 2 - p.
    const winograd::Shape s =
        winograd::make_shape(g.Og, g.Cg, p.OH, p.OW, p.H, p.W, 2 - p.ph, 2 - p.pw);
    Scratch<T> U(kSlotWeights, winograd::packed_weights_size(g.Cg, g.Og));
    for (int64_t gi = 0; gi < g.G; ++gi) {
      winograd::transform_weights(w + gi * g.Og * g.K, g.Cg, g.Og, int64_t(9), g.K, true,
                                  U.get());
      winograd::forward(s, p.N, gy + gi * g.Og * g.P, p.O * g.P, U.get(), static_cast<T*>(nullptr),
                        gx + gi * g.Cg * plane, p.C * plane);
    }
    return;
  }
  if (conv_small::applies(p)) return conv_small_backward_input(p, g, gy, w, gx);
  // Row blocks of one (image, group) overlap in gx, so they stay in one task.
  const int64_t rows = g.direct ? p.OH : std::min(p.OH, std::max<int64_t>(
                                             1, kColBlock / std::max<int64_t>(1, g.K * p.OW)));
  const int64_t dcol_elems = g.direct ? 0 : g.K * rows * p.OW;
  run_tasks(p.N * g.G, [&](int64_t t0, int64_t t1) {
    Scratch<T> dcol(kSlotCol, dcol_elems);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t gi = t % g.G, n = t / g.G;
      T* gxg = gx + (n * p.C + gi * g.Cg) * plane;
      const T* gyg = gy + (n * p.O + gi * g.Og) * g.P;
      const T* wg = w + gi * g.Og * g.K;
      if (g.direct) {  // gx_g (Cg, HW) = w_g^T (Cg, Og) @ gy_g (Og, HW)
        gemm<T>(true, false, g.Cg, g.P, g.Og, wg, g.K, gyg, g.P, gxg, g.P, false);
        continue;
      }
      zero_row(gxg, g.Cg * plane);  // cells no window reaches get 0
      for (int64_t oh0 = 0; oh0 < p.OH; oh0 += rows) {
        const int64_t oh1 = std::min(p.OH, oh0 + rows), npix = (oh1 - oh0) * p.OW;
        const T* gyb = gyg + oh0 * p.OW;
        if (g.small) {
#define FASTNN_CALL(KK) small_bwd_in<T, KK>(wg, gyb, g.P, g.Og, npix, dcol.get(), npix)
          FASTNN_SMALLK_SWITCH(g.K, FASTNN_CALL)
#undef FASTNN_CALL
        } else {
          gemm<T>(true, false, g.K, npix, g.Og, wg, g.K, gyb, g.P, dcol.get(), npix, false);
        }
        col2im_add(p, g.Cg, dcol.get(), oh0, oh1, gxg);
      }
    }
  });
}

template <typename T>
void conv2d_backward_weight(const Conv2dParams& p, const T* gy, const T* x, T* gw) {
  const Geom g = geom(p);
  const int64_t wsize = p.O * g.K;
  if (wsize == 0) return;
  zero_row(gw, wsize);
  if (p.N == 0 || g.P == 0) return;
  if (g.wino && wino4_backward_weight(p, g, gy, x, gw)) return;
  if (g.wino) {
    // dU[g][pos][o][c] summed over all tiles; then G^T dU G.
    const winograd::Shape s = winograd::make_shape(g.Cg, g.Og, p.H, p.W, p.OH, p.OW, p.ph, p.pw);
    const int64_t usize = 16 * g.Og * g.Cg;
    Scratch<T> dU(kSlotWeights, g.G * usize);
    dU.zero(g.G * usize);
    sum_over_image_ranges(kSlotPartial, p.N, g.G * usize, dU.get(),
                          [&](int64_t n0, int64_t n1, T* acc) {
      for (int64_t gi = 0; gi < g.G; ++gi) {
        winograd::weight_grad_range(s, n0, n1, gy + gi * g.Og * g.P, p.O * g.P,
                                    x + gi * g.Cg * p.H * p.W, p.C * p.H * p.W, acc + gi * usize);
      }
    });
    for (int64_t gi = 0; gi < g.G; ++gi) {
      winograd::untransform_weight_grad(dU.get() + gi * usize, g.Og, g.Cg, g.K, int64_t(9),
                                        gw + gi * g.Og * g.K);
    }
    return;
  }
  if (conv_small::applies(p)) return conv_small_backward_weight(p, g, gy, x, gw);
  const int64_t rows = rows_per_block(p, g, p.N);
  const int64_t col_elems = g.direct ? 0 : g.K * rows * p.OW;
  constexpr int64_t L = Vec<T>::L;
  sum_over_image_ranges(kSlotPartial, p.N, wsize, gw, [&](int64_t n0, int64_t n1, T* acc) {
    Scratch<T> col(kSlotCol, col_elems);
    Scratch<T> lanes(kSlotLanes, g.small ? wsize * L : 0);
    if (g.small) lanes.zero(wsize * L);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t gi = 0; gi < g.G; ++gi) {
        const T* xg = x + (n * p.C + gi * g.Cg) * p.H * p.W;
        const T* gyg = gy + (n * p.O + gi * g.Og) * g.P;
        T* gwg = acc + gi * g.Og * g.K;
        for (int64_t oh0 = 0; oh0 < p.OH; oh0 += rows) {
          const int64_t oh1 = std::min(p.OH, oh0 + rows), npix = (oh1 - oh0) * p.OW;
          int64_t ldc;
          const T* cols = columns(p, g, xg, oh0, oh1, col.get(), ldc);
          const T* gyb = gyg + oh0 * p.OW;
          if (g.small) {
#define FASTNN_CALL(KK) \
  small_bwd_w<T, KK>(gyb, g.P, cols, ldc, g.Og, npix, lanes.get() + gi * g.Og * g.K * L)
            FASTNN_SMALLK_SWITCH(g.K, FASTNN_CALL)
#undef FASTNN_CALL
          } else {
            gemm<T>(false, true, g.Og, g.K, npix, gyb, g.P, cols, ldc, gwg, g.K, true);
          }
        }
      }
    }
    if (g.small) {
      for (int64_t i = 0; i < wsize; ++i) acc[i] = Vec<T>::hsum(Vec<T>::loadu(lanes.get() + i * L));
    }
  });
}

#define FASTNN_INSTANTIATE(T)                                                                \
  template void conv2d_forward<T>(const Conv2dParams&, const T*, const T*, const T*, T*);    \
  template void conv2d_backward_input<T>(const Conv2dParams&, const T*, const T*, T*);       \
  template void conv2d_backward_weight<T>(const Conv2dParams&, const T*, const T*, T*);
FASTNN_INSTANTIATE(float)
FASTNN_INSTANTIATE(double)
#undef FASTNN_INSTANTIATE

}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
