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

template <typename T>
inline void copy_n(T* __restrict dst, const T* __restrict src, int64_t n) {
  using V = Vec<T>;
  int64_t i = 0;
  for (; i + V::L <= n; i += V::L) V::storeu(dst + i, V::loadu(src + i));
  if (i < n) V::storep(dst + i, V::loadp(src + i, n - i), n - i);
}

// Shift planes of `rows` input rows: xs (3, rows*OW) [plane stride ld] from
// x (rows, W = OW + 2) [row stride W]; xs[kw][r*OW + c] = x[r*W + c + kw].
template <typename T>
void shift_planes(const T* __restrict x, int64_t W, int64_t rows, int64_t OW, T* __restrict xs,
                  int64_t ld) {
  for (int64_t kw = 0; kw < 3; ++kw)
    for (int64_t r = 0; r < rows; ++r) copy_n(xs + kw * ld + r * OW, x + r * W + kw, OW);
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
// gy (Og, n) [row stride ldg]. 9*NV accumulators; each gy vector feeds 9 FMAs.
template <typename T, int NV>
void bwd_in_dcol(const T* __restrict w, const T* __restrict gy, int64_t ldg, int64_t Og,
                 int64_t n, T* __restrict d, int64_t ldd) {
  using V = Vec<T>;
  using R = typename V::reg;
  constexpr int64_t step = NV * V::L;
  int64_t p0 = 0;
  for (; p0 + step <= n; p0 += step) {
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
  for (; p0 < n; p0 += V::L) {
    const int64_t m = std::min<int64_t>(V::L, n - p0);
    R acc[9];
    for (int k = 0; k < 9; ++k) acc[k] = V::zero();
    for (int64_t o = 0; o < Og; ++o) {
      const R g = V::loadp(gy + o * ldg + p0, m);
      for (int k = 0; k < 9; ++k) acc[k] = V::fma(V::set1(w[o * 9 + k]), g, acc[k]);
    }
    for (int k = 0; k < 9; ++k) V::storep(d + k * ldd + p0, acc[k], m);
  }
}

// Layout of the dcol planes re-laid for step 2: each of the 9 planes holds its
// (OH, OW) values at row stride W = OW + 2 with zeros in the last 2 columns,
// `lead` zeros before and 2 zero rows after. Tap (kh, kw) of input pixel
// q = ih*W + iw is then plane_k[lead + q - kh*W - kw]: out-of-image taps read
// the zero columns/rows, so step 2 is a flat, branch-free 9-way sum.
struct Col2imLayout {
  int64_t W, lead, plane;
  Col2imLayout(int64_t OH, int64_t OW) {
    W = OW + 2;
    lead = 2 * W + 2;
    plane = lead + (OH + 2) * W;
  }
};

// Zeroes the parts of the re-laid planes that step 2 reads but never writes.
template <typename T>
void col2im_zero(const Col2imLayout& lay, int64_t OH, int64_t OW, T* d28) {
  for (int64_t k = 0; k < 9; ++k) {
    T* pl = d28 + k * lay.plane;
    std::fill(pl, pl + lay.lead, T(0));
    for (int64_t r = 0; r < OH; ++r) std::fill(pl + lay.lead + r * lay.W + OW, pl + lay.lead + (r + 1) * lay.W, T(0));
    std::fill(pl + lay.lead + OH * lay.W, pl + lay.plane, T(0));
  }
}

// Backward-input step 2: gx (H, W) = sum over taps of shifted dcol, from
// d (9, OH*OW) [plane stride ldd] through the re-laid planes d28 (zeroed by
// col2im_zero once per scratch use). Every gx element is written, once.
template <typename T>
void bwd_in_col2im(const Col2imLayout& lay, int64_t OH, int64_t OW, const T* __restrict d,
                   int64_t ldd, T* __restrict d28, T* __restrict gx) {
  using V = Vec<T>;
  using R = typename V::reg;
  for (int64_t k = 0; k < 9; ++k)
    for (int64_t r = 0; r < OH; ++r)
      copy_n(d28 + k * lay.plane + lay.lead + r * lay.W, d + k * ldd + r * OW, OW);
  const T* tap[9];
  for (int kh = 0; kh < 3; ++kh)
    for (int kw = 0; kw < 3; ++kw)
      tap[kh * 3 + kw] = d28 + (kh * 3 + kw) * lay.plane + lay.lead - kh * lay.W - kw;
  const int64_t n = (OH + 2) * lay.W;
  int64_t q = 0;
  for (; q + V::L <= n; q += V::L) {
    R s = V::loadu(tap[0] + q);
    for (int k = 1; k < 9; ++k) s = V::add(s, V::loadu(tap[k] + q));
    V::storeu(gx + q, s);
  }
  if (q < n) {
    const int64_t m = n - q;
    R s = V::loadp(tap[0] + q, m);
    for (int k = 1; k < 9; ++k) s = V::add(s, V::loadp(tap[k] + q, m));
    V::storep(gx + q, s, m);
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
