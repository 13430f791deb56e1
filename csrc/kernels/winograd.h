// Winograd F(2x2, 3x3) for stride-1, undilated 3x3 convolutions (included by
// conv2d.cpp; one copy per ISA namespace).
//
// Each 2x2 output tile is computed from a 4x4 input tile as
//     Y = A^T [ (G g G^T) .* (B^T d B) ] A
// so the 36 multiply-adds per tile and channel pair of direct convolution
// become 16, done as 16 gemms (one per position of the 4x4 transform domain):
//     M[pos] (O x tiles) = U[pos] (O x C) @ V[pos] (C x tiles).
// The transforms only add, subtract and halve, so the result stays within
// rounding of direct convolution (in contrast to larger tiles: F(4x4) in
// winograd_f4.h rounds ~20x more and is used only where it pays).
//
// Backward-input is the same kernel on grad_out with 180-degree rotated,
// channel-swapped weights and padding 2 - p. Backward-weight uses the
// transposed map: dU[pos] = sum over tiles of (A dY A^T)[pos] (x) V[pos], then
// dw = G^T dU G.
//
// Tiles of a block of images are transformed together, with vectors running
// along a tile row (stride-2 input columns split with even/odd permutes).
//
// The forward products run on their own register-blocked kernel (products()),
// not the generic gemm: at these sizes (8..64 channels each way, ~128 tiles)
// the gemm's per-call packing and edge handling held it to ~75-90 GFLOP/s on
// one Emerald Rapids core. The transformed weights are packed once per call
// into panels of kProdRows output channels, Up[pos][ob][c][kProdRows] (rows
// past O zero), which the kernel broadcasts while it streams V.
#pragma once

#include <algorithm>
#include <utility>

#include "fastnn/parallel.h"
#include "kernels/ops.h"
#include "kernels/simd.h"

namespace fastnn {
namespace FASTNN_ISA_NS {
namespace winograd {

using simd::Vec;

// Tiles per gemm: enough columns for an efficient gemm, while the transformed
// input and product (16 x (C + O) x tiles) stay near L2.
constexpr int64_t kTargetTiles = 128;

struct Shape {
  int64_t Cin, Cout;   // channels in / out (per group)
  int64_t H, W;        // input plane
  int64_t OH, OW;      // output plane
  int64_t ph, pw;      // zero padding (top/left; bottom/right as needed)
  int64_t TH, TW;      // tile rows / columns: ceil(OH / 2), ceil(OW / 2)
  int64_t GH, GW;      // padded grid holding all tiles' inputs: 2*TH + 2, 2*TW + 2
};

inline Shape make_shape(int64_t Cin, int64_t Cout, int64_t H, int64_t W, int64_t OH, int64_t OW,
                        int64_t ph, int64_t pw) {
  Shape s{Cin, Cout, H, W, OH, OW, ph, pw, (OH + 1) / 2, (OW + 1) / 2, 0, 0};
  s.GH = 2 * s.TH + 2;
  s.GW = 2 * s.TW + 2;
  return s;
}

// Images per block so a block has about kTargetTiles tiles.
inline int64_t images_per_block(const Shape& s, int64_t N) {
  const int64_t per_image = s.TH * s.TW;
  return std::max<int64_t>(1, std::min<int64_t>(N, kTargetTiles / std::max<int64_t>(1, per_image)));
}

// Output channels per register tile of products() (x kProdVecs vectors of
// tiles: 24 accumulators of 32 registers, 12 of 16).
constexpr int kProdRows = simd::kVecRegs == 32 ? 8 : 4;
constexpr int kProdVecs = 3;

// Panels of kProdRows rows covering R output channels.
inline int64_t row_panels(int64_t R) { return (R + kProdRows - 1) / kProdRows; }

// Elements of the packed transformed weights of an R x C filter bank.
inline int64_t packed_weights_size(int64_t R, int64_t C) { return 16 * row_panels(R) * kProdRows * C; }

// U (packed, see the top) = (G g G^T)[pos] for the 3x3 filter g = w[r*rs + c*cs]
// (9 contiguous values, optionally rotated 180 degrees) of row r, column c.
template <typename T>
void transform_weights(const T* w, int64_t R, int64_t C, int64_t rs, int64_t cs, bool rotate,
                       T* U) {
  const int64_t OB = row_panels(R), RC = OB * kProdRows * C;  // elements per position
  std::fill(U, U + 16 * RC, T(0));
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      const T* g0 = w + r * rs + c * cs;
      T g[3][3];
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) g[i][j] = rotate ? g0[(2 - i) * 3 + (2 - j)] : g0[i * 3 + j];
      T t[4][3];  // G g
      for (int j = 0; j < 3; ++j) {
        t[0][j] = g[0][j];
        t[1][j] = T(0.5) * (g[0][j] + g[1][j] + g[2][j]);
        t[2][j] = T(0.5) * (g[0][j] - g[1][j] + g[2][j]);
        t[3][j] = g[2][j];
      }
      for (int i = 0; i < 4; ++i) {  // (G g) G^T
        T* u = U + i * 4 * RC + ((r / kProdRows) * C + c) * kProdRows + r % kProdRows;
        u[0 * RC] = t[i][0];
        u[1 * RC] = T(0.5) * (t[i][0] + t[i][1] + t[i][2]);
        u[2 * RC] = T(0.5) * (t[i][0] - t[i][1] + t[i][2]);
        u[3 * RC] = t[i][2];
      }
    }
  }
}

