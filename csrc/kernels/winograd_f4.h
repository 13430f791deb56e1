// Winograd F(4x4, 3x3) for float32 stride-1 undilated 3x3 convolutions whose
// output rows are 13..16 wide (AVX-512 builds only; included by conv2d.cpp).
//
// Why: on a 13x13 plane F(2x2) needs 7x7 tiles x 16 products = 784 multiplies
// per image and channel pair; F(4x4) needs 4x4 tiles x 36 = 576 (direct: 1521).
// The products are 36 small gemms M[pos] (O x tiles) = U[pos] (O x C) @
// V[pos] (C x tiles) with C = 32..64, which the generic gemm handles poorly
// (packing and call overhead per tiny product), so they run on a dedicated
// register-blocked kernel on pre-packed operands instead.
//
// Matrices (Cook-Toom, interpolation points 0, 1, -1, 1/2, -2, inf):
//   B^T = [1 -3/2 -2 3/2 1 0; 0 -1 1/2 5/2 1 0; 0 1 -5/2 1/2 1 0;
//          0 -2 -1 2 1 0; 0 1/2 -1 -1/2 1 0; 0 1 -3/2 -2 3/2 1]
//   G   = [1 0 0; 1/3 1/3 1/3; -1/3 1/3 -1/3; -16/15 -8/15 -4/15;
//          1/15 -2/15 4/15; 0 0 1]
//   A^T = [1 1 1 1 1 0; 0 1 -1 1/2 -2 0; 0 1 1 1/4 4 0; 0 1 -1 1/8 -8 1]
// All of B^T and A^T are exact in binary. The usual points 0, +-1, +-2 give
// ~3x the rounding error: simulated in float32 with N(0,1) data and
// weights, max |err| / (1 + |y|) over 24k outputs is 1.4e-4 (C = 32) and
// 2.8e-4 (C = 64) for 0, +-1, +-2 against 4.9e-5 and 8.6e-5 for these
// points (F(2x2): 7e-6), and 0, +-1, +-2 failed the 2e-4 tolerance of
// tests/test_functional.py. An exhaustive search over 4-point sets drawn
// from +-{1, 2, 1/2, 1/4, 4, 3/2, 2/3, 3} found none clearly better with
// exact (dyadic) B^T and A^T. On the 32 -> 64 13x13 layer with weights
// scaled 1/sqrt(fan_in), max |err| / max |ref| against a float64 reference
// is ~1.3e-6 forward, ~2.6e-6 backward-input, ~1.7e-6 backward-weight
// (F(2x2): ~1e-7; the points 0, +-1, +-2: ~4e-6 .. 7e-6).
//
// Layout. With 4 tile columns per plane (OW in 13..16) one vector of 16 lanes
// holds 4 whole tile rows: lane = 4 * tile column + (tile row % 4). A plane
// of TH tile rows is `chunks` = ceil(TH / 4) vectors; images of a block are
// concatenated, so a block has T = images * chunks * 16 tile slots (slots past
// the last tile row are zero on input and ignored on output).
//   V[pos][c][T]     transformed input (chunk_transform)
//   U[ob][c][pos][RO] transformed weights, RO output channels per panel,
//                     rows past O zero (packed once per call; a filter's 36
//                     values land in one 1 KB run instead of 36 far apart)
//   Mb[pos][RO][T]   products of one panel of RO output channels
// Per block the working set is 36 * (C * T + RO * T) floats (T = 48, C = 64:
// ~500 KB), inside the 1 MB L2 of the target core.
//
// Backward-weight uses the transposed map: dU[pos] += dM[pos] @ V[pos]^T with
// dM = A dY A^T, then dw = G^T dU G (in double).
#pragma once

#if defined(__AVX512F__)

#include <algorithm>
#include <cstdint>

#include "fastnn/parallel.h"
#include "kernels/ops.h"
#include "kernels/simd.h"

