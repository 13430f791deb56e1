// Direct conv2d kernels for one input channel, 3x3 taps, stride 1, dilation 1,
// no padding, groups 1 -- the MNIST first layer, x (N, 1, 28, 28) and
// w (32, 1, 3, 3) -> y (N, 32, 26, 26) -- for one ISA build.
//
// The generic small-K path unfolds each image into a 9-row im2col matrix and,
// for backward-input, folds a 9-row matrix back with a read-modify-write pass
// per row; at this size those passes cost a large share of the whole conv.
// Here the input is unfolded only 3 times, once per kw, with rows cut to the
// output width OW ("shift planes", xs[kw][r*OW + c] = x[r][c + kw]): then tap
// (kh, kw) of output pixel p = oh*OW + ow is xs[kw][p + kh*OW], so the taps of
// any run of consecutive output pixels, across row ends too, are plain
// contiguous loads, and all kernels vectorize over the flattened output plane
// (676 pixels: no lanes lost to the 26-wide rows).
//
// Included by conv2d.cpp inside its ISA namespace.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/ops.h"
#include "kernels/simd.h"

namespace fastnn {
namespace FASTNN_ISA_NS {
namespace conv_small {

using simd::Vec;

#if defined(__AVX512F__)
constexpr int kRegs = 32;
#else
constexpr int kRegs = 16;
#endif

// Shapes these kernels take (any N, OH, OW >= 1, any number of outputs).
inline bool applies(const Conv2dParams& p) {
  return p.C == 1 && p.groups == 1 && p.KH == 3 && p.KW == 3 && p.sh == 1 && p.sw == 1 &&
         p.dh == 1 && p.dw == 1 && p.ph == 0 && p.pw == 0 && p.OH >= 1 && p.OW >= 1 &&
         p.H == p.OH + 2 && p.W == p.OW + 2;
}

// Makes the compiler hold v in a register: with every other register taken by
// accumulators GCC otherwise folds one load into each FMA that uses v, so a
// value meant to be loaded once is loaded RB times and the loop turns
// load-bound.
template <typename R>
inline void in_register(R& v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// dst[0, n) = src[0, n). Rows of at least a vector end with a whole vector
// that overlaps the previous one instead of a masked tail: masked loads and
// stores cost several times a plain one, and these copies are short rows.
template <typename T>
inline void copy_n(T* __restrict dst, const T* __restrict src, int64_t n) {
  using V = Vec<T>;
  if (n < V::L) {
    if (n > 0) V::storep(dst, V::loadp(src, n), n);
    return;
  }
  int64_t i = 0;
  for (; i + V::L < n; i += V::L) V::storeu(dst + i, V::loadu(src + i));
  V::storeu(dst + n - V::L, V::loadu(src + n - V::L));
}

// Shift planes of `rows` input rows: xs (3, rows*OW) [plane stride ld] from
// x (rows, W = OW + 2) [row stride W]; xs[kw][r*OW + c] = x[r*W + c + kw].
// (memcpy: for such short unaligned rows glibc's copy measured 1.5x faster
// than zmm loads/stores, whose misaligned stores are slow on Zen 4.)
template <typename T>
void shift_planes(const T* __restrict x, int64_t W, int64_t rows, int64_t OW, T* __restrict xs,
                  int64_t ld) {
  for (int64_t kw = 0; kw < 3; ++kw)
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(xs + kw * ld + r * OW, x + r * W + kw, static_cast<size_t>(OW) * sizeof(T));
}

// Forward, y (Og, n) [row stride ldy] = bias + w (Og, 9) @ taps, for the n
// output pixels whose shift planes are xs (3, n + 2*OW) [plane stride ld].
// A block of NV vectors of pixels keeps all 9 taps in registers (9*NV) and
// serves every output channel from them; CO channels are computed together
// so the 9-long FMA chains of CO*NV accumulators overlap. Per output the sum
// is bias, then taps 0..8 in order with one FMA each -- the same as the
// im2col small-K kernel, so results do not depend on which path ran.
template <typename T, int NV, int CO>
void fwd(const T* __restrict w, const T* __restrict bias, const T* __restrict xs, int64_t ld,
         int64_t OW, int64_t Og, int64_t n, T* __restrict y, int64_t ldy) {
  using V = Vec<T>;
  using R = typename V::reg;
  constexpr int64_t step = NV * V::L;
  const T* tap[9];
  for (int kh = 0; kh < 3; ++kh)
    for (int kw = 0; kw < 3; ++kw) tap[kh * 3 + kw] = xs + kw * ld + kh * OW;
  int64_t p0 = 0;
  for (; p0 + step <= n; p0 += step) {
    R c[9][NV];
    for (int k = 0; k < 9; ++k)
      for (int v = 0; v < NV; ++v) c[k][v] = V::loadu(tap[k] + p0 + v * V::L);
    int64_t o = 0;
    for (; o + CO <= Og; o += CO) {
      R acc[CO][NV];
      for (int j = 0; j < CO; ++j) {
        const R b0 = bias ? V::set1(bias[o + j]) : V::zero();
        for (int v = 0; v < NV; ++v) acc[j][v] = b0;
      }
      for (int k = 0; k < 9; ++k) {
        for (int j = 0; j < CO; ++j) {
          const R wk = V::set1(w[(o + j) * 9 + k]);
          for (int v = 0; v < NV; ++v) acc[j][v] = V::fma(wk, c[k][v], acc[j][v]);
        }
      }
      for (int j = 0; j < CO; ++j)
        for (int v = 0; v < NV; ++v) V::storeu(y + (o + j) * ldy + p0 + v * V::L, acc[j][v]);
    }
    for (; o < Og; ++o) {
      R acc[NV];
      const R b0 = bias ? V::set1(bias[o]) : V::zero();
      for (int v = 0; v < NV; ++v) acc[v] = b0;
      for (int k = 0; k < 9; ++k) {
        const R wk = V::set1(w[o * 9 + k]);
        for (int v = 0; v < NV; ++v) acc[v] = V::fma(wk, c[k][v], acc[v]);
      }
      for (int v = 0; v < NV; ++v) V::storeu(y + o * ldy + p0 + v * V::L, acc[v]);
    }
  }
  for (; p0 < n; p0 += V::L) {  // tail, one (partial) vector at a time
    const int64_t m = std::min<int64_t>(V::L, n - p0);
    R c[9];
    for (int k = 0; k < 9; ++k) c[k] = V::loadp(tap[k] + p0, m);
    for (int64_t o = 0; o < Og; ++o) {
      R acc = bias ? V::set1(bias[o]) : V::zero();
      for (int k = 0; k < 9; ++k) acc = V::fma(V::set1(w[o * 9 + k]), c[k], acc);
      V::storep(y + o * ldy + p0, acc, m);
    }
  }
}

// Backward-weight partial sums, lane-wise: lanes (RB, 9, L) += gy (RB, n)
// [row stride ldg] times the taps of shift planes xs (3, n + 2*OW) [plane
// stride ld], per lane. RB output channels x 9 taps of accumulators stay in
// registers over the whole plane (each x load feeds RB FMAs, each gy load 9);
// the lanes are summed once per call by the caller, not per image.
template <typename T, int RB>
void bwd_w_rows(const T* __restrict gy, int64_t ldg, const T* __restrict xs, int64_t ld,
                int64_t OW, int64_t n, T* __restrict lanes) {
  using V = Vec<T>;
  using R = typename V::reg;
  const T* tap[9];
  for (int kh = 0; kh < 3; ++kh)
    for (int kw = 0; kw < 3; ++kw) tap[kh * 3 + kw] = xs + kw * ld + kh * OW;
  R acc[RB][9];
  for (int r = 0; r < RB; ++r)
    for (int k = 0; k < 9; ++k) acc[r][k] = V::loadu(lanes + (r * 9 + k) * V::L);
  int64_t p = 0;
  for (; p + V::L <= n; p += V::L) {
    R g[RB];
    for (int r = 0; r < RB; ++r) g[r] = V::loadu(gy + r * ldg + p);
    for (int k = 0; k < 9; ++k) {
      R xk = V::loadu(tap[k] + p);
      in_register(xk);
      for (int r = 0; r < RB; ++r) acc[r][k] = V::fma(g[r], xk, acc[r][k]);
    }
  }
  if (p < n) {  // zero-filled partial vectors add nothing
    const int64_t m = n - p;
    R g[RB];
    for (int r = 0; r < RB; ++r) g[r] = V::loadp(gy + r * ldg + p, m);
    for (int k = 0; k < 9; ++k) {
      const R xk = V::loadp(tap[k] + p, m);
      for (int r = 0; r < RB; ++r) acc[r][k] = V::fma(g[r], xk, acc[r][k]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int k = 0; k < 9; ++k) V::storeu(lanes + (r * 9 + k) * V::L, acc[r][k]);
}

// lanes (Og, 9, L) += lane-wise gy (Og, n) (x) taps, RB channels per pass.
template <typename T>
void bwd_w(const T* gy, int64_t ldg, const T* xs, int64_t ld, int64_t OW, int64_t Og, int64_t n,
           T* lanes) {
  constexpr int64_t L = Vec<T>::L;
  // RB*9 accumulators + RB gy vectors + one x vector must fit the registers.
  constexpr int RB = std::max(1, (kRegs - 1) / 10);
  int64_t o = 0;
  for (; o + RB <= Og; o += RB)
    bwd_w_rows<T, RB>(gy + o * ldg, ldg, xs, ld, OW, n, lanes + o * 9 * L);
  // Two leftover channels (32 = 3*10 + 2) in one pass: alone, each would
  // load all 9 taps for only 9 FMAs.
  if (RB >= 3 && o + 2 <= Og) {
    bwd_w_rows<T, 2>(gy + o * ldg, ldg, xs, ld, OW, n, lanes + o * 9 * L);
    o += 2;
  }
  for (; o < Og; ++o) bwd_w_rows<T, 1>(gy + o * ldg, ldg, xs, ld, OW, n, lanes + o * 9 * L);
}

// Backward-input step 1: dcol D (9, n) [plane stride ldd] = w^T (9, Og) @
// gy (Og, n) [row stride ldg], for pixels [pb, pe). 9*NV accumulators; each
// gy vector feeds 9 FMAs.
template <typename T, int NV>
void bwd_in_dcol(const T* __restrict w, const T* __restrict gy, int64_t ldg, int64_t Og,
                 int64_t pb, int64_t pe, T* __restrict d, int64_t ldd) {
  using V = Vec<T>;
  using R = typename V::reg;
  constexpr int64_t step = NV * V::L;
  int64_t p0 = pb;
  for (; p0 + step <= pe; p0 += step) {
    R acc[9][NV];
    for (int k = 0; k < 9; ++k)
      for (int v = 0; v < NV; ++v) acc[k][v] = V::zero();
    for (int64_t o = 0; o < Og; ++o) {
      // Og rows are read a few lines at a time: too many streams for the
      // hardware prefetcher, so fetch the next block's lines explicitly.
      const T* next = gy + o * ldg + p0 + step;
      for (int64_t b = 0; b < int64_t(step * sizeof(T)); b += 64) __builtin_prefetch(next + b / int64_t(sizeof(T)));
      R g[NV];
      for (int v = 0; v < NV; ++v) g[v] = V::loadu(gy + o * ldg + p0 + v * V::L);
      for (int k = 0; k < 9; ++k) {
        const R wk = V::set1(w[o * 9 + k]);
        for (int v = 0; v < NV; ++v) acc[k][v] = V::fma(wk, g[v], acc[k][v]);
      }
    }
    for (int k = 0; k < 9; ++k)
      for (int v = 0; v < NV; ++v) V::storeu(d + k * ldd + p0 + v * V::L, acc[k][v]);
  }
  for (; p0 < pe; p0 += V::L) {
    const int64_t m = std::min<int64_t>(V::L, pe - p0);
    R acc[9];
    for (int k = 0; k < 9; ++k) acc[k] = V::zero();
    for (int64_t o = 0; o < Og; ++o) {
      const R g = V::loadp(gy + o * ldg + p0, m);
      for (int k = 0; k < 9; ++k) acc[k] = V::fma(V::set1(w[o * 9 + k]), g, acc[k]);
    }
    for (int k = 0; k < 9; ++k) V::storep(d + k * ldd + p0, acc[k], m);
  }
}

// Backward-input step 2 for input rows [ih0, ih1): gx (H, W) = sum over taps
// (kh, kw) of dcol_k shifted by (kh, kw), from d (9, OH*OW) [plane stride
// ldd]; those gx rows must only need dcol rows that are done. Columns
// [2, OW) take every kw and are summed as whole vectors (the last one
// overlapping the one before: masked loads cost several plain ones); the 4
// edge columns, where some kw fall outside dcol, are summed one by one.
// Summing straight from d, rather than from a zero-margined copy that makes
// the whole sum flat, saves a copy of all 9 planes: the zmm loads and stores
// of such short rows nearly all split cache lines, and cost more than the
// sums.
template <typename T>
void bwd_in_col2im(const T* __restrict d, int64_t ldd, int64_t OH, int64_t OW, int64_t ih0,
                   int64_t ih1, T* __restrict gx) {
  using V = Vec<T>;
  using R = typename V::reg;
  const int64_t W = OW + 2, inner = OW - 2;  // columns [2, OW)
  for (int64_t ih = ih0; ih < ih1; ++ih) {
    const int64_t kh0 = std::max<int64_t>(0, ih - (OH - 1)), kh1 = std::min<int64_t>(2, ih);
    const T* src[3];  // dcol row ih - kh of plane (kh, 0), for kh in [kh0, kh1]
    for (int64_t kh = kh0; kh <= kh1; ++kh) src[kh] = d + kh * 3 * ldd + (ih - kh) * OW;
    T* row = gx + ih * W;
    if (inner >= V::L) {
      for (int64_t c = 2;; c += V::L) {
        c = std::min(c, OW - V::L);
        R s = V::zero();
        for (int64_t kh = kh0; kh <= kh1; ++kh)
          for (int64_t kw = 0; kw < 3; ++kw) s = V::add(s, V::loadu(src[kh] + kw * ldd + c - kw));
        V::storeu(row + c, s);
        if (c == OW - V::L) break;
      }
    } else if (inner > 0) {
      R s = V::zero();
      for (int64_t kh = kh0; kh <= kh1; ++kh)
        for (int64_t kw = 0; kw < 3; ++kw) s = V::add(s, V::loadp(src[kh] + kw * ldd + 2 - kw, inner));
      V::storep(row + 2, s, inner);
    }
    if (inner > 0) {  // edge columns 0, 1, OW, OW + 1: only the kw that land inside
      T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
      for (int64_t kh = kh0; kh <= kh1; ++kh) {
        const T* r = src[kh];
        s0 += r[0];
        s1 += r[1] + r[ldd];
        s2 += r[ldd + OW - 1] + r[2 * ldd + OW - 2];
        s3 += r[2 * ldd + OW - 1];
      }
      row[0] = s0;
      row[1] = s1;
      row[OW] = s2;
      row[OW + 1] = s3;
    } else {  // tiny rows: every column the slow way
      for (int64_t c = 0; c < W; ++c) {
        T s = T(0);
        for (int64_t kh = kh0; kh <= kh1; ++kh)
          for (int64_t kw = 0; kw < 3; ++kw)
            if (c - kw >= 0 && c - kw < OW) s += src[kh][kw * ldd + c - kw];
        row[c] = s;
      }
    }
  }
}

// Backward-input of one image: gy (Og, OH*OW) [row stride ldg] -> gx (H, W),
// d (9, ldd) scratch with ldd >= OH*OW. dcol and col2im alternate every few
// pixel blocks, so the dcol rows are summed while still in L1.
template <typename T, int NV>
void bwd_in_image(int64_t OH, int64_t OW, const T* w, const T* gy, int64_t ldg, int64_t Og,
                  T* d, int64_t ldd, T* gx) {
  const int64_t n = OH * OW, H = OH + 2;
  const int64_t chunk = 4 * NV * Vec<T>::L;
  int64_t gx_rows = 0;
  for (int64_t pb = 0; pb < n; pb += chunk) {
    const int64_t pe = pb + chunk >= n ? n : pb + chunk;
    bwd_in_dcol<T, NV>(w, gy, ldg, Og, pb, pe, d, ldd);
    const int64_t gx_end = pe == n ? H : pe / OW;  // gx rows that need no later dcol rows
    bwd_in_col2im(d, ldd, OH, OW, gx_rows, gx_end, gx);
    gx_rows = gx_end;
  }
}

// Vectors per pixel block of the forward and dcol kernels (9*NV tap or
// accumulator registers plus a few more).
constexpr int kFwdNV = kRegs >= 32 ? 2 : 1;
constexpr int kFwdCO = 4;
constexpr int kDcolNV = kRegs >= 32 ? 3 : 1;

}  // namespace conv_small
}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
