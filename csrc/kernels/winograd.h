// Winograd F(2x2, 3x3) for stride-1, undilated 3x3 convolutions (included by
// conv2d.cpp; one copy per ISA namespace).
//
// Each 2x2 output tile is computed from a 4x4 input tile as
//     Y = A^T [ (G g G^T) .* (B^T d B) ] A
// so the 36 multiply-adds per tile and channel pair of direct convolution
// become 16, done as 16 gemms (one per position of the 4x4 transform domain):
//     M[pos] (O x tiles) = U[pos] (O x C) @ V[pos] (C x tiles).
// The transforms only add, subtract and halve, so the result stays within
// rounding of direct convolution (in contrast to larger tiles such as F(4x4)).
//
// Backward-input is the same kernel on grad_out with 180-degree rotated,
// channel-swapped weights and padding 2 - p. Backward-weight uses the
// transposed map: dU[pos] = sum over tiles of (A dY A^T)[pos] (x) V[pos], then
// dw = G^T dU G.
//
// Tiles of a block of images are transformed together, with vectors running
// along a tile row (stride-2 input columns split with even/odd permutes).
#pragma once

#include <algorithm>

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

// U[pos][r][c] = (G g G^T)[pos] for the 3x3 filter g = w[r*rs + c*cs] (9
// contiguous values, optionally rotated 180 degrees).
template <typename T>
void transform_weights(const T* w, int64_t R, int64_t C, int64_t rs, int64_t cs, bool rotate,
                       T* U) {
  const int64_t RC = R * C;
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
        T* u = U + i * 4 * RC + r * C + c;
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

// Scratch for one block: the zero-padded input grid of one plane.
template <typename T>
struct Grid {
  int64_t ld;  // row stride, with slack for full-vector loads past the last tile
  Scratch<T> buf;
  explicit Grid(const Shape& s)
      : ld(s.GW + 4 * Vec<T>::L), buf(kSlotWinoGrid, s.GH * (s.GW + 4 * Vec<T>::L)) {
    buf.zero(s.GH * ld);
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

// V[pos][c][t0 + tile] = (B^T d B)[pos] for every tile of one plane (channel c).
template <typename T>
void input_transform(const Shape& s, const Grid<T>& g, T* V, int64_t plane_stride) {
  using Vt = Vec<T>;
  using R = typename Vt::reg;
  for (int64_t th = 0; th < s.TH; ++th) {
    const T* rows[4];
    for (int r = 0; r < 4; ++r) rows[r] = g.buf.get() + (2 * th + r) * g.ld;
    T* out = V + th * s.TW;
    for (int64_t tw = 0; tw < s.TW; tw += Vt::L) {
      const int64_t m = std::min<int64_t>(Vt::L, s.TW - tw);
      R t[4][4];  // d B, per input row
      for (int r = 0; r < 4; ++r) {
        R d0, d1, d2, d3;
        Vt::deinterleave(Vt::loadu(rows[r] + 2 * tw), Vt::loadu(rows[r] + 2 * tw + Vt::L), d0, d1);
        Vt::deinterleave(Vt::loadu(rows[r] + 2 * tw + 2), Vt::loadu(rows[r] + 2 * tw + 2 + Vt::L),
                         d2, d3);
        t[r][0] = Vt::sub(d0, d2);
        t[r][1] = Vt::add(d1, d2);
        t[r][2] = Vt::sub(d2, d1);
        t[r][3] = Vt::sub(d1, d3);
      }
      for (int j = 0; j < 4; ++j) {  // B^T (d B)
        const R v[4] = {Vt::sub(t[0][j], t[2][j]), Vt::add(t[1][j], t[2][j]),
                        Vt::sub(t[2][j], t[1][j]), Vt::sub(t[1][j], t[3][j])};
        for (int i = 0; i < 4; ++i) {
          T* dst = out + (i * 4 + j) * plane_stride + tw;
          if (m == Vt::L) {
            Vt::storeu(dst, v[i]);
          } else {
            Vt::storep(dst, v[i], m);
          }
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
  for (int64_t th = 0; th < s.TH; ++th) {
    const T* in = Mo + th * s.TW;
    T* y0 = y + 2 * th * s.OW;
    const bool second_row = 2 * th + 1 < s.OH;
    for (int64_t tw = 0; tw < s.TW; tw += Vt::L) {
      const int64_t m = std::min<int64_t>(Vt::L, s.TW - tw);
      R q[4][4];
      for (int p = 0; p < 16; ++p)
        q[p / 4][p % 4] = m == Vt::L ? Vt::loadu(in + p * pos_stride + tw)
                                     : Vt::loadp(in + p * pos_stride + tw, m);
      R r0[4], r1[4];  // A^T M
      for (int j = 0; j < 4; ++j) {
        r0[j] = Vt::add(Vt::add(q[0][j], q[1][j]), q[2][j]);
        r1[j] = Vt::sub(Vt::sub(q[1][j], q[2][j]), q[3][j]);
      }
      // (A^T M) A, plus bias; even/odd output columns interleaved back.
      const R y00 = Vt::add(Vt::add(Vt::add(r0[0], r0[1]), r0[2]), b);
      const R y01 = Vt::add(Vt::sub(Vt::sub(r0[1], r0[2]), r0[3]), b);
      const R y10 = Vt::add(Vt::add(Vt::add(r1[0], r1[1]), r1[2]), b);
      const R y11 = Vt::add(Vt::sub(Vt::sub(r1[1], r1[2]), r1[3]), b);
      const int64_t n = std::min<int64_t>(2 * m, s.OW - 2 * tw);  // valid columns
      R lo, hi;
      Vt::interleave(y00, y01, lo, hi);
      Vt::storep(y0 + 2 * tw, lo, std::min<int64_t>(n, Vt::L));
      Vt::storep(y0 + 2 * tw + Vt::L, hi, std::max<int64_t>(0, n - Vt::L));
      if (second_row) {
        Vt::interleave(y10, y11, lo, hi);
        Vt::storep(y0 + s.OW + 2 * tw, lo, std::min<int64_t>(n, Vt::L));
        Vt::storep(y0 + s.OW + 2 * tw + Vt::L, hi, std::max<int64_t>(0, n - Vt::L));
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
  for (int64_t th = 0; th < s.TH; ++th) {
    const T* g0 = gy + 2 * th * s.OW;
    const bool second_row = 2 * th + 1 < s.OH;
    T* out = dMo + th * s.TW;
    for (int64_t tw = 0; tw < s.TW; tw += Vt::L) {
      const int64_t m = std::min<int64_t>(Vt::L, s.TW - tw);
      const int64_t n = std::min<int64_t>(2 * m, s.OW - 2 * tw);
      const int64_t nlo = std::min<int64_t>(n, Vt::L), nhi = std::max<int64_t>(0, n - Vt::L);
      R a0, a1, b0 = Vt::zero(), b1 = Vt::zero();
      Vt::deinterleave(Vt::loadp(g0 + 2 * tw, nlo), Vt::loadp(g0 + 2 * tw + Vt::L, nhi), a0, a1);
      if (second_row) {
        Vt::deinterleave(Vt::loadp(g0 + s.OW + 2 * tw, nlo),
                         Vt::loadp(g0 + s.OW + 2 * tw + Vt::L, nhi), b0, b1);
      }
      // r = A dY (4 x 2), rows of A: (1,0), (1,1), (1,-1), (0,-1).
      const R r[4][2] = {{a0, a1},
                         {Vt::add(a0, b0), Vt::add(a1, b1)},
                         {Vt::sub(a0, b0), Vt::sub(a1, b1)},
                         {Vt::sub(Vt::zero(), b0), Vt::sub(Vt::zero(), b1)}};
      for (int i = 0; i < 4; ++i) {
        const R v[4] = {r[i][0], Vt::add(r[i][0], r[i][1]), Vt::sub(r[i][0], r[i][1]),
                        Vt::sub(Vt::zero(), r[i][1])};
        for (int j = 0; j < 4; ++j) Vt::storep(out + (i * 4 + j) * pos_stride + tw, v[j], m);
      }
    }
  }
}

// y[n] (Cout, OH, OW) = conv3x3(x[n] (Cin, H, W), U) + bias for n in [0, N).
// x/y image strides are given so groups can be addressed in place.
template <typename T>
void forward(const Shape& s, int64_t N, const T* x, int64_t x_img, const T* U, const T* bias,
             T* y, int64_t y_img) {
  const int64_t nb = images_per_block(s, N);
  const int64_t blocks = (N + nb - 1) / nb;
  const int64_t per_image = s.TH * s.TW;
  auto body = [&](int64_t b0, int64_t b1) {
    Grid<T> grid(s);
    const int64_t T_max = nb * per_image;
    Scratch<T> V(kSlotWinoIn, 16 * s.Cin * T_max), M(kSlotWinoOut, 16 * s.Cout * T_max);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * nb, n1 = std::min(N, n0 + nb), tiles = (n1 - n0) * per_image;
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t c = 0; c < s.Cin; ++c) {
          grid.load(s, x + n * x_img + c * s.H * s.W);
          input_transform(s, grid, V.get() + c * tiles + (n - n0) * per_image, s.Cin * tiles);
        }
      }
      for (int p = 0; p < 16; ++p) {
        gemm<T>(false, false, s.Cout, tiles, s.Cin, U + p * s.Cout * s.Cin, s.Cin,
                V.get() + p * s.Cin * tiles, tiles, M.get() + p * s.Cout * tiles, tiles, false);
      }
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t o = 0; o < s.Cout; ++o) {
          output_transform(s, M.get() + o * tiles + (n - n0) * per_image, s.Cout * tiles,
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
  Grid<T> grid(s);
  Scratch<T> V(kSlotWinoIn, 16 * s.Cin * nb * per_image);
  Scratch<T> dM(kSlotWinoOut, 16 * s.Cout * nb * per_image);
  for (int64_t b = n0; b < n1; b += nb) {
    const int64_t e = std::min(n1, b + nb), tiles = (e - b) * per_image;
    for (int64_t n = b; n < e; ++n) {
      for (int64_t c = 0; c < s.Cin; ++c) {
        grid.load(s, x + n * x_img + c * s.H * s.W);
        input_transform(s, grid, V.get() + c * tiles + (n - b) * per_image, s.Cin * tiles);
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