namespace fastnn {
namespace FASTNN_ISA_NS {
namespace winograd {
namespace f4 {

// The 1-D transforms must inline into their callers: as calls they pass
// their vectors through memory and cost more than the arithmetic.
#define FASTNN_F4_INLINE inline __attribute__((always_inline))

constexpr int L = 16;          // float lanes
constexpr int RO = kProdRows;  // output channels per register tile (8 with AVX-512)
constexpr int NV = kProdVecs;  // vectors of tiles per register tile (24 accumulators)

struct Shape {
  int64_t Cin, Cout;  // channels in / out (per group)
  int64_t H, W;       // input plane
  int64_t OH, OW;     // output plane, 13 <= OW <= 16
  int64_t ph, pw;     // zero padding (top/left)
  int64_t TH;         // tile rows: ceil(OH / 4)
  int64_t chunks;     // 16-tile vectors per image: ceil(TH / 4)
  int64_t OB;         // panels of RO output channels: ceil(Cout / RO)
};

inline Shape make_shape(int64_t Cin, int64_t Cout, int64_t H, int64_t W, int64_t OH, int64_t OW,
                        int64_t ph, int64_t pw) {
  Shape s{Cin, Cout, H, W, OH, OW, ph, pw, (OH + 3) / 4, 0, (Cout + RO - 1) / RO};
  s.chunks = (s.TH + 3) / 4;
  return s;
}

// Whether F(4x4) beats F(2x2) for a plane: it needs 4 tile columns (OW in
// 13..16), and its padded multiply count (36 per 16-lane slot) must be clearly
// below F(2x2)'s (16 per 2x2 tile): the transforms cost more per product.
inline bool preferred(int64_t OH, int64_t OW) {
  if (OW < 13 || OW > 16 || OH < 1) return false;
  const int64_t chunks = ((OH + 3) / 4 + 3) / 4;
  const int64_t f4 = 36 * 16 * chunks, f2 = 16 * ((OH + 1) / 2) * ((OW + 1) / 2);
  return 5 * f4 <= 4 * f2;
}

// 1-D B^T d for one row/column of 6 taps: 16 operations, only 6 of them
// multiplies (the direct form: 18 with 12). Adds issue on pipes the FMAs and
// the transforms' shuffles do not use. With d42 = d4 - d2, d31 = d3 - d1:
//   v0 = (d0 - d2) + d42 + 3/2 d31        v3 = d42 + 2 d31
//   v1 = (d42 + d31) + 3/2 (d2 + d3)      v4 = d42 - 1/2 d31
//   v2 = (d42 - d31) + 3/2 (d3 - d2)      v5 = (d5 - d3) - d31 + 3/2 d42
FASTNN_F4_INLINE void in1d(const __m512* d, __m512* v) {
  const __m512 h = _mm512_set1_ps(0.5f), one5 = _mm512_set1_ps(1.5f), two = _mm512_set1_ps(2.f);
  const __m512 d42 = _mm512_sub_ps(d[4], d[2]), d31 = _mm512_sub_ps(d[3], d[1]);
  const __m512 p = _mm512_add_ps(d42, d31), m = _mm512_sub_ps(d42, d31);
  v[0] = _mm512_fmadd_ps(one5, d31, _mm512_add_ps(_mm512_sub_ps(d[0], d[2]), d42));
  v[1] = _mm512_fmadd_ps(one5, _mm512_add_ps(d[2], d[3]), p);
  v[2] = _mm512_fmadd_ps(one5, _mm512_sub_ps(d[3], d[2]), m);
  v[3] = _mm512_fmadd_ps(two, d31, d42);
  v[4] = _mm512_fnmadd_ps(h, d31, d42);
  v[5] = _mm512_fmadd_ps(one5, d42, _mm512_sub_ps(_mm512_sub_ps(d[5], d[3]), d31));
}

// 1-D A^T m for 6 transform-domain values -> 4 outputs.
FASTNN_F4_INLINE void out1d(const __m512* m, __m512* y) {
  const __m512 s12 = _mm512_add_ps(m[1], m[2]), d12 = _mm512_sub_ps(m[1], m[2]);
  y[0] = _mm512_add_ps(_mm512_add_ps(m[0], s12), _mm512_add_ps(m[3], m[4]));
  y[1] = _mm512_fmadd_ps(_mm512_set1_ps(0.5f), m[3], _mm512_fnmadd_ps(_mm512_set1_ps(2.f), m[4], d12));
  y[2] = _mm512_fmadd_ps(_mm512_set1_ps(0.25f), m[3], _mm512_fmadd_ps(_mm512_set1_ps(4.f), m[4], s12));
  y[3] = _mm512_add_ps(
      _mm512_fmadd_ps(_mm512_set1_ps(0.125f), m[3], _mm512_fnmadd_ps(_mm512_set1_ps(8.f), m[4], d12)),
      m[5]);
}

// 1-D A g for 4 grad_out values -> 6 transform-domain values.
FASTNN_F4_INLINE void grad1d(const __m512* a, __m512* v) {
  const __m512 e = _mm512_add_ps(a[0], a[2]), o = _mm512_add_ps(a[1], a[3]);
  v[0] = a[0];
  v[1] = _mm512_add_ps(e, o);
  v[2] = _mm512_sub_ps(e, o);
  v[3] = _mm512_fmadd_ps(_mm512_set1_ps(0.5f), a[1],
                         _mm512_fmadd_ps(_mm512_set1_ps(0.25f), a[2],
                                         _mm512_fmadd_ps(_mm512_set1_ps(0.125f), a[3], a[0])));
  v[4] = _mm512_fnmadd_ps(_mm512_set1_ps(2.f), a[1],
                          _mm512_fmadd_ps(_mm512_set1_ps(4.f), a[2],
                                          _mm512_fnmadd_ps(_mm512_set1_ps(8.f), a[3], a[0])));
  v[5] = a[3];
}

// Function objects for chunk_transform (a distinct type each, so inlined).
struct In1d {
  FASTNN_F4_INLINE void operator()(const __m512* d, __m512* v) const { in1d(d, v); }
};
struct Grad1d {
  FASTNN_F4_INLINE void operator()(const __m512* a, __m512* v) const { grad1d(a, v); }
};

constexpr double kG[6][3] = {{1, 0, 0},
                             {1. / 3, 1. / 3, 1. / 3},
                             {-1. / 3, 1. / 3, -1. / 3},
                             {-16. / 15, -8. / 15, -4. / 15},
                             {1. / 15, -2. / 15, 4. / 15},
                             {0, 0, 1}};

// U[ob][c][pos][RO] = (G g G^T)[pos] for the filter of output row o = ob*RO + r
// and input column c, g = w[o*rs + c*cs] (9 contiguous values, optionally
// rotated 180 degrees); computed in double, rows o >= R are zero.
inline void transform_weight_panels(const float* w, int64_t R, int64_t C, int64_t rs, int64_t cs,
                                    bool rotate, float* U, int64_t ob0, int64_t ob1) {
  // Vectors (double) run over the RO = 8 rows of a panel, so each of the 36
  // results is one 8-float store into the packed layout.
  static_assert(RO == 8, "one __m512d per panel row group");
  for (int64_t ob = ob0; ob < ob1; ++ob) {
    const int64_t nr = std::min<int64_t>(RO, R - ob * RO);
    for (int64_t c = 0; c < C; ++c) {
      alignas(64) double gs[9][RO];
      for (int64_t r = 0; r < RO; ++r) {
        const float* g0 = w + (ob * RO + std::min(r, nr - 1)) * rs + c * cs;
        for (int t = 0; t < 9; ++t) gs[t][r] = r < nr ? g0[rotate ? 8 - t : t] : 0.0;
      }
      __m512d g[3][3], t[6][3];
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) g[i][j] = _mm512_load_pd(gs[i * 3 + j]);
      for (int i = 0; i < 6; ++i)
        for (int j = 0; j < 3; ++j) {
          __m512d acc = _mm512_setzero_pd();
          for (int k = 0; k < 3; ++k)
            if (kG[i][k] != 0) acc = _mm512_fmadd_pd(_mm512_set1_pd(kG[i][k]), g[k][j], acc);
          t[i][j] = acc;
        }
      float* u = U + (ob * C + c) * 36 * RO;
      for (int i = 0; i < 6; ++i)
        for (int j = 0; j < 6; ++j) {
          __m512d acc = _mm512_setzero_pd();
          for (int k = 0; k < 3; ++k)
            if (kG[j][k] != 0) acc = _mm512_fmadd_pd(_mm512_set1_pd(kG[j][k]), t[i][k], acc);
          _mm256_storeu_ps(u + (i * 6 + j) * RO, _mm512_cvtpd_ps(acc));
        }
    }
  }
}

inline void transform_weights(const float* w, int64_t R, int64_t C, int64_t rs, int64_t cs,
                              bool rotate, float* U) {
  // Runs before the parallel part of every call: split over panels (threads
  // write disjoint panels) so it does not serialize ~2% of a 2-thread call.
  parallel_for((R + RO - 1) / RO, 1, [=](int64_t ob0, int64_t ob1) {
    transform_weight_panels(w, R, C, rs, cs, rotate, U, ob0, ob1);
  });
}

// dw (3x3 at w + o*rs + c*cs) = G^T dU G with dU[o][.][c] = the sum over
// `parts` partials (part_stride apart, each laid out [R][pos][ldc]), added in
// part order in double so the result does not depend on thread timing.
// Split over output rows (disjoint dw rows per thread).
inline void untransform_weight_rows(const float* dU, int64_t parts, int64_t part_stride,
                                    int64_t C, int64_t ldc, int64_t rs, int64_t cs, float* w,
                                    int64_t o0, int64_t o1) {
  // Vectors run over 8 consecutive input channels c (contiguous in dU; ldc is
  // a whole number of vectors, so the last block reads zero padding).
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t c0 = 0; c0 < C; c0 += 8) {
      __m512d u[36];
      for (int p = 0; p < 36; ++p) {
        const float* src = dU + (o * 36 + p) * ldc + c0;
        __m512d acc = _mm512_cvtps_pd(_mm256_loadu_ps(src));
        for (int64_t q = 1; q < parts; ++q)
          acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_loadu_ps(src + q * part_stride)));
        u[p] = acc;
      }
      __m512d sg[3][6];  // G^T dU
      for (int a = 0; a < 3; ++a)
        for (int j = 0; j < 6; ++j) {
          __m512d acc = _mm512_setzero_pd();
          for (int i = 0; i < 6; ++i)
            if (kG[i][a] != 0) acc = _mm512_fmadd_pd(_mm512_set1_pd(kG[i][a]), u[i * 6 + j], acc);
          sg[a][j] = acc;
        }
      alignas(64) double out[9][8];
      for (int a = 0; a < 3; ++a)
        for (int b = 0; b < 3; ++b) {
          __m512d acc = _mm512_setzero_pd();
          for (int j = 0; j < 6; ++j)
            if (kG[j][b] != 0) acc = _mm512_fmadd_pd(_mm512_set1_pd(kG[j][b]), sg[a][j], acc);
          _mm512_store_pd(out[a * 3 + b], acc);
        }
      const int64_t nc = std::min<int64_t>(8, C - c0);
      for (int64_t l = 0; l < nc; ++l) {
        float* g = w + o * rs + (c0 + l) * cs;
        for (int t = 0; t < 9; ++t) g[t] = static_cast<float>(out[t][l]);
      }
    }
  }
}

