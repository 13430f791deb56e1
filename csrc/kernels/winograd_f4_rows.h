// Winograd F(4x4, 3x3) for float32 stride-1 undilated 3x3 convolutions whose
// output rows are 5..12 or 17..28 wide (AVX-512 builds only; included by conv2d.cpp
// after winograd_f4.h, whose matrices, 1-D transforms, packed weights,
// weight-gradient untransform and product tile it uses).
//
// Why: on the strong preset's 24x24 planes F(2x2) needs 12x12 tiles x 16 =
// 2304 multiplies per image and channel pair, F(4x4) 6x6 tiles x 36 = 1296,
// and F(4x4) writes 36 transformed values per 16 outputs where F(2x2) writes
// 64 (its transforms are bound by those stores: ~45% of its 26x26 backward-
// input on one Emerald Rapids core, perf samples). winograd_f4.h's layout, 4 x 4 tiles per
// vector, fits 13..16-wide rows only: on these planes its padded slots bring
// the multiply count back to F(2x2)'s.
//
// Layout. A block's tiles are numbered in raster order, image by image:
// slot = image * TH * TW + th * TW + tw, T slots in all (a whole number of
// vectors; slots past the tiles are zero). Products need no padding but the
// last vector's.
//   V[pos][c][T]       transformed input (pos_stride apart)
//   U[ob][c][pos][RO]  transformed weights (winograd_f4.h's packed panels)
//   Mb[pos][RO][T]     products of one panel of RO output channels
//   dM[pos][o][T]      transformed grad_out (backward-weight, and
//                      backward-input as the adjoint, further down)
//
// Transforms (wide planes; narrow ones further down). Two tile rows share a
// vector (2 * TW <= 14 of its 16 lanes).
// The 1-D pass over tap rows runs first, on whole plane rows (lanes = plane
// columns, two vectors cover the 4 * TW + 2 <= 32 columns of a tile row); one
// two-source permute per tap column then gathers column 4 * tw + j of each
// tile into lane tw (plus a blend for the pair's second row), and the 1-D
// pass over tap columns finishes the tile. The output transform runs the same
// steps backwards.
#pragma once

#if defined(__AVX512F__)

#include <algorithm>
#include <cstdint>

#include "fastnn/parallel.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "kernels/winograd_f4.h"