// dw (3x3, at w + r*rs + c*cs) = G^T dU G for every (r, c) of dU[pos][r][c].
template <typename T>
void untransform_weight_grad(const T* dU, int64_t R, int64_t C, int64_t rs, int64_t cs, T* w) {
  const int64_t RC = R * C;
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      T u[4][4];
      for (int p = 0; p < 16; ++p) u[p / 4][p % 4] = dU[p * RC + r * C + c];
      T s[3][4];  // G^T dU
      for (int j = 0; j < 4; ++j) {
        s[0][j] = u[0][j] + T(0.5) * (u[1][j] + u[2][j]);
        s[1][j] = T(0.5) * (u[1][j] - u[2][j]);
        s[2][j] = T(0.5) * (u[1][j] + u[2][j]) + u[3][j];
      }
      T* g = w + r * rs + c * cs;
      for (int a = 0; a < 3; ++a) {  // (G^T dU) G
        g[a * 3 + 0] = s[a][0] + T(0.5) * (s[a][1] + s[a][2]);
        g[a * 3 + 1] = T(0.5) * (s[a][1] - s[a][2]);
        g[a * 3 + 2] = T(0.5) * (s[a][1] + s[a][2]) + s[a][3];
      }
    }
  }
}

// Whether the planes of `s` are their own grids: unpadded, covered exactly by
// the tiles (even OH, OW). Reading them in place saves a copy of every plane
// (~8% of the 32 -> 32 26x26 layer). input_transform's loads past a plane's
// end then read the next plane, so the last plane of a batch (and planes too
// small for that) still go through the grid.
template <typename T>
inline bool reads_in_place(const Shape& s) {
  return s.ph == 0 && s.pw == 0 && s.GH == s.H && s.GW == s.W &&
         s.H * s.W >= 2 * Vec<T>::L + 2;
}

// Scratch for one block: the zero-padded input grid of one plane.
template <typename T>
struct Grid {
  int64_t ld;  // row stride, with slack for full-vector loads past the last tile
  Scratch<T> buf;
  explicit Grid(const Shape& s)
      : ld(s.GW + 4 * Vec<T>::L), buf(kSlotWinoGrid, s.GH * (s.GW + 4 * Vec<T>::L)) {
    buf.zero(s.GH * ld);
  }
  // The grid of `plane` for input_transform as (pointer, row stride): the plane
  // itself when `in_place` (see reads_in_place), else this zero-padded copy.
  std::pair<const T*, int64_t> of(const Shape& s, const T* plane, bool in_place) {
    if (in_place) return {plane, s.W};
    load(s, plane);
    return {buf.get(), ld};
  }
  // Copies plane (H x W) into the grid at offset (ph, pw); cells outside stay 0.
  void load(const Shape& s, const T* plane) {
    const int64_t rows = std::min(s.H, s.GH - s.ph), cols = std::min(s.W, s.GW - s.pw);
    for (int64_t ih = 0; ih < rows; ++ih) {
      T* dst = buf.get() + (ih + s.ph) * ld + s.pw;
      const T* src = plane + ih * s.W;
      for (int64_t iw = 0; iw < cols; ++iw) dst[iw] = src[iw];
    }
  }
};

// --- transform arithmetic on vectors of tiles --------------------------------