inline void untransform_weight_grad(const float* dU, int64_t parts, int64_t part_stride, int64_t R,
                                    int64_t C, int64_t ldc, int64_t rs, int64_t cs, float* w) {
  parallel_for(R, 1, [=](int64_t o0, int64_t o1) {
    untransform_weight_rows(dU, parts, part_stride, C, ldc, rs, cs, w, o0, o1);
  });
}

// Plane window of one chunk (4 tile rows): tile row th = 4k + thl reads plane
// rows 4*th - ph + r and columns 4*tw - pw + j for taps r, j < NT.
struct Window {
  int64_t H, W, ph, pw;  // plane and its zero padding (top/left)
  int64_t TH;            // tile rows in the plane
  __mmask16 lo, hi;      // plane columns present in grid columns 0..15 / 16..31
  Window(int64_t H_, int64_t W_, int64_t ph_, int64_t pw_, int64_t TH_)
      : H(H_), W(W_), ph(ph_), pw(pw_), TH(TH_), lo(0), hi(0) {
    for (int c = 0; c < 16; ++c) {
      if (c - pw >= 0 && c - pw < W) lo = static_cast<__mmask16>(lo | (1u << c));
      if (16 + c - pw >= 0 && 16 + c - pw < W) hi = static_cast<__mmask16>(hi | (1u << c));
    }
  }
};