namespace fastnn {
namespace FASTNN_ISA_NS {
namespace winograd {
namespace f4rows {

#define FASTNN_F4R_INLINE inline __attribute__((always_inline))

using f4::L;
using f4::RO;
using f4::Window;

struct Shape {
  int64_t Cin, Cout;  // channels in / out (per group)
  int64_t H, W;       // input plane
  int64_t OH, OW;     // output plane, OW in 5..12 or 17..28
  int64_t ph, pw;     // zero padding (top/left)
  int64_t TH, TW;     // tile rows / columns: ceil(OH / 4), ceil(OW / 4)
  int64_t OB;         // panels of RO output channels
};

inline Shape make_shape(int64_t Cin, int64_t Cout, int64_t H, int64_t W, int64_t OH, int64_t OW,
                        int64_t ph, int64_t pw) {
  return Shape{Cin, Cout, H, W, OH, OW, ph, pw, (OH + 3) / 4, (OW + 3) / 4, (Cout + RO - 1) / RO};
}

// Whether this path takes a plane: a tile row's 4 * TW + 2 grid columns fit
// one vector (OW 5..12) or two (17..28; 13..16 are winograd_f4.h's), and the
// multiply count (36 per 4x4 tile) is at most F(2x2)'s (16 per 2x2 tile).
// Unlike winograd_f4.h's padded layout, this one transforms no more values
// per output than F(2x2) does, so the products decide: at 10x10 (0.81x
// F(2x2)'s multiplies) it was still 1.2-1.5x faster on one core.
inline bool preferred(int64_t OH, int64_t OW) {
  if (OW < 5 || (OW > 12 && OW < 17) || OW > 28 || OH < 1) return false;
  const int64_t f4 = 36 * ((OH + 3) / 4) * ((OW + 3) / 4);
  const int64_t f2 = 16 * ((OH + 1) / 2) * ((OW + 1) / 2);
  return f4 <= f2;
}

inline __mmask16 lanes(int64_t n) {
  return static_cast<__mmask16>((1u << std::clamp<int64_t>(n, 0, 16)) - 1u);
}

// Permute indices for tile-row width TW (see the top).
struct Perms {
  // tap[j], lane l (tile column l % TW of the pair's row l / TW): column 4 * (l % TW) + j
  __m512i tap[6];
  __m512i out[2][2];  // [row of the pair][column half]: Y lane of output column 4 * tw + jj
  __mmask16 second;   // lanes of the pair's second row
  explicit Perms(int64_t TW) {
    alignas(64) int32_t idx[16];
    for (int j = 0; j < 6; ++j) {
      for (int l = 0; l < 16; ++l)
        idx[l] = l < 2 * TW ? static_cast<int32_t>(4 * (l % TW) + j) : 0;
      tap[j] = _mm512_load_si512(idx);
    }
    // Output column c of half h is tile column tw = 4h + c / 4, tap jj = c % 4:
    // Y[jj] lane tw (+ TW for the second row); odd jj from the permute's
    // second source.
    for (int t = 0; t < 2; ++t)
      for (int h = 0; h < 2; ++h) {
        for (int c = 0; c < 16; ++c)
          idx[c] = static_cast<int32_t>((c % 2) * 16 +
                                        std::min<int64_t>(15, 4 * h + c / 4 + t * TW));
        out[t][h] = _mm512_load_si512(idx);
      }
    second = static_cast<__mmask16>(lanes(2 * TW) & ~lanes(TW));
  }
};

// u[h][i] = the 1-D transform f1d (NT plane rows -> 6) of tile row th, on
// column half h of its window (rows outside the plane read as zero).
template <int NT, typename F>
FASTNN_F4R_INLINE void vertical(const Window& wd, int64_t th, const float* plane, __m512 (*u)[6],
                                F f1d) {
  __m512 lo[NT], hi[NT];
#pragma GCC unroll 6
  for (int r = 0; r < NT; ++r) {
    const int64_t ih = 4 * th + r - wd.ph;
    if (ih < 0 || ih >= wd.H) {
      lo[r] = hi[r] = _mm512_setzero_ps();
      continue;
    }
    const float* src = plane + ih * wd.W - wd.pw;
    lo[r] = _mm512_maskz_loadu_ps(wd.lo, src);
    hi[r] = wd.hi ? _mm512_maskz_loadu_ps(wd.hi, src + 16) : _mm512_setzero_ps();
  }
  f1d(lo, u[0]);
  f1d(hi, u[1]);
}

// out[pos][0 .. n) (ldp apart) = X^T d X for the tiles of tile rows th and
// th + 1 (if < TH) of one plane, n = TW per row; d is a tile's NT x NT taps
// and f1d the 1-D X^T (NT -> 6): B^T for input tiles (NT = 6), A for
// grad_out tiles (NT = 4).
template <int NT, typename F>
__attribute__((noinline)) void pair_transform(const Window& wd, const Perms& pm, int64_t TW,
                                              int64_t th, const float* plane, float* out,
                                              int64_t ldp, F f1d) {
  const bool two = th + 1 < wd.TH;
  __m512 a[2][6], b[2][6];
  vertical<NT>(wd, th, plane, a, f1d);
  if (two) vertical<NT>(wd, th + 1, plane, b, f1d);
  const __mmask16 st = lanes((two ? 2 : 1) * TW);
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) {
    __m512 e[NT], v[6];
#pragma GCC unroll 6
    for (int j = 0; j < NT; ++j) {
      e[j] = _mm512_permutex2var_ps(a[0][i], pm.tap[j], a[1][i]);
      if (two)
        e[j] = _mm512_mask_blend_ps(pm.second, e[j],
                                    _mm512_permutex2var_ps(b[0][i], pm.tap[j], b[1][i]));
    }
    f1d(e, v);
#pragma GCC unroll 6
    for (int jj = 0; jj < 6; ++jj) _mm512_mask_storeu_ps(out + (i * 6 + jj) * ldp, st, v[jj]);
  }
}

// y rows 4*th .. 4*th + 7 (those < OH) = A^T M A (+ bias) for the tiles of
// tile rows th and th + 1 of one output channel; Mo points at its slot of tile
// (th, 0), positions ldp apart.
__attribute__((noinline)) inline void pair_output(const Shape& s, const Perms& pm, int64_t th,
                                                  const float* Mo, int64_t ldp, float bias,
                                                  float* y) {
  const bool two = th + 1 < s.TH;
  const __mmask16 ld = lanes((two ? 2 : 1) * s.TW);
  __m512 q[6][4];  // A^T along each row of the 6x6 transform domain
#pragma GCC unroll 6
  for (int r = 0; r < 6; ++r) {
    __m512 m[6];
#pragma GCC unroll 6
    for (int j = 0; j < 6; ++j) m[j] = _mm512_maskz_loadu_ps(ld, Mo + (r * 6 + j) * ldp);
    // Column 1 of A^T is all ones: bias at (1, 1) reaches every output once.
    if (r == 1) m[1] = _mm512_add_ps(m[1], _mm512_set1_ps(bias));
    f4::out1d(m, q[r]);
  }
  __m512 Y[4][4];  // Y[i][jj], lanes = tiles
#pragma GCC unroll 4
  for (int jj = 0; jj < 4; ++jj) {
    __m512 col[6], o4[4];
#pragma GCC unroll 6
    for (int r = 0; r < 6; ++r) col[r] = q[r][jj];
    f4::out1d(col, o4);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) Y[i][jj] = o4[i];
  }
  const __mmask16 cols[2] = {lanes(s.OW), lanes(s.OW - 16)};
  for (int t = 0; t < (two ? 2 : 1); ++t) {
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const int64_t oh = 4 * (th + t) + i;
      if (oh >= s.OH) break;
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m512 e = _mm512_permutex2var_ps(Y[i][0], pm.out[t][h], Y[i][1]);
        const __m512 o = _mm512_permutex2var_ps(Y[i][2], pm.out[t][h], Y[i][3]);
        _mm512_mask_storeu_ps(y + oh * s.OW + 16 * h, cols[h], _mm512_mask_blend_ps(0xCCCC, e, o));
      }
    }
  }
}