// One input row of a tile, d0..d3 = columns 0..3 -> t = d B.
template <typename R, typename Vt>
inline void in_row(R d0, R d1, R d2, R d3, R* t) {
  t[0] = Vt::sub(d0, d2);
  t[1] = Vt::add(d1, d2);
  t[2] = Vt::sub(d2, d1);
  t[3] = Vt::sub(d1, d3);
}

// v[pos] = B^T (d B) from the four transformed rows t[r][j].
template <typename R, typename Vt>
inline void in_cols(const R (*t)[4], R* v) {
  for (int j = 0; j < 4; ++j) {
    v[0 * 4 + j] = Vt::sub(t[0][j], t[2][j]);
    v[1 * 4 + j] = Vt::add(t[1][j], t[2][j]);
    v[2 * 4 + j] = Vt::sub(t[2][j], t[1][j]);
    v[3 * 4 + j] = Vt::sub(t[1][j], t[3][j]);
  }
}

// The 2x2 outputs y[i][j] = (A^T M A)[i][j] + bias from q[pos].
template <typename R, typename Vt>
inline void out_math(const R* q, R bias, R* y) {
  R r0[4], r1[4];  // A^T M
  for (int j = 0; j < 4; ++j) {
    r0[j] = Vt::add(Vt::add(q[0 * 4 + j], q[1 * 4 + j]), q[2 * 4 + j]);
    r1[j] = Vt::sub(Vt::sub(q[1 * 4 + j], q[2 * 4 + j]), q[3 * 4 + j]);
  }
  y[0] = Vt::add(Vt::add(Vt::add(r0[0], r0[1]), r0[2]), bias);
  y[1] = Vt::add(Vt::sub(Vt::sub(r0[1], r0[2]), r0[3]), bias);
  y[2] = Vt::add(Vt::add(Vt::add(r1[0], r1[1]), r1[2]), bias);
  y[3] = Vt::add(Vt::sub(Vt::sub(r1[1], r1[2]), r1[3]), bias);
}

// v[pos] = (A dY A^T)[pos] from the 2x2 grad_out cells a0 a1 / b0 b1.
template <typename R, typename Vt>
inline void grad_math(R a0, R a1, R b0, R b1, R* v) {
  const R z = Vt::zero();
  // r = A dY (4 x 2); rows of A: (1,0), (1,1), (1,-1), (0,-1).
  const R r[4][2] = {{a0, a1},
                     {Vt::add(a0, b0), Vt::add(a1, b1)},
                     {Vt::sub(a0, b0), Vt::sub(a1, b1)},
                     {Vt::sub(z, b0), Vt::sub(z, b1)}};
  for (int i = 0; i < 4; ++i) {
    v[i * 4 + 0] = r[i][0];
    v[i * 4 + 1] = Vt::add(r[i][0], r[i][1]);
    v[i * 4 + 2] = Vt::sub(r[i][0], r[i][1]);
    v[i * 4 + 3] = Vt::sub(z, r[i][1]);
  }
}

#if defined(__AVX512F__)
// With AVX-512 a tile row of an MNIST-sized plane (TW <= L/2 tiles) fills
// less than half a vector. Two tile rows then share one vector: rows th and
// th+1 of the input grid are loaded as the (lo, hi) halves of one even/odd
// split, which puts row th's tiles in lanes [0, L/2) and row th+1's in
// [L/2, L). One permute moves them to/from the 2*TW consecutive tiles of the
// transformed layout.
template <typename T>
struct Pack;
template <>
struct Pack<float> {
  static constexpr int H = 8;
  __m512i flat, rows;
  explicit Pack(int64_t TW) {
    alignas(64) int32_t f[16], r[16];
    for (int l = 0; l < 16; ++l) {
      f[l] = l < TW ? l : (l < 2 * TW ? static_cast<int32_t>(H + l - TW) : 0);
      r[l] = l < H ? (l < TW ? l : 0) : (l - H < TW ? static_cast<int32_t>(TW + l - H) : 0);
    }
    flat = _mm512_load_si512(f);
    rows = _mm512_load_si512(r);
  }
  __m512 to_flat(__m512 v) const { return _mm512_permutexvar_ps(flat, v); }
  __m512 to_rows(__m512 v) const { return _mm512_permutexvar_ps(rows, v); }
};
template <>
struct Pack<double> {
  static constexpr int H = 4;
  __m512i flat, rows;
  explicit Pack(int64_t TW) {
    alignas(64) int64_t f[8], r[8];
    for (int l = 0; l < 8; ++l) {
      f[l] = l < TW ? l : (l < 2 * TW ? H + l - TW : 0);
      r[l] = l < H ? (l < TW ? l : 0) : (l - H < TW ? TW + l - H : 0);
    }
    flat = _mm512_load_si512(f);
    rows = _mm512_load_si512(r);
  }
  __m512d to_flat(__m512d v) const { return _mm512_permutexvar_pd(flat, v); }
  __m512d to_rows(__m512d v) const { return _mm512_permutexvar_pd(rows, v); }
};
template <typename T>
inline bool packable(const Shape& s) {
  return 2 * s.TW <= Vec<T>::L;
}
#else
template <typename T>
inline bool packable(const Shape&) {
  return false;
}
#endif