// In-lane 4x4 transpose in every 128-bit block: q[k] element e -> d[e]
// element k (block unchanged). Only in-lane shuffles (1-cycle unpck/shufps),
// no cross-lane permutes.
FASTNN_F4_INLINE void transpose4x4_blocks(const __m512* q, __m512* d, int n) {
  const __m512 t0 = _mm512_unpacklo_ps(q[0], q[1]), t1 = _mm512_unpacklo_ps(q[2], q[3]);
  d[0] = _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0));
  d[1] = _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2));
  if (n > 2) {
    const __m512 t2 = _mm512_unpackhi_ps(q[0], q[1]), t3 = _mm512_unpackhi_ps(q[2], q[3]);
    d[2] = _mm512_shuffle_ps(t2, t3, _MM_SHUFFLE(1, 0, 1, 0));
    d[3] = _mm512_shuffle_ps(t2, t3, _MM_SHUFFLE(3, 2, 3, 2));
  }
}

// out[pos][slot .. slot+16] (ldp apart) = X^T d X for the 16 tiles of chunk k
// of one plane, where d is a tile's NT x NT taps and f1d applies the 1-D X^T
// (NT -> 6 values): B^T for input tiles (NT = 6), A for grad_out (NT = 4).
//
// Why not gathers: a 16-lane gather costs ~25 cycles on the target core, and
// a tile needs 36 (input) or 16 (grad_out) of them. Instead each plane row of
// the chunk is loaded once (zero padding via masks); a loaded row holds tap
// columns j = 0..3 of tile column tw in element j of 128-bit block tw, and a
// copy shifted by 4 columns holds taps j = 4, 5 in elements 0, 1. For tap row
// r the rows 4*thl + r of the 4 tile rows then give the tap vectors d[r][j]
// (lane 4*tw + thl, the slot order of every buffer here) by a 4x4 transpose
// inside each 128-bit block: in-lane shuffles only (the earlier lane order
// 4*thl + tw needed a cross-lane permute per row and 6 block shuffles per tap
// row). Lanes of tile rows past TH come out zero.
template <int NT, typename F>
inline void chunk_transform(const Window& wd, int64_t k, const float* plane, float* out,
                            int64_t ldp, F f1d) {
  constexpr int kRows = 12 + NT;  // plane rows under 4 tile rows
  const int64_t tile_rows = std::min<int64_t>(4, wd.TH - 4 * k);
  const int64_t rows = 4 * (tile_rows - 1) + NT;
  __m512 p0[kRows], p1[NT > 4 ? kRows : 1];
  for (int gr = 0; gr < kRows; ++gr) {
    const int64_t ih = 16 * k + gr - wd.ph;
    if (gr >= rows || ih < 0 || ih >= wd.H) {
      p0[gr] = _mm512_setzero_ps();
      if constexpr (NT > 4) p1[gr] = _mm512_setzero_ps();
      continue;
    }
    const float* src = plane + ih * wd.W - wd.pw;
    const __m512 lo = _mm512_maskz_loadu_ps(wd.lo, src);
    p0[gr] = lo;
    if constexpr (NT > 4) {
      // Rows up to 15 wide need nothing past grid column 15 (hi == 0).
      const __m512 hi = wd.hi ? _mm512_maskz_loadu_ps(wd.hi, src + 16) : _mm512_setzero_ps();
      p1[gr] = _mm512_castsi512_ps(
          _mm512_alignr_epi32(_mm512_castps_si512(hi), _mm512_castps_si512(lo), 4));
    }
  }
  __m512 t[NT][6];  // per tap row r: 1-D transform along the tap columns
  for (int r = 0; r < NT; ++r) {
    __m512 d[NT];
    const __m512 q[4] = {p0[r], p0[4 + r], p0[8 + r], p0[12 + r]};
    transpose4x4_blocks(q, d, 4);
    if constexpr (NT > 4) {
      const __m512 qs[4] = {p1[r], p1[4 + r], p1[8 + r], p1[12 + r]};
      transpose4x4_blocks(qs, d + 4, 2);
    }
    f1d(d, t[r]);
  }
  const __mmask16 valid = static_cast<__mmask16>(0x1111u * ((1u << tile_rows) - 1u));
  for (int jj = 0; jj < 6; ++jj) {
    __m512 col[NT], v[6];
    for (int r = 0; r < NT; ++r) col[r] = t[r][jj];
    f1d(col, v);
    // Masking only a chunk with missing tile rows saves 36 ops per chunk.
    if (tile_rows == 4) {
      for (int i = 0; i < 6; ++i) _mm512_storeu_ps(out + (i * 6 + jj) * ldp, v[i]);
    } else {
      for (int i = 0; i < 6; ++i)
        _mm512_storeu_ps(out + (i * 6 + jj) * ldp, _mm512_maskz_mov_ps(valid, v[i]));
    }
  }
}