// --- narrow planes: 2 or 3 tile columns (output rows 5..12 wide) -----------
// A tile row's window (4 * TW + 2 <= 14 columns) fits one vector, and a vector
// of 16 slots spans up to 8 tile rows, across image boundaries. Slot vector k
// starts at tile column phase = 16k % TW of tile row 16k / TW; its lanes'
// rows and columns depend only on that phase.
constexpr int64_t kNarrowRows = 8;  // tile rows a slot vector touches: 8 (TW 2), 6 (TW 3)

inline bool narrow(int64_t TW) { return TW <= 3; }

struct NarrowPerms {
  // [phase][j]: lane l (row offset ro, column tw) reads column 4 * tw + j of
  // row ro's vector, which is the (ro % 2) source of the permute of rows ro & ~1.
  __m512i tap[3][6];
  __mmask16 pair[3][kNarrowRows / 2];  // [phase][p]: lanes of rows 2p and 2p + 1
  __m512i out;  // output column c: Y lane c / 4 (+ the row's first lane), from Y[c % 2] of a pair
  explicit NarrowPerms(int64_t TW) {
    alignas(64) int32_t idx[16];
    for (int64_t ph = 0; ph < std::min<int64_t>(TW, 3); ++ph) {
      for (int j = 0; j < 6; ++j) {
        for (int l = 0; l < 16; ++l) {
          const int64_t ro = (ph + l) / TW, tw = (ph + l) % TW;
          idx[l] = static_cast<int32_t>((ro % 2) * 16 + 4 * tw + j);
        }
        tap[ph][j] = _mm512_load_si512(idx);
      }
      for (int p = 0; p < kNarrowRows / 2; ++p) {
        unsigned m = 0;
        for (int l = 0; l < 16; ++l)
          if ((ph + l) / TW / 2 == p) m |= 1u << l;
        pair[ph][p] = static_cast<__mmask16>(m);
      }
    }
    for (int c = 0; c < 16; ++c) idx[c] = (c % 2) * 16 + c / 4;
    out = _mm512_load_si512(idx);
  }
};

// u[i] = the 1-D transform f1d over the NT plane rows of tile row th (one
// vector: the window's 16 columns).
template <int NT, typename F>
FASTNN_F4R_INLINE void vertical1(const Window& wd, int64_t th, const float* plane, __m512* u,
                                 F f1d) {
  __m512 d[NT];
#pragma GCC unroll 6
  for (int r = 0; r < NT; ++r) {
    const int64_t ih = 4 * th + r - wd.ph;
    d[r] = ih < 0 || ih >= wd.H ? _mm512_setzero_ps()
                                : _mm512_maskz_loadu_ps(wd.lo, plane + ih * wd.W - wd.pw);
  }
  f1d(d, u);
}

// V (or dM) for the planes [n0, n1) x C of `x` on narrow planes: every slot
// vector of the block, T slots per channel row, zero past the tiles.
template <int NT, typename F>
__attribute__((noinline)) void narrow_block(const Window& wd, const NarrowPerms& pm, int64_t TW,
                                            int64_t C, const float* x, int64_t x_img,
                                            int64_t plane, int64_t n0, int64_t n1, int64_t T,
                                            float* V, int64_t vpos, F f1d) {
  const int64_t rows_total = (n1 - n0) * wd.TH, tiles = rows_total * TW;
  alignas(64) float ub[kNarrowRows][6][L];
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = 0; k < T / L; ++k) {
      const int64_t g0 = L * k / TW, phase = L * k % TW;
      const int64_t nrows = std::min(rows_total, (L * k + L - 1) / TW + 1) - g0;
      for (int64_t r = 0; r < nrows + (nrows & 1); ++r) {  // whole pairs
        __m512 u[6];
        if (r < nrows) {
          const int64_t g = g0 + r;
          vertical1<NT>(wd, g % wd.TH, x + (n0 + g / wd.TH) * x_img + c * plane, u, f1d);
        } else {
          for (int i = 0; i < 6; ++i) u[i] = _mm512_setzero_ps();
        }
        for (int i = 0; i < 6; ++i) _mm512_store_ps(ub[r][i], u[i]);
      }
      const __mmask16 valid = lanes(tiles - L * k);
      float* out = V + c * T + L * k;
      for (int i = 0; i < 6; ++i) {
        __m512 e[NT], v[6];
        for (int j = 0; j < NT; ++j) {
          const __m512i idx = pm.tap[phase][j];
          e[j] = _mm512_permutex2var_ps(_mm512_load_ps(ub[0][i]), idx, _mm512_load_ps(ub[1][i]));
          for (int64_t p = 1; 2 * p < nrows; ++p)
            e[j] = _mm512_mask_blend_ps(
                pm.pair[phase][p], e[j],
                _mm512_permutex2var_ps(_mm512_load_ps(ub[2 * p][i]), idx,
                                       _mm512_load_ps(ub[2 * p + 1][i])));
        }
        f1d(e, v);
        for (int jj = 0; jj < 6; ++jj)
          _mm512_storeu_ps(out + (i * 6 + jj) * vpos, _mm512_maskz_mov_ps(valid, v[jj]));
      }
    }
  }
}

