// conv2d kernels for one input channel, 3x3 taps, stride 1, dilation 1,
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
// With an even output width on AVX-512 all three passes use Winograd
// F(2,3) along rows instead (2/3 of the FMAs; see wino_fwd, wino_bwd_w and
// wino_bwd_in_dv), on "tile planes" (or, for backward-weight, "tile
// blocks") laid out the same way. Otherwise
// backward-input is a dcol (w^T @ gy) whose rows are summed into gx while
// still in L1.
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
constexpr int kRegs = simd::kVecRegs;

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

// --- backward-weight, Winograd F(3,2) along rows ------------------------------
//
// Pairs of neighbouring output pixels (2t, 2t+1) of a row form a tile whose
// 9 weight-gradient products per row of taps need 6 FMAs directly; the
// minimal algorithm for "3 taps from 2 gradients" (the weight gradient of
// Winograd F(2,3)) needs 4: with gradients (e, o) = gy[2t], gy[2t+1] and
// inputs d0..d3 = x[2t..2t+3] of the tap row,
//   P_i += U_i * V_i,  U = (e, e + o, e - o, o),
//   V = (d0 - d2, d1 + d2, d2 - d1, d1 - d3),
// summed lane-wise over all tiles and images, and only at the end
//   gw[kw = 0, 1, 2] = P0 + (P1 + P2)/2, (P1 - P2)/2, (P1 + P2)/2 - P3.
// V depends only on x, so it is built once per image (12 vectors per 16
// tiles, shared by all output channels); U costs one in-lane unzip and 2
// adds per channel and 16 tiles. FMAs drop from 18 to 12 per channel and 32
// pixels. Needs an even output width (tiles never straddle rows), and
// 24 accumulators + 4 gradient vectors in registers (AVX-512).

// V = (d0 - d2, d1 + d2, d2 - d1, d1 - d3) for tiles whose inputs are d0..d3.
template <typename T>
inline void wino_v(typename Vec<T>::reg d0, typename Vec<T>::reg d1, typename Vec<T>::reg d2,
                   typename Vec<T>::reg d3, typename Vec<T>::reg (&v)[4]) {
  using V = Vec<T>;
  v[0] = V::sub(d0, d2);
  v[1] = V::add(d1, d2);
  v[2] = V::sub(d2, d1);
  v[3] = V::sub(d1, d3);
}

// Tile blocks of one image for backward-weight: vb (NB, 12, L), NB =
// ceil(Q / L), Q = OH*T tiles, T = OW/2 per row. Block b holds, for
// k = i*3 + kh, the vector V_i of tap row kh for the tiles b*L .. b*L + L-1,
// in the lane order of Vec::unzip -- the order the gradients' (e, o) pairs
// come out in, so no lane-crossing permute is needed in the main loop. One
// pointer with constant offsets reaches all 12 vectors of a block; with 12
// separate planes the loop ran short of general registers and spilled.
// Built from the shift planes xs (2, H*OW) [plane stride ld] of kw = 0 and
// kw = 2: tile q = oh*T + t of tap row kh starts at flat element 2q + kh*OW of
// both (x columns 2t, 2t+1 in kw 0; 2t+2, 2t+3 in kw 2), exactly where its
// gradients start in gy. Lanes past Q read as 0, like the gradients there, so
// the last block adds 0 whatever x holds.
template <typename T>
void wino_bwd_w_blocks(const T* __restrict x, int64_t H, int64_t W, T* __restrict xs,
                       int64_t ld, T* __restrict vb) {
  using V = Vec<T>;
  using R = typename V::reg;
  const int64_t OW = W - 2, Q = (H - 2) * (OW / 2);
  for (int64_t r = 0; r < H; ++r) {
    std::memcpy(xs + r * OW, x + r * W, static_cast<size_t>(OW) * sizeof(T));
    std::memcpy(xs + ld + r * OW, x + r * W + 2, static_cast<size_t>(OW) * sizeof(T));
  }
  for (int64_t q0 = 0; q0 < Q; q0 += V::L) {
    const int64_t n = 2 * std::min<int64_t>(V::L, Q - q0);  // elements of the block
    const int64_t n0 = std::min<int64_t>(n, V::L), n1 = n - n0;
    T* dst = vb + q0 * 12;
    for (int64_t kh = 0; kh < 3; ++kh) {
      const T* a = xs + kh * OW + 2 * q0;
      const T* b = a + ld;
      R d0, d1, d2, d3;
      if (n == 2 * V::L) {
        V::unzip(V::loadu(a), V::loadu(a + V::L), d0, d1);
        V::unzip(V::loadu(b), V::loadu(b + V::L), d2, d3);
      } else {
        V::unzip(V::loadp(a, n0), V::loadp(a + V::L, n1), d0, d1);
        V::unzip(V::loadp(b, n0), V::loadp(b + V::L, n1), d2, d3);
      }
      R v[4];
      wino_v<T>(d0, d1, d2, d3, v);
      for (int i = 0; i < 4; ++i) V::storeu(dst + (i * 3 + kh) * V::L, v[i]);
    }
  }
}