// chunk_transform for planes whose tiles need no grid column past 15
// (Window::hi == 0: rows up to 15 wide with one column of left padding, or
// 16 wide without, as in the 13x13 layers). The 1-D pass over tap rows runs
// first, vertically on whole plane rows (lanes = grid columns, no shuffles);
// each of its 6 results then needs one 4x4 in-lane transpose for taps
// j = 0..3, and for input tiles taps 4, 5 of tile column tw are taps 0, 1 of
// tile column tw + 1: the next 128-bit block, zero past the last. For input
// tiles (NT = 6) that is 10 1-D transforms and 60 shuffles per chunk instead
// of 12 and 90, and for grad_out tiles (NT = 4) no fewer operations, but in
// both the 24 intermediate vectors mostly stay in registers where the general
// path spilled (~70 vectors for input tiles). In isolation an input chunk went
// from 77 to 50 ns; the grad_out transforms, 15% of the 32 -> 64 13x13
// layer's backward-weight, took it from 3.74 to 3.56 ms on one thread.
// Tile rows past TH are zero, so their lanes come out zero unmasked.
// Not inlined: inlined into weight_grad_range it made that pass ~9% slower.
template <int NT, typename F>
__attribute__((noinline)) void chunk_transform_narrow(const Window& wd, int64_t k,
                                                      const float* plane, float* out, int64_t ldp,
                                                      F f1d) {
  const int64_t tile_rows = std::min<int64_t>(4, wd.TH - 4 * k);
  __m512 u[4][6];
#pragma GCC unroll 4
  for (int thl = 0; thl < 4; ++thl) {
    if (thl >= tile_rows) {
#pragma GCC unroll 6
      for (int i = 0; i < 6; ++i) u[thl][i] = _mm512_setzero_ps();
      continue;
    }
    __m512 d[NT];
#pragma GCC unroll 6
    for (int r = 0; r < NT; ++r) {
      const int64_t ih = 16 * k + 4 * thl + r - wd.ph;
      d[r] = ih < 0 || ih >= wd.H ? _mm512_setzero_ps()
                                  : _mm512_maskz_loadu_ps(wd.lo, plane + ih * wd.W - wd.pw);
    }
    f1d(d, u[thl]);
  }
  const __m512i zero = _mm512_setzero_si512();
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) {
    const __m512 q[4] = {u[0][i], u[1][i], u[2][i], u[3][i]};
    __m512 e[NT], v[6];
    transpose4x4_blocks(q, e, 4);
    if constexpr (NT == 6) {
      e[4] = _mm512_castsi512_ps(_mm512_alignr_epi32(zero, _mm512_castps_si512(e[0]), 4));
      e[5] = _mm512_castsi512_ps(_mm512_alignr_epi32(zero, _mm512_castps_si512(e[1]), 4));
    }
    f1d(e, v);
#pragma GCC unroll 6
    for (int jj = 0; jj < 6; ++jj) _mm512_storeu_ps(out + (i * 6 + jj) * ldp, v[jj]);
  }
}