// y = A^T M A (+ bias) for slot vector k of a block (images from n0, TH * TW
// tiles each) of one output channel: Mo points at its row of Mb, y at its
// plane in image n0.
__attribute__((noinline)) inline void narrow_output(const Shape& s, const NarrowPerms& pm,
                                                    int64_t k, int64_t rows_total,
                                                    const float* Mo, int64_t ldp, float bias,
                                                    float* y, int64_t y_img) {
  __m512 q[6][4];
  for (int r = 0; r < 6; ++r) {
    __m512 m[6];
    for (int j = 0; j < 6; ++j) m[j] = _mm512_loadu_ps(Mo + L * k + (r * 6 + j) * ldp);
    if (r == 1) m[1] = _mm512_add_ps(m[1], _mm512_set1_ps(bias));
    f4::out1d(m, q[r]);
  }
  __m512 Y[4][4];
  for (int jj = 0; jj < 4; ++jj) {
    __m512 col[6], o4[4];
    for (int r = 0; r < 6; ++r) col[r] = q[r][jj];
    f4::out1d(col, o4);
    for (int i = 0; i < 4; ++i) Y[i][jj] = o4[i];
  }
  const int64_t g0 = L * k / s.TW, g1 = std::min(rows_total, (L * k + L - 1) / s.TW + 1);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t off = g * s.TW - L * k;  // lane of the row's tile 0 (may be < 0)
    unsigned m = 0;
    for (int64_t tw = 0; tw < s.TW; ++tw)
      if (off + tw >= 0 && off + tw < L) m |= 0xFu << (4 * tw);
    const __mmask16 cols = static_cast<__mmask16>(m & lanes(s.OW));
    const __m512i idx = _mm512_add_epi32(pm.out, _mm512_set1_epi32(static_cast<int32_t>(off)));
    const int64_t th = g % s.TH;
    float* yp = y + (g / s.TH) * y_img;
    for (int i = 0; i < 4; ++i) {
      const int64_t oh = 4 * th + i;
      if (oh >= s.OH) break;
      const __m512 e = _mm512_permutex2var_ps(Y[i][0], idx, Y[i][1]);
      const __m512 o = _mm512_permutex2var_ps(Y[i][2], idx, Y[i][3]);
      _mm512_mask_storeu_ps(yp + oh * s.OW, cols, _mm512_mask_blend_ps(0xCCCC, e, o));
    }
  }
}

// --- backward-input as the adjoint of the forward ---------------------------
// The usual backward-input runs a forward conv of grad_out padded by 2, so
// its tiles cover gx's plane; on a 10x10 plane that is 3x3 tiles (144
// outputs for 100). The forward's own output plane often needs fewer tiles
// (8x8: 2x2 tiles, no waste), and the gradient of the forward's three steps,
// run backwards on those tiles, is exact too:
//   dM[pos] = A gy A^T      per forward output tile (as backward-weight)
//   dV[pos] = U[pos]^T dM   U unrotated, rows = input channels
//   gx     += B dV B^T      per 6x6 input tile, stride 4: neighbours overlap
//                           by 2 rows and columns and add up.

// 1-D B v for 6 transform-domain values (the transpose of in1d, through the
// transpose of its factored form: ga and gb are the adjoints of its d4 - d2
// and d3 - d1).
FASTNN_F4R_INLINE void in1d_t(const __m512* v, __m512* d) {
  const __m512 h = _mm512_set1_ps(0.5f), one5 = _mm512_set1_ps(1.5f), two = _mm512_set1_ps(2.f);
  const __m512 ga = _mm512_add_ps(
      _mm512_add_ps(_mm512_add_ps(v[0], v[1]), _mm512_add_ps(v[2], v[3])),
      _mm512_fmadd_ps(one5, v[5], v[4]));
  const __m512 gb = _mm512_sub_ps(
      _mm512_fmadd_ps(one5, v[0], _mm512_fmadd_ps(two, v[3], _mm512_sub_ps(v[1], v[2]))),
      _mm512_fmadd_ps(h, v[4], v[5]));
  d[0] = v[0];
  d[1] = _mm512_sub_ps(_mm512_setzero_ps(), gb);
  d[2] = _mm512_sub_ps(_mm512_fmsub_ps(one5, _mm512_sub_ps(v[1], v[2]), v[0]), ga);
  d[3] = _mm512_add_ps(_mm512_fmsub_ps(one5, _mm512_add_ps(v[1], v[2]), v[5]), gb);
  d[4] = ga;
  d[5] = v[5];
}

// D[r][c] = tap (r, c) of B dV B^T for the tiles in the lanes ld of the
// products at Mo (positions ldp apart), staged in L1: its 36 vectors and the
// 36 of the first pass do not fit the 32 registers.
FASTNN_F4R_INLINE void adjoint_taps(const float* Mo, int64_t ldp, __mmask16 ld,
                                    float (*D)[6][L]) {
  __m512 q[6][6];  // B along each row of the 6x6 transform domain
  for (int i = 0; i < 6; ++i) {
    __m512 m[6];
    for (int j = 0; j < 6; ++j) m[j] = _mm512_maskz_loadu_ps(ld, Mo + (i * 6 + j) * ldp);
    in1d_t(m, q[i]);
  }
  for (int c = 0; c < 6; ++c) {
    __m512 col[6], d6[6];
    for (int i = 0; i < 6; ++i) col[i] = q[i][c];
    in1d_t(col, d6);
    for (int r = 0; r < 6; ++r) _mm512_store_ps(D[r][c], d6[r]);
  }
}