// The lane sums kept between images, per accumulator: folded to half a
// vector (its two halves added) where that is cheap (AVX-512). A channel
// pair's 24 sums then load and store in half the bytes, and all channels'
// sums (12 KB) stay in L1 beside the tile blocks; measured 5% of the pass.
template <typename T>
struct Folded {
  static constexpr int64_t kLen = Vec<T>::L;
  static typename Vec<T>::reg load(const T* p) { return Vec<T>::loadu(p); }
  static void store(T* p, typename Vec<T>::reg v) { Vec<T>::storeu(p, v); }
};
#if defined(__AVX512F__) && defined(__AVX512DQ__)
template <>
struct Folded<float> {
  static constexpr int64_t kLen = 8;
  static __m512 load(const float* p) { return _mm512_zextps256_ps512(_mm256_loadu_ps(p)); }
  static void store(float* p, __m512 v) {
    _mm256_storeu_ps(p, _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
  }
};
template <>
struct Folded<double> {
  static constexpr int64_t kLen = 4;
  static __m512d load(const double* p) { return _mm512_zextpd256_pd512(_mm256_loadu_pd(p)); }
  static void store(double* p, __m512d v) {
    _mm256_storeu_pd(p, _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1)));
  }
};
#endif

// One block of L tiles of wino_bwd_w_rows: gy at the block's first gradient,
// vb at its tile block; Full: all L tiles exist, else only the first m (the
// gradient loads then zero the rest, and so do the tile blocks).
template <typename T, int RB, bool Full>
__attribute__((always_inline)) inline void wino_step(typename Vec<T>::reg (&acc)[RB][4][3],
                                                     const T* __restrict gy, int64_t ldg,
                                                     const T* __restrict vb, int64_t m) {
  using V = Vec<T>;
  using R = typename V::reg;
  // The next RB channels' rows (after the last channels, the next image's
  // first ones; prefetches never fault). gy streams from L3, and the hardware
  // prefetcher, restarting on every 2.7 KB row, left the loop waiting on it.
  for (int j = 0; j < RB; ++j) {
    const char* next = reinterpret_cast<const char*>(gy + (j + RB) * ldg);
    for (int64_t b = 0; b < int64_t(2 * V::L * sizeof(T)); b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
  }
  R e[RB], o[RB];
  for (int j = 0; j < RB; ++j) {
    const T* g = gy + j * ldg;
    if (Full) {
      V::unzip(V::loadu(g), V::loadu(g + V::L), e[j], o[j]);
    } else {
      V::unzip(V::loadp(g, std::min<int64_t>(2 * m, V::L)),
               V::loadp(g + V::L, std::max<int64_t>(0, 2 * m - V::L)), e[j], o[j]);
    }
  }
  for (int i = 0; i < 4; ++i) {
    R u[RB];
    for (int j = 0; j < RB; ++j)
      u[j] = i == 0 ? e[j] : i == 1 ? V::add(e[j], o[j]) : i == 2 ? V::sub(e[j], o[j]) : o[j];
    for (int kh = 0; kh < 3; ++kh) {
      R vk = V::loadu(vb + (i * 3 + kh) * V::L);
      in_register(vk);
      for (int j = 0; j < RB; ++j) acc[j][i][kh] = V::fma(u[j], vk, acc[j][i][kh]);
    }
  }
}

// lanes (RB, 4, 3, Folded::kLen) += lane-wise U_i(gy row) * V_i(tap row kh),
// over the Q tiles of one image: gy (RB, 2Q) [row stride ldg], vb its tile
// blocks.
template <typename T, int RB>
void wino_bwd_w_rows(const T* __restrict gy, int64_t ldg, const T* __restrict vb, int64_t Q,
                     T* __restrict lanes) {
  using V = Vec<T>;
  using R = typename V::reg;
  constexpr int64_t F = Folded<T>::kLen;
  R acc[RB][4][3];
  for (int j = 0; j < RB; ++j)
    for (int i = 0; i < 4; ++i)
      for (int kh = 0; kh < 3; ++kh) acc[j][i][kh] = Folded<T>::load(lanes + ((j * 4 + i) * 3 + kh) * F);
  int64_t q0 = 0;
  for (; q0 + V::L <= Q; q0 += V::L) wino_step<T, RB, true>(acc, gy + 2 * q0, ldg, vb + q0 * 12, V::L);
  if (q0 < Q) wino_step<T, RB, false>(acc, gy + 2 * q0, ldg, vb + q0 * 12, Q - q0);
  for (int j = 0; j < RB; ++j)
    for (int i = 0; i < 4; ++i)
      for (int kh = 0; kh < 3; ++kh) Folded<T>::store(lanes + ((j * 4 + i) * 3 + kh) * F, acc[j][i][kh]);
}

// Whether the Winograd kernels run (else fwd, bwd_w and the dcol backward-
// input): they need an even output width (tiles never straddle rows), and
// registers for 12 tap vectors + 8 sums (forward) or 24 accumulators + 4
// gradients (backward-weight).
inline bool wino_applies(const Conv2dParams& p) { return kRegs >= 32 && p.OW % 2 == 0; }

// lanes (Og, 12, Folded::kLen) += one image's P sums: gy (Og, OH*OW) [row
// stride ldg], vb its tile blocks (wino_bwd_w_blocks).
template <typename T>
void wino_bwd_w(const T* gy, int64_t ldg, const T* vb, int64_t OH, int64_t OW, int64_t Og,
                T* lanes) {
  constexpr int64_t F = Folded<T>::kLen;
  const int64_t Q = OH * (OW / 2);
  int64_t o = 0;
  for (; o + 2 <= Og; o += 2) wino_bwd_w_rows<T, 2>(gy + o * ldg, ldg, vb, Q, lanes + o * 12 * F);
  for (; o < Og; ++o) wino_bwd_w_rows<T, 1>(gy + o * ldg, ldg, vb, Q, lanes + o * 12 * F);
}

// gw (Og, 3, 3) = the output transform of the lane sums lanes (Og, 12,
// Folded::kLen).
template <typename T>
void wino_bwd_w_finish(const T* lanes, int64_t Og, T* gw) {
  constexpr int64_t F = Folded<T>::kLen;
  for (int64_t o = 0; o < Og; ++o) {
    for (int kh = 0; kh < 3; ++kh) {
      T P[4];
      for (int i = 0; i < 4; ++i) {
        const T* l = lanes + ((o * 4 + i) * 3 + kh) * F;
        P[i] = T(0);
        for (int64_t k = 0; k < F; ++k) P[i] += l[k];
      }
      const T h = T(0.5) * (P[1] + P[2]);
      gw[(o * 3 + kh) * 3 + 0] = P[0] + h;
      gw[(o * 3 + kh) * 3 + 1] = T(0.5) * (P[1] - P[2]);
      gw[(o * 3 + kh) * 3 + 2] = h - P[3];
    }
  }
}

// --- forward, Winograd F(2,3) along rows --------------------------------------
//
// Output pixels (2t, 2t+1) of a row form a tile; per tap row kh its 6
// products take 4 multiplies with the same V as wino_bwd_w (in tile order) and
// the weights transformed per (channel, kh) as U = (g0, (g0+g1+g2)/2,
// (g0-g1+g2)/2, g2):  M_i = sum over kh of U_i * V_i,  then
//   y[2t] = M0 + M1 + M2 + bias,  y[2t+1] = M1 - M2 - M3 + bias.
// 12 FMAs per channel and 32 outputs instead of 18; the 4 adds and the
// interleave back to pixel order run on the FP pipes the FMAs leave free on
// Zen 4. One input channel means no channel sum to amortize the transforms
// over, but the input side is shared by all output channels and the output
// side is 4 adds. Same conditions as wino_bwd_w (AVX-512, even OW).

// Tile planes of one image: v (4, 3, OH*T) [plane stride ld], T = OW/2 tiles
// per row; v[i][kh][oh*T + t] = V_i of the tile at input row oh + kh,
// columns 2t..2t+3 (V as in the backward-weight above, in tile order): a flat
// run over the output plane per (i, kh). (One plane per i, offset by kh*T per
// tap row, would do, but aligned loads cost less.)
// V_i (wino_v) of the L tiles t0 .. t0+L-1 of one input row of width W (tile
// t covers columns 2t .. 2t+3; tiles past the row's end come out of zeros).
template <typename T>
inline void wino_row_v(const T* __restrict row, int64_t W, int64_t t0, typename Vec<T>::reg (&vi)[4]) {
  using V = Vec<T>;
  using R = typename V::reg;
  // Elements 2*t0 .. W-1 of the row remain; take 2L of them from 2*t0 and
  // from 2*t0 + 2 (the next tile's start), zero past the row's end.
  const int64_t a = W - 2 * t0, b = a - 2;
  R e, o, e1, o1;
  V::deinterleave(V::loadp(row + 2 * t0, std::min<int64_t>(a, V::L)),
                  V::loadp(row + 2 * t0 + V::L, std::max<int64_t>(0, std::min<int64_t>(a - V::L, V::L))),
                  e, o);
  V::deinterleave(V::loadp(row + 2 * t0 + 2, std::min<int64_t>(b, V::L)),
                  V::loadp(row + 2 * t0 + 2 + V::L, std::max<int64_t>(0, std::min<int64_t>(b - V::L, V::L))),
                  e1, o1);
  wino_v<T>(e, o, e1, o1, vi);
}

template <typename T>
void wino_tile_planes(const T* __restrict x, int64_t H, int64_t W, T* __restrict v, int64_t ld) {
  using V = Vec<T>;
  using R = typename V::reg;
  const int64_t TT = (W - 2) / 2;
  for (int64_t r = 0; r < H; ++r) {
    const T* row = x + r * W;
    for (int64_t t0 = 0; t0 < TT; t0 += V::L) {
      const int64_t m = std::min<int64_t>(V::L, TT - t0);
      R vi[4];
      wino_row_v<T>(row, W, t0, vi);
      for (int64_t kh = std::max<int64_t>(0, r - (H - 3)); kh <= std::min<int64_t>(2, r); ++kh) {
        T* dst = v + kh * ld + (r - kh) * TT + t0;
        for (int i = 0; i < 4; ++i) V::storep(dst + i * 3 * ld, vi[i], m);
      }
    }
  }
}

// One step of 16 (L) tiles of wino_bwd_w_rows; Full: all L tiles exist,

// u (O, 3, 4) = the transformed weights of w (O, 1, 3, 3).
template <typename T>
void wino_fwd_weights(const T* w, int64_t O, T* u) {
  for (int64_t o = 0; o < O * 3; ++o) {
    const T g0 = w[o * 3], g1 = w[o * 3 + 1], g2 = w[o * 3 + 2];
    u[o * 4 + 0] = g0;
    u[o * 4 + 1] = T(0.5) * (g0 + g1 + g2);
    u[o * 4 + 2] = T(0.5) * (g0 - g1 + g2);
    u[o * 4 + 3] = g2;
  }
}

// One channel of one block of L tiles: y (2*m outputs from pixel 2*q0) =
// the output transform of M from the tap-plane vectors vt[i][kh].
template <typename T, bool Full>
__attribute__((always_inline)) inline void wino_fwd_channel(const typename Vec<T>::reg (&vt)[4][3],
                                                            const T* __restrict u, T bias,
                                                            T* __restrict y, int64_t m) {
  using V = Vec<T>;
  using R = typename V::reg;
  R M[4];
  for (int i = 0; i < 4; ++i) {
    M[i] = i == 1 ? V::fma(V::set1(u[i]), vt[i][0], V::set1(bias)) : V::mul(V::set1(u[i]), vt[i][0]);
    M[i] = V::fma(V::set1(u[4 + i]), vt[i][1], M[i]);
    M[i] = V::fma(V::set1(u[8 + i]), vt[i][2], M[i]);
  }
  const R e = V::add(V::add(M[0], M[1]), M[2]);
  const R o = V::sub(V::sub(M[1], M[2]), M[3]);
  R lo, hi;
  V::interleave(e, o, lo, hi);
  if (Full) {
    V::storeu(y, lo);
    V::storeu(y + V::L, hi);
  } else {
    V::storep(y, lo, std::min<int64_t>(2 * m, V::L));
    V::storep(y + V::L, hi, std::max<int64_t>(0, 2 * m - V::L));
  }
}

// y (Og, rows*OW) [row stride ldy] = conv of the input rows whose tile planes
// are v (4, 3, Q) [plane stride ld], Q = rows*OW/2, weights u (Og, 3, 4).
template <typename T>
void wino_fwd(const T* __restrict u, const T* __restrict bias, const T* __restrict v, int64_t ld,
              int64_t Q, int64_t Og, T* __restrict y, int64_t ldy) {
  using V = Vec<T>;
  using R = typename V::reg;
  for (int64_t q0 = 0; q0 < Q; q0 += V::L) {
    const int64_t m = std::min<int64_t>(V::L, Q - q0);
    R vt[4][3];
    for (int i = 0; i < 4; ++i)
      for (int kh = 0; kh < 3; ++kh) {
        const T* src = v + (i * 3 + kh) * ld + q0;
        vt[i][kh] = m == V::L ? V::loadu(src) : V::loadp(src, m);
      }
    T* yq = y + 2 * q0;
    if (m == V::L) {
      for (int64_t o = 0; o < Og; ++o)
        wino_fwd_channel<T, true>(vt, u + o * 12, bias ? bias[o] : T(0), yq + o * ldy, m);
    } else {
      for (int64_t o = 0; o < Og; ++o)
        wino_fwd_channel<T, false>(vt, u + o * 12, bias ? bias[o] : T(0), yq + o * ldy, m);
    }
  }
}

// --- backward-input, adjoint of the Winograd forward ---------------------------
//
// The forward above, transposed: per tile the gradients (e, o) of its two
// outputs become dM = (e, e + o, e - o, -o); the tile-plane gradients
// dV_i,kh = sum over channels of U_i(co, kh) * dM_i(co) (12 FMAs per channel
// and 32 pixels against the 18 of dcol); then the tile planes' adjoint adds
// each tile's (dV0, dV1 - dV2 + dV3, dV1 + dV2 - dV0, -dV3) into input row
// oh + kh, columns 2t..2t+3. Same conditions as wino_fwd.

// u (O, 3, 4) as wino_fwd_weights, with U3 negated (it meets +o, not -o).
template <typename T>
void wino_bwd_in_weights(const T* w, int64_t O, T* u) {
  wino_fwd_weights(w, O, u);
  for (int64_t k = 0; k < O * 3; ++k) u[k * 4 + 3] = -u[k * 4 + 3];
}

// dv (4, 3, Q) [plane stride ld, a multiple of L] = the tile-plane
// gradients of one image from gy (Og, 2Q) [row stride ldg].
template <typename T>
void wino_bwd_in_dv(const T* __restrict u, const T* __restrict gy, int64_t ldg, int64_t Og,
                    int64_t Q, T* __restrict dv, int64_t ld) {
  using V = Vec<T>;
  using R = typename V::reg;
  for (int64_t q0 = 0; q0 < Q; q0 += V::L) {
    const int64_t m = std::min<int64_t>(V::L, Q - q0);
    R acc[4][3];
    for (int i = 0; i < 4; ++i)
      for (int kh = 0; kh < 3; ++kh) acc[i][kh] = V::zero();
    for (int64_t o = 0; o < Og; ++o) {
      const T* g = gy + o * ldg + 2 * q0;
      // Og rows, read 2 lines at a time: fetch the next block's explicitly.
      __builtin_prefetch(g + 2 * V::L);
      __builtin_prefetch(g + 3 * V::L);
      R e, od;
      if (m == V::L) {
        V::deinterleave(V::loadu(g), V::loadu(g + V::L), e, od);
      } else {  // zero lanes past the plane: their dV is 0 and lands in padding
        V::deinterleave(V::loadp(g, std::min<int64_t>(2 * m, V::L)),
                        V::loadp(g + V::L, std::max<int64_t>(0, 2 * m - V::L)), e, od);
      }
      const R dm[4] = {e, V::add(e, od), V::sub(e, od), od};
      const T* uo = u + o * 12;
      for (int kh = 0; kh < 3; ++kh)
        for (int i = 0; i < 4; ++i) acc[i][kh] = V::fma(V::set1(uo[kh * 4 + i]), dm[i], acc[i][kh]);
    }
    for (int i = 0; i < 4; ++i)
      for (int kh = 0; kh < 3; ++kh) V::storeu(dv + (i * 3 + kh) * ld + q0, acc[i][kh]);
  }
}

// v moved up one lane: lane i + 1 gets lane i, lane 0 gets 0.
template <typename T>
inline typename Vec<T>::reg lane_shift_up(typename Vec<T>::reg v) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  if constexpr (sizeof(T) == 4) {
    return _mm512_castsi512_ps(
        _mm512_alignr_epi32(_mm512_castps_si512(v), _mm512_setzero_si512(), 15));
  } else {
    return _mm512_castsi512_pd(
        _mm512_alignr_epi64(_mm512_castpd_si512(v), _mm512_setzero_si512(), 7));
  }
#else  // only the AVX-512 build runs the Winograd kernels; keep it simple
  using V = Vec<T>;
  alignas(64) T t[2 * V::L] = {};
  V::storeu(t + 1, v);
  return V::loadu(t);
#endif
}