// A g A^T for chunk k of a grad_out plane (see chunk_transform).
inline void grad_chunk(const Window& wd, int64_t k, const float* plane, float* out, int64_t ldp) {
  if (wd.hi == 0) {
    chunk_transform_narrow<4>(wd, k, plane, out, ldp, Grad1d{});
  } else {
    chunk_transform<4>(wd, k, plane, out, ldp, Grad1d{});
  }
}

// B^T d B for chunk k of an input plane (see chunk_transform).
inline void input_chunk(const Window& wd, int64_t k, const float* plane, float* out, int64_t ldp) {
  if (wd.hi == 0) {
    chunk_transform_narrow<6>(wd, k, plane, out, ldp, In1d{});
  } else {
    chunk_transform<6>(wd, k, plane, out, ldp, In1d{});
  }
}

// Transforms images [n0, n1) into V (block layout above).
inline void input_block(const Shape& s, const float* x, int64_t x_img, int64_t n0, int64_t n1,
                        int64_t T, float* V) {
  const Window wd(s.H, s.W, s.ph, s.pw, s.TH);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t c = 0; c < s.Cin; ++c)
      for (int64_t k = 0; k < s.chunks; ++k)
        input_chunk(wd, k, x + n * x_img + c * s.H * s.W, V + c * T + ((n - n0) * s.chunks + k) * L,
                    pos_stride<float>(s.Cin * T));
}

// Output channel o's 16 tiles of chunk k: y plane rows 4*(4k + thl) + i.
// Mo points at Mb[0][r][slot]; ldp = RO * T.
inline void output_chunk(const Shape& s, int64_t k, const float* Mo, int64_t ldp, float bias,
                         float* y) {
  __m512 q[6][4];  // A^T along each row of the 6x6 transform domain
  for (int r = 0; r < 6; ++r) {
    __m512 m[6];
    for (int j = 0; j < 6; ++j) m[j] = _mm512_loadu_ps(Mo + (r * 6 + j) * ldp);
    // Column 1 of A^T is all ones, so bias added at position (1, 1) reaches
    // every output once.
    if (r == 1) m[1] = _mm512_add_ps(m[1], _mm512_set1_ps(bias));
    out1d(m, q[r]);
  }
  // Y[i][j] = A^T along the tap rows of q[.][j].
  __m512 Y[4][4];
  for (int j = 0; j < 4; ++j) {
    __m512 col[6], o4[4];
    for (int r = 0; r < 6; ++r) col[r] = q[r][j];
    out1d(col, o4);
    for (int i = 0; i < 4; ++i) Y[i][j] = o4[i];
  }
  // Y[i][j] lanes are 4*tw + thl; output row 4*(4k + thl) + i needs lanes
  // 4*tw + j: a 4x4 transpose inside each 128-bit block (in-lane shuffles).
  const __mmask16 cols = static_cast<__mmask16>((1u << s.OW) - 1u);
  for (int i = 0; i < 4; ++i) {
    __m512 rows[4];
    transpose4x4_blocks(Y[i], rows, 4);
    for (int thl = 0; thl < 4; ++thl) {
      const int64_t oh = 4 * (4 * k + thl) + i;
      if (oh < s.OH) _mm512_mask_storeu_ps(y + oh * s.OW, cols, rows[thl]);
    }
  }
}

// Mb[pos] (RO x T) = U panel (RO x C at pos) @ V[pos] (C x T) for the 36
// positions; U points at the panel (36 * RO floats per input channel, the
// packed layout above), V and Mb positions vpos and mpos apart, T a whole
// number of vectors.
inline void panel_products(const float* U, int64_t C, const float* V, int64_t vpos, int64_t T,
                           float* M, int64_t mpos) {
  const int64_t nvec = T / L;
  for (int pos = 0; pos < 36; ++pos) {
    const float* u = U + pos * RO;
    const float* v = V + pos * vpos;
    float* m = M + pos * mpos;
    int64_t t = 0;
    for (; t + NV <= nvec; t += NV)
      prod_micro<float, NV>(u, 36 * RO, v + t * L, C, T, m + t * L, T);
    if (nvec - t == 2) prod_micro<float, 2>(u, 36 * RO, v + t * L, C, T, m + t * L, T);
    if (nvec - t == 1) prod_micro<float, 1>(u, 36 * RO, v + t * L, C, T, m + t * L, T);
  }
}

// Images per block: about NV vectors of tiles for the forward kernel, fewer
// when that would leave a thread without a block.
inline int64_t images_per_block(const Shape& s, int64_t N, int64_t vectors) {
  int64_t nb = std::max<int64_t>(1, std::min<int64_t>(N, vectors / s.chunks));
  const int64_t nt = get_num_threads();
  if (nt > 1 && (N + nb - 1) / nb < nt) nb = std::max<int64_t>(1, (N + nt - 1) / nt);
  return nb;
}