// gx += B dV B^T for slot vector k of a block (images from n0, TH * TW
// forward output tiles each) of one input channel: Mo points at its row of
// the products, gx at its plane in image n0; wd is gx's window.
__attribute__((noinline)) inline void narrow_adjoint(const Shape& s, const NarrowPerms& pm,
                                                     const Window& wd, int64_t k,
                                                     int64_t rows_total, const float* Mo,
                                                     int64_t ldp, float* gx, int64_t gx_img) {
  alignas(64) float D[6][6][L];
  adjoint_taps(Mo + L * k, ldp, 0xFFFF, D);
  const int64_t g0 = L * k / s.TW, g1 = std::min(rows_total, (L * k + L - 1) / s.TW + 1);
  int64_t th = g0 % s.TH;
  float* plane = gx + (g0 / s.TH) * gx_img - wd.pw;
  // Rows 4 and 5 of a tile row are rows 0 and 1 of the next one: they stay in
  // registers when that one is in this vector, so each plane row is written
  // once per vector. Rows that must be read are all loaded before any is
  // stored: a load overlapping a recent masked store (the next row, W < 16
  // floats on) cannot be forwarded and waits for it (measured: row by row,
  // most of this function's time).
  __m512 carry[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  // carry_old: the columns of the carried rows that the previous vector stored
  // (a first tile row that began there: its rows 4 and 5 hold that part).
  __mmask16 carry_st = 0, carry_old = 0;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t off = g * s.TW - L * k;  // lane of the row's tile 0 (may be < 0)
    unsigned m4 = 0, m2 = 0;  // window columns of taps 0..3 / 4..5 of this vector's tiles
    for (int64_t tw = 0; tw < s.TW; ++tw)
      if (off + tw >= 0 && off + tw < L) m4 |= 0xFu << (4 * tw), m2 |= 0x3u << (4 * tw + 4);
    // Window column c takes tap c % 4 of tile c / 4 (narrow_output's
    // gather), and taps 4 and 5 of tile c / 4 - 1 where c % 4 < 2.
    const __m512i idx = _mm512_add_epi32(pm.out, _mm512_set1_epi32(static_cast<int32_t>(off)));
    const __m512i idx2 = _mm512_sub_epi32(idx, _mm512_set1_epi32(1));
    const __mmask16 st = static_cast<__mmask16>(wd.lo & (m4 | m2));
    const bool next_here = g + 1 < g1 && th + 1 < s.TH;
    const int rend = next_here ? 4 : 6;  // rows stored from this tile row
    // gx is not cleared first: a row's first store writes it. Only the first
    // tile row of a vector adds to what earlier vectors stored: its rows 0
    // and 1 (the previous tile row's 4 and 5, whole), and, when the row
    // began in the previous vector (off < 0), the columns of its tiles there,
    // in all six rows; rows 4 and 5 of those columns are added where they are
    // stored, as rows 0 and 1 of the next tile row when that is here.
    const __mmask16 split = g == g0 && off < 0 ? lanes(4 * -off + 2) : __mmask16(0);
    __mmask16 mk[6];
    __m512 cur[6];
#pragma GCC unroll 6
    for (int r = 0; r < 6; ++r) {
      const int64_t ih = 4 * th + r - wd.ph;
      mk[r] = r < rend && ih >= 0 && ih < wd.H
                  ? static_cast<__mmask16>(st | (r < 2 ? carry_st : 0)) : __mmask16(0);
      const __mmask16 old = g == g0 && th > 0 && r < 2 ? mk[r]
                            : mk[r] & (split | (r < 2 ? carry_old : __mmask16(0)));
      cur[r] = old ? _mm512_maskz_loadu_ps(old, plane + ih * wd.W) : _mm512_setzero_ps();
    }
#pragma GCC unroll 6
    for (int r = 0; r < 6; ++r) {
      const __m512 e = _mm512_permutex2var_ps(_mm512_load_ps(D[r][0]), idx, _mm512_load_ps(D[r][1]));
      const __m512 o = _mm512_permutex2var_ps(_mm512_load_ps(D[r][2]), idx, _mm512_load_ps(D[r][3]));
      __m512 v = _mm512_maskz_mov_ps(static_cast<__mmask16>(m4), _mm512_mask_blend_ps(0xCCCC, e, o));
      v = _mm512_mask_add_ps(
          v, static_cast<__mmask16>(m2), v,
          _mm512_permutex2var_ps(_mm512_load_ps(D[r][4]), idx2, _mm512_load_ps(D[r][5])));
      if (r < 2) v = _mm512_add_ps(v, carry[r]);
      if (r >= rend) {
        carry[r - 4] = v;
        continue;
      }
      _mm512_mask_storeu_ps(plane + (4 * th + r - wd.ph) * wd.W, mk[r], _mm512_add_ps(cur[r], v));
    }
    if (next_here) {
      carry_st = st;
      carry_old = split;
    } else {
      carry[0] = carry[1] = _mm512_setzero_ps();
      carry_st = carry_old = 0;
    }
    if (++th == s.TH) th = 0, plane += gx_img;
  }
}