// V[pos][c][t0 + tile] = (B^T d B)[pos] for every tile of one plane (channel c),
// read from its zero-padded grid (GH x GW at `grid`, rows ld apart). Loads run
// up to 2 * Vec<T>::L + 2 elements past a grid row (and the grid's end).
template <typename T>
void input_transform(const Shape& s, const T* grid, int64_t ld, T* V, int64_t plane_stride) {
  using Vt = Vec<T>;
  using R = typename Vt::reg;
  int64_t th = 0;
#if defined(__AVX512F__)
  if (packable<T>(s)) {
    const Pack<T> pk(s.TW);
    const int64_t n = 2 * s.TW;
    for (; th + 1 < s.TH; th += 2) {
      R t[4][4];
      for (int r = 0; r < 4; ++r) {
        const T* a = grid + (2 * th + r) * ld;  // grid row of tile row th
        const T* b = a + 2 * ld;                // ... of tile row th + 1
        R d0, d1, d2, d3;
        Vt::deinterleave(Vt::loadu(a), Vt::loadu(b), d0, d1);
        Vt::deinterleave(Vt::loadu(a + 2), Vt::loadu(b + 2), d2, d3);
        in_row<R, Vt>(d0, d1, d2, d3, t[r]);
      }
      R v[16];
      in_cols<R, Vt>(t, v);
      T* out = V + th * s.TW;
      for (int p = 0; p < 16; ++p) Vt::storep(out + p * plane_stride, pk.to_flat(v[p]), n);
    }
  }
#endif
  for (; th < s.TH; ++th) {
    const T* rows[4];
    for (int r = 0; r < 4; ++r) rows[r] = grid + (2 * th + r) * ld;
    T* out = V + th * s.TW;
    for (int64_t tw = 0; tw < s.TW; tw += Vt::L) {
      const int64_t m = std::min<int64_t>(Vt::L, s.TW - tw);
      R t[4][4];  // d B, per input row
      for (int r = 0; r < 4; ++r) {
        R d0, d1, d2, d3;
        Vt::deinterleave(Vt::loadu(rows[r] + 2 * tw), Vt::loadu(rows[r] + 2 * tw + Vt::L), d0, d1);
        Vt::deinterleave(Vt::loadu(rows[r] + 2 * tw + 2), Vt::loadu(rows[r] + 2 * tw + 2 + Vt::L),
                         d2, d3);
        in_row<R, Vt>(d0, d1, d2, d3, t[r]);
      }
      R v[16];
      in_cols<R, Vt>(t, v);
      for (int p = 0; p < 16; ++p) {
        T* dst = out + p * plane_stride + tw;
        if (m == Vt::L) {
          Vt::storeu(dst, v[p]);
        } else {
          Vt::storep(dst, v[p], m);
        }
      }
    }
  }
}