// Blocks for N images in blocks of about nb: blocks of nb or nb - 1 images
// (block b holds images [N*b/blocks, N*(b+1)/blocks)), as many as a multiple of
// the thread count (the pool hands each thread one contiguous range of
// blocks): 128 images in 43 blocks of 3 would leave one thread a block behind.
inline int64_t balanced_blocks(int64_t N, int64_t nb) {
  const int64_t nt = get_num_threads();
  const int64_t blocks = (N + nb - 1) / nb;
  return nt > 1 && blocks >= nt ? std::min(N, (blocks + nt - 1) / nt * nt) : blocks;
}

// y[n] (Cout, OH, OW) = conv3x3(x[n] (Cin, H, W)) + bias for n in [0, N);
// U packed by transform_weights; image strides as in winograd::forward.
// Per block: input transform into V, then per panel of RO output channels the
// 36 products into Mb (L2) and straight away their output transform.
inline void forward(const Shape& s, int64_t N, const float* x, int64_t x_img, const float* U,
                    const float* bias, float* y, int64_t y_img) {
  const int64_t nb = images_per_block(s, N, NV);
  const int64_t blocks = balanced_blocks(N, nb);
  const int64_t per_image = s.chunks * L, Tmax = ((N + blocks - 1) / blocks) * per_image;
  auto body = [&](int64_t b0, int64_t b1) {
    Scratch<float> V(kSlotWinoIn, 36 * pos_stride<float>(s.Cin * Tmax)),
        M(kSlotWinoOut, 36 * pos_stride<float>(RO * Tmax));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = N * blk / blocks, n1 = N * (blk + 1) / blocks, T = (n1 - n0) * per_image;
      input_block(s, x, x_img, n0, n1, T, V.get());
      for (int64_t ob = 0; ob < s.OB; ++ob) {
        panel_products(U + ob * s.Cin * 36 * RO, s.Cin, V.get(), pos_stride<float>(s.Cin * T), T,
                       M.get(), pos_stride<float>(RO * T));
        for (int64_t r = 0; r < RO && ob * RO + r < s.Cout; ++r) {
          const int64_t o = ob * RO + r;
          for (int64_t n = n0; n < n1; ++n)
            for (int64_t k = 0; k < s.chunks; ++k)
              output_chunk(s, k, M.get() + r * T + (n - n0) * per_image + k * L, pos_stride<float>(RO * T),
                           bias ? bias[o] : 0.f, y + n * y_img + o * s.OH * s.OW);
        }
      }
    }
  };
  if (blocks >= get_num_threads() && get_num_threads() > 1) {
    parallel_for(blocks, 1, body);
  } else {
    body(0, blocks);
  }
}

// In-register 16x16 transpose: r[i] lane j -> r[j] lane i.
inline void transpose16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(u[8 * i + j], u[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(u[8 * i + j], u[8 * i + 4 + j], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
  }
}

// Backward-weight register tile: du (NR x CV*16) [ld ldu] += dm (NR x T)
// [ld ldm] @ vt (T x CV*16) [ld ldv]. The reduction runs over tiles, so the
// channel dimension c is the vector one (vt = V transposed); dm is broadcast.
template <int NR, int CV>
inline void wgrad_micro(const float* __restrict dm, int64_t ldm, const float* __restrict vt,
                        int64_t ldv, int64_t T, float* __restrict du, int64_t ldu) {
  __m512 acc[NR][CV];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < CV; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; ++t, vt += ldv) {
    __m512 b[CV];
#pragma GCC unroll 16
    for (int j = 0; j < CV; ++j) b[j] = _mm512_loadu_ps(vt + j * L);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const __m512 a = _mm512_set1_ps(dm[r * ldm + t]);
#pragma GCC unroll 16
      for (int j = 0; j < CV; ++j) acc[r][j] = _mm512_fmadd_ps(a, b[j], acc[r][j]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < CV; ++j) {
      float* d = du + r * ldu + j * L;
      _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), acc[r][j]));
    }
}

constexpr int kWRows = 12;  // output channels per backward-weight register tile (12 x 2 vectors)

template <int NR>
inline void wgrad_rows(const float* dm, int64_t ldm, const float* vt, int64_t ldv, int64_t T,
                       int64_t cvecs, float* du, int64_t ldu) {
  int64_t j = 0;
  for (; j + 2 <= cvecs; j += 2) wgrad_micro<NR, 2>(dm, ldm, vt + j * L, ldv, T, du + j * L, ldu);
  if (j < cvecs) wgrad_micro<NR, 1>(dm, ldm, vt + j * L, ldv, T, du + j * L, ldu);
}