// gx += B dV B^T for the tiles of one image (wide planes: two tile rows per
// vector) of one input channel: Mo points at the image's first slot in the
// channel's row of the products, plane at gx's plane; wd is gx's window.
// Rows 4 and 5 are carried as in narrow_adjoint; with whole planes here,
// every row is stored once, and gx needs neither clearing nor reading.
__attribute__((noinline)) inline void wide_adjoint(const Shape& s, const Perms& pm,
                                                   const Window& wd, const float* Mo, int64_t ldp,
                                                   float* plane) {
  plane -= wd.pw;  // window column 0
  unsigned m4[2] = {0, 0}, m2[2] = {0, 0};  // per column half, as in narrow_adjoint
  for (int64_t tw = 0; tw < s.TW; ++tw) {
    const unsigned long long c4 = 0xFull << (4 * tw), c2 = 0x3ull << (4 * tw + 4);
    m4[0] |= static_cast<unsigned>(c4 & 0xFFFF), m4[1] |= static_cast<unsigned>(c4 >> 16);
    m2[0] |= static_cast<unsigned>(c2 & 0xFFFF), m2[1] |= static_cast<unsigned>(c2 >> 16);
  }
  const __mmask16 st[2] = {static_cast<__mmask16>(wd.lo & (m4[0] | m2[0])),
                           static_cast<__mmask16>(wd.hi & (m4[1] | m2[1]))};
  const __m512i one = _mm512_set1_epi32(1);
  __m512 carry[2][2] = {{_mm512_setzero_ps(), _mm512_setzero_ps()},
                        {_mm512_setzero_ps(), _mm512_setzero_ps()}};
  alignas(64) float D[6][6][L];
  for (int64_t th = 0; th < s.TH; th += 2) {
    const bool two = th + 1 < s.TH;
    adjoint_taps(Mo + th * s.TW, ldp, lanes((two ? 2 : 1) * s.TW), D);
    for (int t = 0; t < (two ? 2 : 1); ++t) {
      const int64_t row0 = 4 * (th + t) - wd.ph;
      const bool next_here = th + t + 1 < s.TH;
      const int rend = next_here ? 4 : 6;
#pragma GCC unroll 6
      for (int r = 0; r < 6; ++r) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const __m512i idx = pm.out[t][h], idx2 = _mm512_sub_epi32(idx, one);
          const __m512 e =
              _mm512_permutex2var_ps(_mm512_load_ps(D[r][0]), idx, _mm512_load_ps(D[r][1]));
          const __m512 o =
              _mm512_permutex2var_ps(_mm512_load_ps(D[r][2]), idx, _mm512_load_ps(D[r][3]));
          __m512 v = _mm512_maskz_mov_ps(static_cast<__mmask16>(m4[h]),
                                         _mm512_mask_blend_ps(0xCCCC, e, o));
          v = _mm512_mask_add_ps(
              v, static_cast<__mmask16>(m2[h]), v,
              _mm512_permutex2var_ps(_mm512_load_ps(D[r][4]), idx2, _mm512_load_ps(D[r][5])));
          if (r < 2) v = _mm512_add_ps(v, carry[r][h]);
          if (r >= rend) {
            carry[r - 4][h] = v;
            continue;
          }
          if (row0 + r >= 0 && row0 + r < wd.H)
            _mm512_mask_storeu_ps(plane + (row0 + r) * wd.W + 16 * h, st[h], v);
        }
      }
    }
  }
}

// Whether gx of a forward with output plane OH x OW (a width this file
// takes) is cheaper as the adjoint: fewer multiplies than F(4x4) by rows on
// gx's own H x W plane (the usual path) and no more than F(2x2)'s there. The
// strong preset: 26x26 gx 36 tiles per image against 49, 10x10 gx 4 against
// 9; its 12x12 gx (9 either way) stays on the usual path.
inline bool adjoint_preferred(int64_t H, int64_t W, int64_t OH, int64_t OW) {
  if (OW < 5 || (OW > 12 && OW < 17) || OW > 28 || OH < 1) return false;
  const int64_t f4 = 36 * ((OH + 3) / 4) * ((OW + 3) / 4);
  const int64_t f4_gx = 36 * ((H + 3) / 4) * ((W + 3) / 4);
  const int64_t f2_gx = 16 * ((H + 1) / 2) * ((W + 1) / 2);
  return f4 < f4_gx && f4 <= f2_gx;
}

// Images per block: the fewest padded slots per tile, with at most ~160 slots
// (36 x 32 channels x 160 floats = 740 KB of V) and ties going to more images.
inline int64_t images_per_block(int64_t per_image, int64_t N) {
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(N, 160 / per_image));
  int64_t best = 1, best_slots = (per_image + L - 1) / L * L;
  for (int64_t nb = 2; nb <= most; ++nb) {
    const int64_t slots = (nb * per_image + L - 1) / L * L;
    if (slots * best <= best_slots * nb) best = nb, best_slots = slots;  // slots/nb <= best's
  }
  return best;
}