// Writes y (OH x OW plane) = A^T M A (+ bias) for every tile of output channel o.
template <typename T>
void output_transform(const Shape& s, const T* Mo, int64_t pos_stride, T bias, T* y) {
  using Vt = Vec<T>;
  using R = typename Vt::reg;
  const R b = Vt::set1(bias);
  int64_t th = 0;
#if defined(__AVX512F__)
  if (packable<T>(s)) {
    const Pack<T> pk(s.TW);
    const int64_t n = 2 * s.TW;
    for (; th + 1 < s.TH; th += 2) {
      const T* in = Mo + th * s.TW;
      R q[16], yv[4], lo, hi;
      for (int p = 0; p < 16; ++p) q[p] = pk.to_rows(Vt::loadp(in + p * pos_stride, n));
      out_math<R, Vt>(q, b, yv);
      // lo: output row 2*th (tile row th), hi: row 2*th + 2 (tile row th + 1).
      T* y0 = y + 2 * th * s.OW;
      Vt::interleave(yv[0], yv[1], lo, hi);
      Vt::storep(y0, lo, s.OW);
      Vt::storep(y0 + 2 * s.OW, hi, s.OW);
      Vt::interleave(yv[2], yv[3], lo, hi);
      Vt::storep(y0 + s.OW, lo, s.OW);
      if (2 * th + 3 < s.OH) Vt::storep(y0 + 3 * s.OW, hi, s.OW);
    }
  }
#endif
  for (; th < s.TH; ++th) {
    const T* in = Mo + th * s.TW;
    T* y0 = y + 2 * th * s.OW;
    const bool second_row = 2 * th + 1 < s.OH;
    for (int64_t tw = 0; tw < s.TW; tw += Vt::L) {
      const int64_t m = std::min<int64_t>(Vt::L, s.TW - tw);
      R q[16], yv[4];
      for (int p = 0; p < 16; ++p)
        q[p] = m == Vt::L ? Vt::loadu(in + p * pos_stride + tw)
                          : Vt::loadp(in + p * pos_stride + tw, m);
      out_math<R, Vt>(q, b, yv);
      // Even/odd output columns interleaved back.
      const int64_t n = std::min<int64_t>(2 * m, s.OW - 2 * tw);  // valid columns
      const int64_t nlo = std::min<int64_t>(n, Vt::L), nhi = std::max<int64_t>(0, n - Vt::L);
      R lo, hi;
      Vt::interleave(yv[0], yv[1], lo, hi);
      Vt::storep(y0 + 2 * tw, lo, nlo);
      Vt::storep(y0 + 2 * tw + Vt::L, hi, nhi);
      if (second_row) {
        Vt::interleave(yv[2], yv[3], lo, hi);
        Vt::storep(y0 + s.OW + 2 * tw, lo, nlo);
        Vt::storep(y0 + s.OW + 2 * tw + Vt::L, hi, nhi);
      }
    }
  }
}

// dM[pos][o][tile] = (A dY A^T)[pos] for every tile of one grad_out plane
// (cells past OH/OW count as zero).
template <typename T>
void grad_transform(const Shape& s, const T* gy, T* dMo, int64_t pos_stride) {
  using Vt = Vec<T>;
  using R = typename Vt::reg;
  int64_t th = 0;
#if defined(__AVX512F__)
  if (packable<T>(s)) {
    const Pack<T> pk(s.TW);
    const int64_t n = 2 * s.TW;
    for (; th + 1 < s.TH; th += 2) {
      const T* g0 = gy + 2 * th * s.OW;  // rows 2th, 2th+1 | 2th+2, 2th+3
      const int64_t last = 2 * th + 3 < s.OH ? s.OW : 0;
      R a0, a1, b0, b1, v[16];
      Vt::deinterleave(Vt::loadp(g0, s.OW), Vt::loadp(g0 + 2 * s.OW, s.OW), a0, a1);
      Vt::deinterleave(Vt::loadp(g0 + s.OW, s.OW), Vt::loadp(g0 + 3 * s.OW, last), b0, b1);
      grad_math<R, Vt>(a0, a1, b0, b1, v);
      T* out = dMo + th * s.TW;
      for (int p = 0; p < 16; ++p) Vt::storep(out + p * pos_stride, pk.to_flat(v[p]), n);
    }
  }
#endif
  for (; th < s.TH; ++th) {
    const T* g0 = gy + 2 * th * s.OW;
    const bool second_row = 2 * th + 1 < s.OH;
    T* out = dMo + th * s.TW;
    for (int64_t tw = 0; tw < s.TW; tw += Vt::L) {
      const int64_t m = std::min<int64_t>(Vt::L, s.TW - tw);
      const int64_t n = std::min<int64_t>(2 * m, s.OW - 2 * tw);
      const int64_t nlo = std::min<int64_t>(n, Vt::L), nhi = std::max<int64_t>(0, n - Vt::L);
      R a0, a1, b0 = Vt::zero(), b1 = Vt::zero(), v[16];
      Vt::deinterleave(Vt::loadp(g0 + 2 * tw, nlo), Vt::loadp(g0 + 2 * tw + Vt::L, nhi), a0, a1);
      if (second_row) {
        Vt::deinterleave(Vt::loadp(g0 + s.OW + 2 * tw, nlo),
                         Vt::loadp(g0 + s.OW + 2 * tw + Vt::L, nhi), b0, b1);
      }
      grad_math<R, Vt>(a0, a1, b0, b1, v);
      for (int p = 0; p < 16; ++p) Vt::storep(out + p * pos_stride + tw, v[p], m);
    }
  }
}