inline void wgrad_tile(int nr, const float* dm, int64_t ldm, const float* vt, int64_t ldv,
                       int64_t T, int64_t cvecs, float* du, int64_t ldu) {
  switch (nr) {
#define FASTNN_ROWS(R) \
  case R: wgrad_rows<R>(dm, ldm, vt, ldv, T, cvecs, du, ldu); break;
    FASTNN_ROWS(1) FASTNN_ROWS(2) FASTNN_ROWS(3) FASTNN_ROWS(4) FASTNN_ROWS(5) FASTNN_ROWS(6)
    FASTNN_ROWS(7) FASTNN_ROWS(8) FASTNN_ROWS(9) FASTNN_ROWS(10) FASTNN_ROWS(11) FASTNN_ROWS(12)
#undef FASTNN_ROWS
    default: break;
  }
}

// Channels padded to whole vectors in the backward-weight layouts.
inline int64_t padded_channels(int64_t C) { return (C + L - 1) / L * L; }

// dU[o][pos][c] (c padded to Cp = padded_channels(Cin), pad columns get 0)
// += sum over tiles of dM[pos][o][t] * V[pos][c][t] for images [n0, n1).
// Per block of nb images (T = nb * chunks * 16 tile slots):
//   VT[pos][T][Cp]        transformed input, transposed (16x16 in registers)
//   dMb[pos][kWRows][T]   transformed grad_out of one panel of output channels
// (T = 64: ~300 + ~110 KB, in L2); every (panel, pos) is one pass of
// wgrad_micro over all T tiles, so each accumulator sums T products.
inline void weight_grad_range(const Shape& s, int64_t n0, int64_t n1, const float* gy,
                              int64_t gy_img, const float* x, int64_t x_img, float* dU) {
  const Window win(s.H, s.W, s.ph, s.pw, s.TH), wgy(s.OH, s.OW, 0, 0, s.TH);
  const int64_t per_image = s.chunks * L, Cp = padded_channels(s.Cin), cvecs = Cp / L;
  const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(n1 - n0, 4 / s.chunks));
  Scratch<float> VT(kSlotWinoIn, 36 * pos_stride<float>(Cp * nb * per_image));
  Scratch<float> dM(kSlotWinoOut, 36 * pos_stride<float>(kWRows * nb * per_image));
  Scratch<float> tmp(kSlotWinoGrid, 36 * pos_stride<float>(L * L));  // 16 channels x 16 tiles per position
  for (int64_t b = n0; b < n1; b += nb) {
    const int64_t e = std::min(n1, b + nb), T = (e - b) * per_image;
    for (int64_t n = b; n < e; ++n) {
      for (int64_t k = 0; k < s.chunks; ++k) {
        const int64_t slot = (n - b) * per_image + k * L;
        for (int64_t c0 = 0; c0 < Cp; c0 += L) {
          const int64_t nc = std::min<int64_t>(L, s.Cin - c0);
          for (int64_t ci = 0; ci < nc; ++ci)
            input_chunk(win, k, x + n * x_img + (c0 + ci) * s.H * s.W, tmp.get() + ci * L,
                        pos_stride<float>(L * L));
          for (int pos = 0; pos < 36; ++pos) {
            __m512 r[16];
            for (int ci = 0; ci < L; ++ci)
              r[ci] = ci < nc ? _mm512_loadu_ps(tmp.get() + pos * pos_stride<float>(L * L) + ci * L) : _mm512_setzero_ps();
            transpose16(r);
            float* dst = VT.get() + pos * pos_stride<float>(T * Cp) + slot * Cp + c0;
            for (int l = 0; l < L; ++l) _mm512_storeu_ps(dst + l * Cp, r[l]);
          }
        }
      }
    }
    // Panels of about equal height (64 = 4 x 11 + 2 x 10, not 5 x 12 + 4: a
    // 4-row panel has too few accumulators to keep the FMA pipes busy).
    const int64_t panels = (s.Cout + kWRows - 1) / kWRows;
    for (int64_t pi = 0, o0 = 0; pi < panels; ++pi) {
      const int nr = static_cast<int>((s.Cout - o0 + (panels - pi) - 1) / (panels - pi));
      for (int r = 0; r < nr; ++r)
        for (int64_t n = b; n < e; ++n)
          for (int64_t k = 0; k < s.chunks; ++k)
            grad_chunk(wgy, k, gy + n * gy_img + (o0 + r) * s.OH * s.OW,
                       dM.get() + r * T + (n - b) * per_image + k * L, pos_stride<float>(kWRows * T));
      for (int pos = 0; pos < 36; ++pos)
        wgrad_tile(nr, dM.get() + pos * pos_stride<float>(kWRows * T), T, VT.get() + pos * pos_stride<float>(T * Cp),
                   Cp, T, cvecs, dU + (o0 * 36 + pos) * Cp, 36 * Cp);
      o0 += nr;
    }
  }
}

#undef FASTNN_F4_INLINE

}  // namespace f4
}  // namespace winograd
}  // namespace FASTNN_ISA_NS
}  // namespace fastnn

#endif  // __AVX512F__