// The permute tables of a tile-row width, wide or narrow (see above).
struct Tables {
  int64_t TW;
  bool narrow;
  Perms wide;
  NarrowPerms nar;
  explicit Tables(int64_t TW_) : TW(TW_), narrow(f4rows::narrow(TW_)), wide(TW_), nar(TW_) {}
};

// V (layout at the top, positions vpos apart) for planes [n0, n1) x C of `x`,
// T slots per channel row; the slots past the tiles are zeroed.
template <int NT, typename F>
void transform_block(const Window& wd, const Tables& tb, int64_t C, const float* x, int64_t x_img,
                     int64_t plane, int64_t n0, int64_t n1, int64_t T, float* V, int64_t vpos,
                     F f1d) {
  if (tb.narrow)
    return narrow_block<NT>(wd, tb.nar, tb.TW, C, x, x_img, plane, n0, n1, T, V, vpos, f1d);
  const int64_t TW = tb.TW, per_image = wd.TH * TW, tiles = (n1 - n0) * per_image;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t th = 0; th < wd.TH; th += 2)
        pair_transform<NT>(wd, tb.wide, TW, th, x + n * x_img + c * plane,
                           V + c * T + (n - n0) * per_image + th * TW, vpos, f1d);
  if (T > tiles)
    for (int p = 0; p < 36; ++p)
      for (int64_t c = 0; c < C; ++c) std::fill_n(V + p * vpos + c * T + tiles, T - tiles, 0.f);
}

// The block loop forward and backward_input share. Images are taken in
// blocks (in parallel where there are enough); per block, V = the NT-tap
// transform f1d of `in` (s.Cin planes of `plane` floats per image) on the
// s.TH x s.TW tiles, then per panel of RO product rows Mb = U panel @ V, and
// emit(row, Mb's row for it, mpos, n0, n1, T) turns each row back into planes.
template <int NT, typename F, typename Emit>
void run_blocks(const Shape& s, int64_t N, const Window& wd, const Tables& tb, const float* in,
                int64_t in_img, int64_t plane, const float* U, F f1d, Emit emit) {
  const int64_t per_image = s.TH * s.TW, nt = get_num_threads();
  const int64_t blocks = f4::balanced_blocks(N, images_per_block(per_image, N));
  const int64_t Tmax = ((N + blocks - 1) / blocks * per_image + L - 1) / L * L;
  auto body = [&](int64_t b0, int64_t b1) {
    Scratch<float> V(kSlotWinoIn, 36 * pos_stride<float>(s.Cin * Tmax)),
        M(kSlotWinoOut, 36 * pos_stride<float>(RO * Tmax));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = N * blk / blocks, n1 = N * (blk + 1) / blocks;
      const int64_t T = ((n1 - n0) * per_image + L - 1) / L * L;
      const int64_t vpos = pos_stride<float>(s.Cin * T), mpos = pos_stride<float>(RO * T);
      transform_block<NT>(wd, tb, s.Cin, in, in_img, plane, n0, n1, T, V.get(), vpos, f1d);
      for (int64_t ob = 0; ob < s.OB; ++ob) {
        f4::panel_products(U + ob * s.Cin * 36 * RO, s.Cin, V.get(), vpos, T, M.get(), mpos);
        for (int64_t r = 0; r < RO && ob * RO + r < s.Cout; ++r)
          emit(ob * RO + r, M.get() + r * T, mpos, n0, n1, T);
      }
    }
  };
  if (blocks >= nt && nt > 1) {
    parallel_for(blocks, 1, body);
  } else {
    body(0, blocks);
  }
}

// y[n] (Cout, OH, OW) = conv3x3(x[n] (Cin, H, W)) + bias for n in [0, N), U
// packed by f4::transform_weights; image strides as in winograd::forward.
inline void forward(const Shape& s, int64_t N, const float* x, int64_t x_img, const float* U,
                    const float* bias, float* y, int64_t y_img) {
  const int64_t per_image = s.TH * s.TW;
  const Tables tb(s.TW);
  run_blocks<6>(s, N, Window(s.H, s.W, s.ph, s.pw, s.TH), tb, x, x_img, s.H * s.W, U,
                f4::In1d{},
                [&](int64_t o, const float* Mo, int64_t mpos, int64_t n0, int64_t n1, int64_t T) {
                  const float b = bias ? bias[o] : 0.f;
                  float* yo = y + o * s.OH * s.OW;
                  if (tb.narrow) {
                    for (int64_t k = 0; k < T / L; ++k)
                      narrow_output(s, tb.nar, k, (n1 - n0) * s.TH, Mo, mpos, b, yo + n0 * y_img,
                                    y_img);
                    return;
                  }
                  for (int64_t n = n0; n < n1; ++n)
                    for (int64_t th = 0; th < s.TH; th += 2)
                      pair_output(s, tb.wide, th, Mo + (n - n0) * per_image + th * s.TW, mpos, b,
                                  yo + n * y_img);
                });
}