// acc (kProdRows x NV vectors) = (First ? 0 : acc) + u (kProdRows values,
// broadcast) (x) v (NV vectors): one input channel of prod_micro.
template <typename T, int NV, bool First>
__attribute__((always_inline)) inline void prod_step(typename Vec<T>::reg (*acc)[NV],
                                                      const T* __restrict u,
                                                      const T* __restrict v) {
  using Vt = Vec<T>;
  typename Vt::reg b[NV];
#pragma GCC unroll 16
  for (int j = 0; j < NV; ++j) b[j] = Vt::loadu(v + j * Vt::L);
#pragma GCC unroll 16
  for (int r = 0; r < kProdRows; ++r) {
    const typename Vt::reg a = Vt::set1(u[r]);
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) acc[r][j] = First ? Vt::mul(a, b[j]) : Vt::fma(a, b[j], acc[r][j]);
  }
}

// m (kProdRows x NV vectors) [ld ldm] = u^T @ v over c < C, for u a packed
// panel (kProdRows values per c, us apart) and v (C x NV vectors of tiles) [ld
// ldv]: the register tile of the Winograd products, here and in
// winograd_f4.h. Accumulates over c in order, one FMA per product.
template <typename T, int NV>
inline void prod_micro(const T* __restrict u, int64_t us, const T* __restrict v, int64_t C,
                       int64_t ldv, T* __restrict m, int64_t ldm) {
  // Starting from the first product (C >= 1 always) instead of zero keeps GCC
  // from staging the accumulators on the stack (~100 extra moves per call).
  typename Vec<T>::reg acc[kProdRows][NV];
  prod_step<T, NV, true>(acc, u, v);
  // v's rows are ldv apart (one per channel): a stride the L2 streamer
  // follows late on short blocks; prefetching 6 channels ahead measured 0-5%
  // faster on the 10x10 and 12x12 layers (Xeon 6/207, paired runs).
  for (int64_t c = 1; c < C; ++c) {
    if (c + 6 < C) {
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) __builtin_prefetch(v + (c + 6) * ldv + j * Vec<T>::L, 0, 3);
    }
    prod_step<T, NV, false>(acc, u + c * us, v + c * ldv);
  }
#pragma GCC unroll 16
  for (int r = 0; r < kProdRows; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) Vec<T>::storeu(m + r * ldm + j * Vec<T>::L, acc[r][j]);
}

// M[pos] (row_panels(O) * kProdRows x ldt) = U[pos] (O x C) @ V[pos] (C x ldt)
// for the 16 positions, V and M positions vpos and mpos elements apart; ldt is
// a whole number of vectors (the columns past the block's tiles are zero in V).
template <typename T>
void products(const T* U, int64_t O, int64_t C, const T* V, int64_t vpos, int64_t ldt, T* M,
              int64_t mpos) {
  constexpr int RO = kProdRows, L = Vec<T>::L, NV = kProdVecs;
  const int64_t OB = row_panels(O), nvec = ldt / L;
  for (int p = 0; p < 16; ++p) {
    const T* v = V + p * vpos;
    for (int64_t ob = 0; ob < OB; ++ob) {
      const T* u = U + (p * OB + ob) * C * RO;
      T* m = M + p * mpos + ob * RO * ldt;
      int64_t t = 0;
      for (; t + NV <= nvec; t += NV) prod_micro<T, NV>(u, RO, v + t * L, C, ldt, m + t * L, ldt);
      if (nvec - t == 2) prod_micro<T, 2>(u, RO, v + t * L, C, ldt, m + t * L, ldt);
      if (nvec - t == 1) prod_micro<T, 1>(u, RO, v + t * L, C, ldt, m + t * L, ldt);
    }
  }
}

// Distance between transform positions holding n elements each (F(2x2) and
// F(4x4)): one vector more. n is often a multiple of 1 KB, so the 16 (or 36)
// rows a tile transform writes, or the output transform reads, would fall into
// a few L1 sets and evict each other (measured: 2x slower F(4x4) input
// transform for the 32-channel, 48-tile forward block).
template <typename T>
inline int64_t pos_stride(int64_t n) {
  return n + Vec<T>::L;
}