// gx (OH + 2, W = 2T + 2) = the tile planes' adjoint of dv (4, 3, OH*T)
// [plane stride ld]; buf: scratch of 4 * (T + 1 + L). Per input row, the kh
// sum is a flat shift in tile space; tile t's last two columns overlap tile
// t+1's first two, so those contributions go through buf shifted by a tile.
template <typename T>
void wino_bwd_in_col2im(const T* __restrict dv, int64_t ld, int64_t OH, int64_t TT,
                        T* __restrict gx, T* __restrict buf) {
  using V = Vec<T>;
  using R = typename V::reg;
  const int64_t H = OH + 2, W = 2 * TT + 2, S = TT + 1 + V::L;
  T* const a0 = buf;       // D0 of tile t at t        (column 2t)
  T* const a1 = a0 + S;    // D1 of tile t at t        (column 2t + 1)
  T* const b2 = a1 + S;    // D2 of tile t at t + 1    (column 2t + 2)
  T* const b3 = b2 + S;    // D3 of tile t at t + 1    (column 2t + 3)
  for (int64_t r = 0; r < H; ++r) {
    const int64_t kh0 = std::max<int64_t>(0, r - (OH - 1)), kh1 = std::min<int64_t>(2, r);
    T* row = gx + r * W;
    if (TT + 1 <= V::L) {  // a row's tiles fit one vector: shift in registers
      R w[4];
      for (int i = 0; i < 4; ++i) {
        w[i] = V::zero();
        for (int64_t kh = kh0; kh <= kh1; ++kh)
          w[i] = V::add(w[i], V::loadp(dv + (i * 3 + kh) * ld + (r - kh) * TT, TT));
      }
      // Lanes >= T are 0, so lane T of the sums is the last tile's overhang.
      const R e = V::add(w[0], lane_shift_up<T>(V::sub(V::add(w[1], w[2]), w[0])));
      const R o = V::add(V::add(V::sub(w[1], w[2]), w[3]), lane_shift_up<T>(V::sub(V::zero(), w[3])));
      R lo, hi;
      V::interleave(e, o, lo, hi);
      V::storep(row, lo, std::min<int64_t>(W, V::L));
      V::storep(row + V::L, hi, std::max<int64_t>(0, W - V::L));
      continue;
    }
    for (int64_t t0 = 0; t0 < TT; t0 += V::L) {
      const int64_t m = std::min<int64_t>(V::L, TT - t0);
      R w[4];
      for (int i = 0; i < 4; ++i) {
        w[i] = V::zero();
        for (int64_t kh = kh0; kh <= kh1; ++kh)
          w[i] = V::add(w[i], V::loadp(dv + (i * 3 + kh) * ld + (r - kh) * TT + t0, m));
      }
      V::storep(a0 + t0, w[0], m);
      V::storep(a1 + t0, V::add(V::sub(w[1], w[2]), w[3]), m);
      V::storep(b2 + 1 + t0, V::sub(V::add(w[1], w[2]), w[0]), m);
      V::storep(b3 + 1 + t0, V::sub(V::zero(), w[3]), m);
    }
    a0[TT] = a1[TT] = b2[0] = b3[0] = T(0);
    for (int64_t t0 = 0; t0 <= TT; t0 += V::L) {
      const int64_t m = std::min<int64_t>(V::L, TT + 1 - t0);
      const R e = V::add(V::loadp(a0 + t0, m), V::loadp(b2 + t0, m));
      const R o = V::add(V::loadp(a1 + t0, m), V::loadp(b3 + t0, m));
      R lo, hi;
      V::interleave(e, o, lo, hi);
      V::storep(row + 2 * t0, lo, std::min<int64_t>(2 * m, V::L));
      V::storep(row + 2 * t0 + V::L, hi, std::max<int64_t>(0, 2 * m - V::L));
    }
  }
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
  const int64_t chunk = 8 * NV * Vec<T>::L;
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