// gx[n] (Cin, H, W) = the gradient of the forward's x for gy[n] (Cout, OH,
// OW), n in [0, N), as the adjoint above; s = make_shape(Cout, Cin, H, W, OH,
// OW, ph, pw) (the products' rows are the input channels) with OW a width
// this file takes, U = f4::transform_weights of the unrotated filters with
// rows = input channels.
inline void backward_input(const Shape& s, int64_t N, const float* gy, int64_t gy_img,
                           const float* U, float* gx, int64_t gx_img) {
  const int64_t per_image = s.TH * s.TW, plane = s.H * s.W;
  const Window wgx(s.H, s.W, s.ph, s.pw, s.TH);
  const Tables tb(s.TW);
  run_blocks<4>(s, N, Window(s.OH, s.OW, 0, 0, s.TH), tb, gy, gy_img, s.OH * s.OW, U,
                f4::Grad1d{},
                [&](int64_t c, const float* Mo, int64_t mpos, int64_t n0, int64_t n1, int64_t T) {
                  float* gxc = gx + c * plane;
                  if (tb.narrow) {
                    for (int64_t k = 0; k < T / L; ++k)
                      narrow_adjoint(s, tb.nar, wgx, k, (n1 - n0) * s.TH, Mo, mpos,
                                     gxc + n0 * gx_img, gx_img);
                    return;
                  }
                  for (int64_t n = n0; n < n1; ++n)
                    wide_adjoint(s, tb.wide, wgx, Mo + (n - n0) * per_image, mpos,
                                 gxc + n * gx_img);
                });
}

// dU[o][pos][c] (rows 36 * Cp apart, Cp = f4::padded_channels(Cin), the
// layout f4::untransform_weight_grad reads) += sum over tiles of
// dM[pos][o][t] * V[pos][c][t] for images [n0, n1).
inline void weight_grad_range(const Shape& s, int64_t n0, int64_t n1, const float* gy,
                              int64_t gy_img, const float* x, int64_t x_img, float* dU) {
  const int64_t per_image = s.TH * s.TW, nb = images_per_block(per_image, n1 - n0);
  const int64_t Tmax = (nb * per_image + L - 1) / L * L, Cp = f4::padded_channels(s.Cin);
  const Window win(s.H, s.W, s.ph, s.pw, s.TH), wgy(s.OH, s.OW, 0, 0, s.TH);
  const Tables tb(s.TW);
  Scratch<float> V(kSlotWinoIn, 36 * pos_stride<float>(s.Cin * Tmax));
  Scratch<float> dM(kSlotWinoOut, 36 * pos_stride<float>(s.Cout * Tmax));
  Scratch<float> VT(kSlotWinoGrid, Tmax * Cp);  // one position's V^T: T x Cp
  for (int64_t b = n0; b < n1; b += nb) {
    const int64_t e = std::min(n1, b + nb), T = ((e - b) * per_image + L - 1) / L * L;
    const int64_t vpos = pos_stride<float>(s.Cin * T), mpos = pos_stride<float>(s.Cout * T);
    transform_block<6>(win, tb, s.Cin, x, x_img, s.H * s.W, b, e, T, V.get(), vpos, f4::In1d{});
    transform_block<4>(wgy, tb, s.Cout, gy, gy_img, s.OH * s.OW, b, e, T, dM.get(), mpos,
                       f4::Grad1d{});
    for (int pos = 0; pos < 36; ++pos) {
      // The products reduce over tiles, which both V and dM hold contiguously:
      // V[pos] is transposed (16 x 16 in registers) so that channels are the
      // vector lanes of winograd_f4.h's register tile, which then sums each
      // accumulator over t in order, as gemm did (bit-identical), without
      // gemm's per-call copy of V^T into 8 x 8-transposed panels.
      const float* Vp = V.get() + pos * vpos;
      for (int64_t t0 = 0; t0 < T; t0 += L) {
        for (int64_t c0 = 0; c0 < Cp; c0 += L) {
          __m512 r[L];
          for (int64_t ci = 0; ci < L; ++ci)
            r[ci] = c0 + ci < s.Cin ? _mm512_loadu_ps(Vp + (c0 + ci) * T + t0)
                                    : _mm512_setzero_ps();
          f4::transpose16(r);
          for (int64_t l = 0; l < L; ++l) _mm512_storeu_ps(VT.get() + (t0 + l) * Cp + c0, r[l]);
        }
      }
      // Panels of about equal height, as in winograd_f4.h.
      const int64_t panels = (s.Cout + f4::kWRows - 1) / f4::kWRows;
      for (int64_t pi = 0, o0 = 0; pi < panels; ++pi) {
        const int nr = static_cast<int>((s.Cout - o0 + (panels - pi) - 1) / (panels - pi));
        f4::wgrad_tile(nr, dM.get() + pos * mpos + o0 * T, T, VT.get(), Cp, T, Cp / L,
                       dU + (o0 * 36 + pos) * Cp, 36 * Cp);
        o0 += nr;
      }
    }
  }
}

#undef FASTNN_F4R_INLINE

}  // namespace f4rows
}  // namespace winograd
}  // namespace FASTNN_ISA_NS
}  // namespace fastnn

#endif  // __AVX512F__