// y[n] (Cout, OH, OW) = conv3x3(x[n] (Cin, H, W), U) + bias for n in [0, N),
// U packed by transform_weights. x/y image strides are given so groups can be
// addressed in place.
template <typename T>
void forward(const Shape& s, int64_t N, const T* x, int64_t x_img, const T* U, const T* bias,
             T* y, int64_t y_img) {
  constexpr int64_t L = Vec<T>::L;
  const int64_t nb = images_per_block(s, N);
  const int64_t blocks = (N + nb - 1) / nb;
  const int64_t per_image = s.TH * s.TW;
  const int64_t rows = row_panels(s.Cout) * kProdRows;  // M rows, padded to whole panels
  const bool in_place = reads_in_place<T>(s);
  auto body = [&](int64_t b0, int64_t b1) {
    Grid<T> grid(s);
    const int64_t ld_max = (nb * per_image + L - 1) / L * L;
    Scratch<T> V(kSlotWinoIn, 16 * pos_stride<T>(s.Cin * ld_max)),
        M(kSlotWinoOut, 16 * pos_stride<T>(rows * ld_max));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * nb, n1 = std::min(N, n0 + nb), tiles = (n1 - n0) * per_image;
      const int64_t ldt = (tiles + L - 1) / L * L;
      const int64_t vpos = pos_stride<T>(s.Cin * ldt), mpos = pos_stride<T>(rows * ldt);
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t c = 0; c < s.Cin; ++c) {
          const auto g = grid.of(s, x + n * x_img + c * s.H * s.W,
                                 in_place && (n < N - 1 || c < s.Cin - 1));
          input_transform(s, g.first, g.second, V.get() + c * ldt + (n - n0) * per_image, vpos);
        }
      }
      if (ldt > tiles) {  // the last vector's lanes past the tiles
        for (int p = 0; p < 16; ++p)
          for (int64_t c = 0; c < s.Cin; ++c)
            std::fill_n(V.get() + p * vpos + c * ldt + tiles, ldt - tiles, T(0));
      }
      products(U, s.Cout, s.Cin, V.get(), vpos, ldt, M.get(), mpos);
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t o = 0; o < s.Cout; ++o) {
          output_transform(s, M.get() + o * ldt + (n - n0) * per_image, mpos,
                           bias ? bias[o] : T(0), y + n * y_img + o * s.OH * s.OW);
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

// dU[pos][o][c] += sum over tiles of dM[pos][o][t] * V[pos][c][t] for images
// [n0, n1); gy/x image strides as in forward().
template <typename T>
void weight_grad_range(const Shape& s, int64_t n0, int64_t n1, const T* gy, int64_t gy_img,
                       const T* x, int64_t x_img, T* dU) {
  const int64_t per_image = s.TH * s.TW;
  const int64_t nb = images_per_block(s, n1 - n0);
  const bool in_place = reads_in_place<T>(s);
  Grid<T> grid(s);
  Scratch<T> V(kSlotWinoIn, 16 * s.Cin * nb * per_image);
  Scratch<T> dM(kSlotWinoOut, 16 * s.Cout * nb * per_image);
  for (int64_t b = n0; b < n1; b += nb) {
    const int64_t e = std::min(n1, b + nb), tiles = (e - b) * per_image;
    for (int64_t n = b; n < e; ++n) {
      for (int64_t c = 0; c < s.Cin; ++c) {
        const auto g = grid.of(s, x + n * x_img + c * s.H * s.W,
                               in_place && (n < n1 - 1 || c < s.Cin - 1));
        input_transform(s, g.first, g.second, V.get() + c * tiles + (n - b) * per_image,
                        s.Cin * tiles);
      }
      for (int64_t o = 0; o < s.Cout; ++o) {
        grad_transform(s, gy + n * gy_img + o * s.OH * s.OW,
                       dM.get() + o * tiles + (n - b) * per_image, s.Cout * tiles);
      }
    }
    for (int p = 0; p < 16; ++p) {
      gemm<T>(false, true, s.Cout, s.Cin, tiles, dM.get() + p * s.Cout * tiles, tiles,
              V.get() + p * s.Cin * tiles, tiles, dU + p * s.Cout * s.Cin, s.Cin, true);
    }
  }
}

}  // namespace winograd
}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
