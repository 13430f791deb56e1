// Fused conv2d + bias + ReLU + max_pool2d, forward and backward, for one ISA build.
//
// The unfused layer writes and re-reads the conv output several times (conv,
// relu, pool; then pool backward, relu backward, conv backward), each a pass
// over an activation that is 4x the pooled output and does not fit in cache
// (128 x 32 x 26 x 26 float32 = 11 MB for MNIST). Here each thread takes whole
// images and keeps one image's conv output in a per-thread scratch buffer that
// stays in L2: forward runs conv -> relu -> pool on it and writes only the
// pooled output, plus (when asked) one byte per pooled output naming the window
// tap that gets its gradient. Backward either reads those bytes (one pass that
// scatters the pooled gradient into the conv-output gradient: no conv, 1/16 of
// the bytes of the pooled output's float32 indices) or, without them,
// recomputes the image's conv output and runs pool backward and relu backward
// on it in cache; either way the result goes straight to the conv backward
// kernels.
//
// The per-image steps call the same kernels as the unfused path (nested
// parallel_for calls run serially on the worker), so the forward output is
// bit-identical to max_pool2d(relu(conv2d(x))) and the gradients differ from
// the unfused ones only in the order the per-image weight/bias sums are added.
//
// The first layer of an MNIST-style network (one input channel, 3x3, the
// exact 2x2 pool; AVX-512 float32) goes further: conv1_relu_maxpool_image
// keeps the conv output in registers, and without grad_x the weight and bias
// gradients come straight from the codes (conv1_relu_maxpool_grads_image), so
// neither direction writes a conv-sized plane at all.
#include <algorithm>
#include <type_traits>

#include "fastnn/parallel.h"
#include "kernels/batchnorm.h"
#include "kernels/conv_small.h"
#include "kernels/image_ranges.h"
#include "kernels/ops.h"
#include "kernels/simd.h"

namespace fastnn {
namespace FASTNN_ISA_NS {

namespace {

template <typename T>
void relu_inplace(T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = y[i];
    y[i] = v < T(0) ? T(0) : v;  // same select as relu(): NaN and -0.0 pass through
  }
}

// g = g where y > 0, else 0 (relu_backward with y the relu output).
template <typename T>
void relu_backward_inplace(T* __restrict g, const T* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = g[i];
    g[i] = y[i] > T(0) ? v : T(0);
  }
}

// Per-channel sums of g (C, P) added to acc (C,). Lane-wise partial sums: a
// scalar chain would be latency-bound and cost more than the whole conv.
template <typename T>
void add_channel_sums(const T* g, int64_t C, int64_t P, T* acc) {
  using V = simd::Vec<T>;
  for (int64_t c = 0; c < C; ++c) {
    const T* r = g + c * P;
    typename V::reg s0 = V::zero(), s1 = V::zero();
    int64_t i = 0;
    for (; i + 2 * V::L <= P; i += 2 * V::L) {
      s0 = V::add(s0, V::loadu(r + i));
      s1 = V::add(s1, V::loadu(r + i + V::L));
    }
    for (; i < P; i += V::L) s0 = V::add(s0, V::loadp(r + i, std::min<int64_t>(V::L, P - i)));
    acc[c] += V::hsum(V::add(s0, s1));
  }
}

// Floats past one image's conv output (and its gradient) in the scratch
// buffers: the one-pass relu + pool kernels below read and write up to 32
// past the last row.
constexpr int64_t kRowSlack = 32;

// See window_codes.
constexpr uint8_t kNoGrad = 255;

// Whether the pool is the 2x2 stride-2 unpadded one and tiles the conv output
// exactly (no leftover row or column).
inline bool exact_2x2_pool(const Conv2dParams& cp, const Pool2dParams& pp) {
  return is_2x2_s2(pp) && cp.OH == 2 * pp.OH && cp.OW == 2 * pp.OW;
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// The taps a b / c d of the 16 2x2 windows of a row pair (rows r0 and r0 + W,
// W <= 32), each window in the same lane of all four. In-lane shuffles put
// windows 0 1 8 9 2 3 10 11 .. in lanes 0..15 (kWindowOrder); they cost less
// than two-source permutes into window order.
struct Taps2x2 {
  __m512 a, b, c, d;
};
inline Taps2x2 load_taps_2x2(const float* r0, int64_t W) {
  const __m512 l0 = _mm512_loadu_ps(r0), h0 = _mm512_loadu_ps(r0 + 16);
  const __m512 l1 = _mm512_loadu_ps(r0 + W), h1 = _mm512_loadu_ps(r0 + W + 16);
  return {_mm512_shuffle_ps(l0, h0, 0x88), _mm512_shuffle_ps(l0, h0, 0xdd),
          _mm512_shuffle_ps(l1, h1, 0x88), _mm512_shuffle_ps(l1, h1, 0xdd)};
}
inline __m512i window_order() {
  return _mm512_setr_epi32(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
}

// Which tap of each window gets its gradient through relu and the pool: ub,
// uc, ud = b, c or d is the first maximum (a when none is set); live = the
// window gets one at all. relu keeps values > 0 and their order, so wherever
// relu passes a gradient the first maximum of relu(m) is the first maximum of
// m; a window holding a NaN gets none (the pool picks the NaN, whose relu is
// not > 0). So plain ordered compares find the winner, and one unordered test
// clears NaN windows: 6 compares instead of 10 and 8 mask ops.
struct Winner2x2 {
  __mmask16 ub, uc, ud, live;
};
inline Winner2x2 winner_2x2(const Taps2x2& t) {
  const __mmask16 nan =
      _mm512_cmp_ps_mask(t.a, t.b, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(t.c, t.d, _CMP_UNORD_Q);
  const __mmask16 ub = _mm512_cmp_ps_mask(t.b, t.a, _CMP_GT_OQ);
  __m512 mx = _mm512_mask_blend_ps(ub, t.a, t.b);
  const __mmask16 uc = _mm512_cmp_ps_mask(t.c, mx, _CMP_GT_OQ);
  mx = _mm512_mask_blend_ps(uc, mx, t.c);
  const __mmask16 ud = _mm512_cmp_ps_mask(t.d, mx, _CMP_GT_OQ);
  mx = _mm512_mask_blend_ps(ud, mx, t.d);
  return {ub, uc, ud, static_cast<__mmask16>(_mm512_cmp_ps_mask(mx, _mm512_setzero_ps(),
                                                                _CMP_GT_OQ) & ~nan)};
}

// Stores the gradient gr (in window_order lanes) of a row pair's windows at
// its winning taps: rows g0 and g0 + W, whole vectors (see the callers).
inline void store_taps_2x2(float* g0, int64_t W, __m512 gr, __mmask16 ka, __mmask16 kb,
                           __mmask16 kc, __mmask16 kd) {
  const __m512 ga = _mm512_maskz_mov_ps(ka, gr), gb = _mm512_maskz_mov_ps(kb, gr);
  const __m512 gc = _mm512_maskz_mov_ps(kc, gr), gd = _mm512_maskz_mov_ps(kd, gr);
  _mm512_storeu_ps(g0, _mm512_unpacklo_ps(ga, gb));
  _mm512_storeu_ps(g0 + 16, _mm512_unpackhi_ps(ga, gb));
  _mm512_storeu_ps(g0 + W, _mm512_unpacklo_ps(gc, gd));
  _mm512_storeu_ps(g0 + W + 16, _mm512_unpackhi_ps(gc, gd));
}
#endif

// y (C, OH, OW) = max_pool2d(relu(m), 2x2, stride 2) of the conv output m
// (C, 2*OH, 2*OW), bit for bit the relu and max_pool2d passes (the same
// selects and max operations on the same values, in the same order) in one
// pass whose loads are whole vectors; codes (C, OH, OW), when given, gets the
// window codes (window_codes below). Returns false, doing nothing, unless
// this is a float AVX-512 build and a pooled row fits one vector (OW <= 16).
// m needs kRowSlack floats past C*H*W (loads run past a row's end).
template <typename T>
bool relu_maxpool2x2_forward(const T*, int64_t, int64_t, int64_t, T*, uint8_t*) {
  return false;
}
#if defined(__AVX512F__) && defined(__AVX512DQ__)
template <>
bool relu_maxpool2x2_forward<float>(const float* __restrict m, int64_t C, int64_t OH, int64_t OW,
                                    float* __restrict y, uint8_t* __restrict codes) {
  using V = simd::Vec<float>;
  using R = V::reg;
  if (OW > V::L) return false;
  const int64_t W = 2 * OW;
  const R zero = V::zero();
  auto relu = [&](R v) { return V::select(V::gt(zero, v), zero, v); };  // as relu_inplace
  // The inverse of window_order(): back from the taps' lanes to window order.
  const __m512i unorder =
      _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  const __mmask16 cols = static_cast<__mmask16>((1u << OW) - 1u);
  for (int64_t row = 0; row < C * OH; ++row) {
    const float* r0 = m + row * 2 * W;
    R e, o;
    V::deinterleave(simd::max_nan<float>(relu(V::loadu(r0)), relu(V::loadu(r0 + W))),
                    simd::max_nan<float>(relu(V::loadu(r0 + V::L)), relu(V::loadu(r0 + W + V::L))),
                    e, o);
    V::storep(y + row * OW, simd::max_nan<float>(e, o), OW);
    if (codes) {
      const Winner2x2 w = winner_2x2(load_taps_2x2(r0, W));
      __m512i c = _mm512_maskz_mov_epi32(w.ub, _mm512_set1_epi32(1));
      c = _mm512_mask_mov_epi32(c, w.uc, _mm512_set1_epi32(2));
      c = _mm512_mask_mov_epi32(c, w.ud, _mm512_set1_epi32(3));
      c = _mm512_mask_mov_epi32(_mm512_set1_epi32(kNoGrad), w.live, c);
      _mm512_mask_cvtepi32_storeu_epi8(codes + row * OW, cols,
                                       _mm512_permutexvar_epi32(unorder, c));
    }
  }
  return true;
}
#endif

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// The tile planes of one image for the two kernels below, by pooled row pair:
// q[i][j][p*T + t] = V_i (conv_small::wino_v, as wino_tile_planes computes
// it) of tile t of input row 2p + j, for the pooled rows p < POH and j < 4
// (plane stride ld). Conv rows 2p and 2p + 1 read input rows 2p .. 2p + 3,
// so with this order every vector the kernels load is 16 consecutive (p, t)
// of one plane: their lanes run over the whole pooled plane (169 positions
// for MNIST: 11 vectors) instead of one pooled row per vector (13 of 16
// lanes used, 13 vectors). Lanes past POH*T are never loaded unmasked.
inline void conv1_pair_planes(const float* __restrict x, int64_t W, int64_t POH, int64_t T,
                              float* __restrict q, int64_t ld) {
  using V = simd::Vec<float>;
  for (int64_t r = 0; r < 2 * POH + 2; ++r) {
    for (int64_t t0 = 0; t0 < T; t0 += V::L) {
      const int64_t m = std::min<int64_t>(V::L, T - t0);
      V::reg vi[4];
      conv_small::wino_row_v<float>(x + r * W, W, t0, vi);
      for (int64_t j = r & 1; j < 4; j += 2) {  // r = 2p + j
        const int64_t p = (r - j) / 2;
        if (p < 0 || p >= POH) continue;
        for (int i = 0; i < 4; ++i) V::storep(q + (i * 4 + j) * ld + p * T + t0, vi[i], m);
      }
    }
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// One image of conv_small's Winograd F(2,3) forward (one input channel, 3x3:
// the MNIST first layer) with relu and the exact 2x2 pool applied in
// registers: y (O, POH, T) and codes (same shape, when given) from the image's
// pair planes q (conv1_pair_planes, plane stride ld) and the transformed
// weights u (O, 3, 4) (conv_small::wino_fwd_weights); T <= 16 pooled columns.
//
// The unfused order stores each channel's conv output in pixel order (an
// interleave per 32 pixels) and the pool pass reads it back and unzips it
// again. Here a lane holds one pooled position s = p*T + t, and its tile's two
// outputs (e, o) in conv rows 2p and 2p + 1 are the pool window's taps a b /
// c d: no shuffles, and the conv output never leaves registers. The sums, the
// selects and their order are wino_fwd_channel's and relu_maxpool2x2_forward's,
// so y and codes are bit for bit the unfused ones.
inline void conv1_relu_maxpool_image(const float* __restrict u, const float* __restrict bias,
                                     const float* __restrict q, int64_t ld, int64_t POH,
                                     int64_t T, int64_t O, float* __restrict y,
                                     uint8_t* __restrict codes) {
  constexpr int64_t L = simd::Vec<float>::L;
  const __m512 zero = _mm512_setzero_ps();
  // relu(a) = a < 0 ? 0 : a in one op: vmaxps returns its second operand for
  // a NaN and for a pair of zeros (so -0.0 stays -0.0), as relu_inplace does.
  auto relu = [&](__m512 a) { return _mm512_max_ps(zero, a); };
  const int64_t plane = POH * T;
  for (int64_t s0 = 0; s0 < plane; s0 += L) {
    const int64_t m = std::min<int64_t>(L, plane - s0);
    const __mmask16 lanes = static_cast<__mmask16>((1u << m) - 1u);
    // R[i][j] = V_i of input row 2p + j. Lanes past the plane load zero: past
    // its end the scratch holds whatever it held before, and a stale
    // subnormal there costs a microcode assist in every FMA it meets
    // (measured: the kernel ran 2x slower inside the training step than alone).
    __m512 R[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) R[i][j] = _mm512_maskz_loadu_ps(lanes, q + (i * 4 + j) * ld + s0);
    for (int64_t o = 0; o < O; ++o) {
      const float* uo = u + o * 12;
      const __m512 bo = _mm512_set1_ps(bias ? bias[o] : 0.0f);
      __m512 M0[4], M1[4];
      for (int i = 0; i < 4; ++i) {
        const __m512 u0 = _mm512_set1_ps(uo[i]), u1 = _mm512_set1_ps(uo[4 + i]);
        const __m512 u2 = _mm512_set1_ps(uo[8 + i]);
        M0[i] = i == 1 ? _mm512_fmadd_ps(u0, R[i][0], bo) : _mm512_mul_ps(u0, R[i][0]);
        M1[i] = i == 1 ? _mm512_fmadd_ps(u0, R[i][1], bo) : _mm512_mul_ps(u0, R[i][1]);
        M0[i] = _mm512_fmadd_ps(u1, R[i][1], M0[i]);
        M1[i] = _mm512_fmadd_ps(u1, R[i][2], M1[i]);
        M0[i] = _mm512_fmadd_ps(u2, R[i][2], M0[i]);
        M1[i] = _mm512_fmadd_ps(u2, R[i][3], M1[i]);
      }
      Taps2x2 t;
      t.a = _mm512_add_ps(_mm512_add_ps(M0[0], M0[1]), M0[2]);
      t.b = _mm512_sub_ps(_mm512_sub_ps(M0[1], M0[2]), M0[3]);
      t.c = _mm512_add_ps(_mm512_add_ps(M1[0], M1[1]), M1[2]);
      t.d = _mm512_sub_ps(_mm512_sub_ps(M1[1], M1[2]), M1[3]);
      // Without a NaN among the taps max_nan is plain vmaxps: 3 ops instead of 9.
      const __mmask16 nan = _mm512_cmp_ps_mask(t.a, t.b, _CMP_UNORD_Q) |
                            _mm512_cmp_ps_mask(t.c, t.d, _CMP_UNORD_Q);
      const __m512 mx =
          nan == 0 ? _mm512_max_ps(_mm512_max_ps(relu(t.a), relu(t.c)),
                                   _mm512_max_ps(relu(t.b), relu(t.d)))
                   : simd::max_nan<float>(simd::max_nan<float>(relu(t.a), relu(t.c)),
                                          simd::max_nan<float>(relu(t.b), relu(t.d)));
      const int64_t at = o * plane + s0;
      _mm512_mask_storeu_ps(y + at, lanes, mx);
      if (codes) {
        const Winner2x2 w = winner_2x2(t);
        __m512i c = _mm512_maskz_mov_epi32(w.ub, _mm512_set1_epi32(1));
        c = _mm512_mask_mov_epi32(c, w.uc, _mm512_set1_epi32(2));
        c = _mm512_mask_mov_epi32(c, w.ud, _mm512_set1_epi32(3));
        c = _mm512_mask_mov_epi32(_mm512_set1_epi32(kNoGrad), w.live, c);
        _mm512_mask_cvtepi32_storeu_epi8(codes + at, lanes, c);
      }
    }
  }
}

// The weight and bias gradients of conv1_relu_maxpool_image's layer for one
// image, from the pooled gradient g (O, POH, T) routed by the window codes
// (same shape): lanes (O, 4, 3, Folded::kLen) += lane-wise U_i * V_i as in
// conv_small::wino_bwd_w (its finish turns them into gw), gb[o] += the
// gradient that reaches channel o. q: the image's pair planes, as there.
//
// The unfused order scatters g into a conv-output gradient in pixel order
// (an interleave per 32 pixels), and wino_bwd_w reads it back and unzips it.
// Here the codes give each tile's two gradients (e, o) directly, in the lanes
// of the pooled positions: window tap a or b is (e, o) of conv row 2p, c or d
// of conv row 2p + 1. Conv row 2p + r meets input rows 2p + r + kh, whose V_i
// are the pair planes' j = r + kh.
inline void conv1_relu_maxpool_grads_image(const float* __restrict q, int64_t ld, int64_t POH,
                                           int64_t T, int64_t O, const float* __restrict g,
                                           const uint8_t* __restrict codes,
                                           float* __restrict lanes, float* __restrict gb) {
  using Fold = conv_small::Folded<float>;
  constexpr int64_t F = Fold::kLen;
  constexpr int64_t L = simd::Vec<float>::L;
  const int64_t plane = POH * T;
  for (int64_t o = 0; o < O; ++o) {
    float* lo = lanes + o * 12 * F;
    __m512 acc[4][3];
    for (int i = 0; i < 4; ++i)
      for (int kh = 0; kh < 3; ++kh) acc[i][kh] = Fold::load(lo + (i * 3 + kh) * F);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t s0 = 0; s0 < plane; s0 += L) {
      const int64_t m = std::min<int64_t>(L, plane - s0);
      const __mmask16 cols = static_cast<__mmask16>((1u << m) - 1u);
      const int64_t at = o * plane + s0;
      // No tap of a lane past the plane is set: those lanes add nothing.
      const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(cols, codes + at));
      const __mmask16 ka = _mm512_mask_cmpeq_epi32_mask(cols, c, _mm512_set1_epi32(0));
      const __mmask16 kb = _mm512_mask_cmpeq_epi32_mask(cols, c, _mm512_set1_epi32(1));
      const __mmask16 kc = _mm512_mask_cmpeq_epi32_mask(cols, c, _mm512_set1_epi32(2));
      const __mmask16 kd = _mm512_mask_cmpeq_epi32_mask(cols, c, _mm512_set1_epi32(3));
      const __m512 gr = _mm512_maskz_loadu_ps(static_cast<__mmask16>(ka | kb | kc | kd), g + at);
      sum = _mm512_add_ps(sum, gr);
      const __m512 e0 = _mm512_maskz_mov_ps(ka, gr), o0 = _mm512_maskz_mov_ps(kb, gr);
      const __m512 e1 = _mm512_maskz_mov_ps(kc, gr), o1 = _mm512_maskz_mov_ps(kd, gr);
      for (int i = 0; i < 4; ++i) {
        // U_i of each conv row's (e, o), as wino_step: (e, e + o, e - o, o).
        const __m512 u0 = i == 0 ? e0 : i == 1 ? _mm512_add_ps(e0, o0)
                          : i == 2 ? _mm512_sub_ps(e0, o0) : o0;
        const __m512 u1 = i == 0 ? e1 : i == 1 ? _mm512_add_ps(e1, o1)
                          : i == 2 ? _mm512_sub_ps(e1, o1) : o1;
        // V_i of input rows 2p .. 2p + 3; lanes past the plane are zeroed, as
        // stale scratch there could hold an inf (0 * inf = NaN) or a subnormal.
        __m512 r[4];
        for (int j = 0; j < 4; ++j) r[j] = _mm512_maskz_loadu_ps(cols, q + (i * 4 + j) * ld + s0);
        for (int kh = 0; kh < 3; ++kh) {
          acc[i][kh] = _mm512_fmadd_ps(u0, r[kh], acc[i][kh]);
          acc[i][kh] = _mm512_fmadd_ps(u1, r[kh + 1], acc[i][kh]);
        }
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int kh = 0; kh < 3; ++kh) Fold::store(lo + (i * 3 + kh) * F, acc[i][kh]);
    if (gb) gb[o] += _mm512_reduce_add_ps(sum);
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// The pass both share: per channel and pooled row, winners(row, ka, kb, kc, kd)
// names the tap of each lane that gets its gradient (and returns the lanes that
// get one at all); the pooled gradient, permuted once into the taps' lane
// order, is kept on those lanes, summed into gb and stored to the taps.
template <typename Winners>
inline void route_2x2(const float* __restrict g, int64_t C, int64_t OH, int64_t OW,
                      float* __restrict gm, float* __restrict gb, const Winners& winners) {
  const int64_t W = 2 * OW;
  const __m512i order = window_order();
  const __mmask16 cols = static_cast<__mmask16>((1u << OW) - 1u);
  for (int64_t ch = 0; ch < C; ++ch) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t oh = 0; oh < OH; ++oh) {
      const int64_t row = ch * OH + oh;
      __mmask16 ka, kb, kc, kd;
      const __mmask16 live = winners(row, ka, kb, kc, kd);
      // Lanes past OW load 0, so they add nothing to the sum.
      const __m512 gr = _mm512_maskz_mov_ps(
          live, _mm512_permutexvar_ps(order, _mm512_maskz_loadu_ps(cols, g + row * OW)));
      sum = _mm512_add_ps(sum, gr);
      store_taps_2x2(gm + row * 2 * W, W, gr, ka, kb, kc, kd);
    }
    if (gb) gb[ch] += _mm512_reduce_add_ps(sum);
  }
}
#endif

// gm (C, 2*OH, 2*OW) = the gradient at the conv output m (same shape) of
// max_pool2d(relu(m), 2x2, stride 2), from g (C, OH, OW); gb[c] += the sum of
// channel c's gradient when gb is given. Returns false, doing nothing, unless
// this is a float AVX-512 build and a pooled row fits one vector (OW <= 16).
//
// One pass instead of relu, max_pool2d_backward and relu_backward (winner_2x2);
// with the pooled gradient permuted once into the taps' lane order, a row pair
// takes 24 cycles instead of 33. Each row pair is loaded and stored as whole
// vectors: a row's store runs past its end into the next row, which a later
// store (rows go in address order) overwrites. m and gm need kRowSlack floats
// past C*H*W.
template <typename T>
bool relu_maxpool2x2_backward(const T*, const T*, int64_t, int64_t, int64_t, T*, T*) {
  return false;
}
#if defined(__AVX512F__) && defined(__AVX512DQ__)
template <>
bool relu_maxpool2x2_backward<float>(const float* __restrict m, const float* __restrict g,
                                     int64_t C, int64_t OH, int64_t OW, float* __restrict gm,
                                     float* __restrict gb) {
  if (OW > 16) return false;
  const int64_t W = 2 * OW;
  route_2x2(g, C, OH, OW, gm, gb,
            [&](int64_t row, __mmask16& ka, __mmask16& kb, __mmask16& kc, __mmask16& kd) {
              const Winner2x2 w = winner_2x2(load_taps_2x2(m + row * 2 * W, W));
              ka = ~w.ub & ~w.uc & ~w.ud;
              kb = w.ub & ~w.uc & ~w.ud;
              kc = w.uc & ~w.ud;
              kd = w.ud;
              return w.live;
            });
  return true;
}
#endif

// As relu_maxpool2x2_backward, but the winners come from the forward's codes
// (C, OH, OW) instead of the conv output: no m, and the same gm and gb.
template <typename T>
bool codes2x2_backward(const uint8_t*, const T*, int64_t, int64_t, int64_t, T*, T*) {
  return false;
}
#if defined(__AVX512F__) && defined(__AVX512DQ__)
template <>
bool codes2x2_backward<float>(const uint8_t* __restrict codes, const float* __restrict g,
                              int64_t C, int64_t OH, int64_t OW, float* __restrict gm,
                              float* __restrict gb) {
  if (OW > 16) return false;
  const __m512i order = window_order();
  const __mmask16 cols = static_cast<__mmask16>((1u << OW) - 1u);
  route_2x2(g, C, OH, OW, gm, gb,
            [&](int64_t row, __mmask16& ka, __mmask16& kb, __mmask16& kc, __mmask16& kd) {
              // Lanes past OW read code 0 and gradient 0: they store zeros past the row.
              const __m512i c = _mm512_permutexvar_epi32(
                  order, _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(cols, codes + row * OW)));
              ka = _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(0));
              kb = _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(1));
              kc = _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(2));
              kd = _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(3));
              return static_cast<__mmask16>(ka | kb | kc | kd);
            });
  return true;
}
#endif

// One byte per pooled output: the window tap (kh * KW + kw) whose conv output
// gets the pooled output's gradient, or kNoGrad when none does. A window's
// gradient goes to its first maximum of relu(m) and survives relu backward
// only if that maximum is > 0, so a window whose values are all <= 0, or that
// holds a NaN (the pooled output is then NaN, and NaN > 0 is false), gets none.

// codes (N*C planes of OH x OW) for the relu'd conv output r (N*C planes of
// H x W), in the pool's geometry p; the tap order (kh-major) is max_pool2d's.
template <typename T>
void window_codes(const Pool2dParams& p, const T* r, uint8_t* codes) {
  const int64_t planes = p.N * p.C;
  for (int64_t pl = 0; pl < planes; ++pl) {
    const T* rp = r + pl * p.H * p.W;
    uint8_t* cp = codes + pl * p.OH * p.OW;
    for (int64_t oh = 0; oh < p.OH; ++oh) {
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        bool nan = false;
        T best = T(0);
        int code = kNoGrad;
        for (int64_t kh = 0; kh < p.kh; ++kh) {
          const int64_t ih = oh * p.sh - p.ph + kh * p.dh;
          if (ih < 0 || ih >= p.H) continue;
          for (int64_t kw = 0; kw < p.kw; ++kw) {
            const int64_t iw = ow * p.sw - p.pw + kw * p.dw;
            if (iw < 0 || iw >= p.W) continue;
            const T v = rp[ih * p.W + iw];
            if (v != v) {
              nan = true;
            } else if (v > best) {
              best = v;
              code = int(kh * p.kw + kw);
            }
          }
        }
        cp[oh * p.OW + ow] = nan ? kNoGrad : uint8_t(code);
      }
    }
  }
}

// gm (N*C planes of H x W) = the conv-output gradient of the pooled gradient g
// (N*C planes of OH x OW) routed by codes; overlapping windows add up.
template <typename T>
void scatter_codes(const Pool2dParams& p, const T* g, const uint8_t* codes, T* gm) {
  const int64_t planes = p.N * p.C;
  std::fill(gm, gm + planes * p.H * p.W, T(0));
  for (int64_t pl = 0; pl < planes; ++pl) {
    T* gp = gm + pl * p.H * p.W;
    const T* g0 = g + pl * p.OH * p.OW;
    const uint8_t* c0 = codes + pl * p.OH * p.OW;
    for (int64_t oh = 0; oh < p.OH; ++oh) {
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        const int c = c0[oh * p.OW + ow];
        if (c == kNoGrad) continue;
        const int64_t ih = oh * p.sh - p.ph + (c / p.kw) * p.dh;
        const int64_t iw = ow * p.sw - p.pw + (c % p.kw) * p.dw;
        // The forward never names a padding tap; a forged code must not write there.
        if (ih < 0 || ih >= p.H || iw < 0 || iw >= p.W) continue;
        gp[ih * p.W + iw] += g0[oh * p.OW + ow];
      }
    }
  }
}

// Below this many images per thread the per-image split leaves threads idle;
// the batch-level kernels (which split rows/planes) are used instead.
inline bool per_image(int64_t N) { return N >= 2 * static_cast<int64_t>(get_num_threads()); }

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// Whether conv1_relu_maxpool_forward (and, without grad_x, _backward) takes
// this layer: the conv is conv_small's Winograd one and the pool the exact
// 2x2, at most 16 pooled columns.
inline bool conv1_pool_applies(const Conv2dParams& cp, const Pool2dParams& pp) {
  return conv_small::applies(cp) && conv_small::wino_applies(cp) && exact_2x2_pool(cp, pp) &&
         pp.OW <= 16;
}

// conv2d_relu_maxpool_forward for those layers: the images are split between
// the threads, each building one image's pair planes at a time (11 KB for
// MNIST, in L1) and running conv1_relu_maxpool_image on them.
void conv1_relu_maxpool_forward(const Conv2dParams& cp, const Pool2dParams& pp, const float* x,
                                const float* w, const float* b, float* y, uint8_t* codes) {
  constexpr int64_t L = simd::Vec<float>::L;
  const int64_t T = pp.OW;
  const int64_t ld = (pp.OH * T + L - 1) / L * L;
  const int64_t in_img = cp.H * cp.W, out_img = cp.O * pp.OH * pp.OW;
  Buffer<float> u(cp.O * 12);
  conv_small::wino_fwd_weights(w, cp.O, u.get());
  parallel_for(cp.N, 1, [&](int64_t n0, int64_t n1) {
    Scratch<float> q(kSlotFusedMid, 16 * ld);
    for (int64_t n = n0; n < n1; ++n) {
      conv1_pair_planes(x + n * in_img, cp.W, pp.OH, T, q.get(), ld);
      conv1_relu_maxpool_image(u.get(), b, q.get(), ld, pp.OH, T, cp.O, y + n * out_img,
                               codes ? codes + n * out_img : nullptr);
    }
  });
}

// conv2d_relu_maxpool_backward for those layers when no input gradient is
// asked for (the first layer of a network needs none): the images are split
// into the fixed ranges of sum_over_image_ranges, each range keeping lane
// sums (conv1_relu_maxpool_grads_image) that are finished into gw once. With
// no codes from the forward, each image's codes are recomputed first
// (conv1_relu_maxpool_image: the same decisions), so both ways give the same
// bits.
void conv1_relu_maxpool_backward(const Conv2dParams& cp, const Pool2dParams& pp, const float* gy,
                                 const float* x, const float* w, const float* b,
                                 const uint8_t* codes, float* gw, float* gb) {
  using Fold = conv_small::Folded<float>;
  constexpr int64_t L = simd::Vec<float>::L;
  const int64_t T = pp.OW;
  const int64_t ld = (pp.OH * T + L - 1) / L * L;
  const int64_t in_img = cp.H * cp.W, out_img = cp.O * pp.OH * pp.OW;
  const int64_t wsize = cp.O * 9, sums_len = wsize + cp.O;
  Buffer<float> u(codes ? 1 : cp.O * 12);
  if (!codes) conv_small::wino_fwd_weights(w, cp.O, u.get());
  Buffer<float> sums(sums_len);
  sums.zero(sums_len);
  sum_over_image_ranges(kSlotFusedSums, cp.N, sums_len, sums.get(),
                        [&](int64_t n0, int64_t n1, float* acc) {
    Scratch<float> q(kSlotFusedMid, 16 * ld);
    Scratch<float> lanes(kSlotFusedW, cp.O * 12 * Fold::kLen);
    Scratch<float> ybuf(kSlotFusedGrad, codes ? 1 : out_img);
    Scratch<uint8_t> cbuf(kSlotFusedCodes, codes ? 1 : out_img);
    std::fill(lanes.get(), lanes.get() + cp.O * 12 * Fold::kLen, 0.0f);
    for (int64_t n = n0; n < n1; ++n) {
      conv1_pair_planes(x + n * in_img, cp.W, pp.OH, T, q.get(), ld);
      const uint8_t* cn = codes ? codes + n * out_img : cbuf.get();
      if (!codes) {
        conv1_relu_maxpool_image(u.get(), b, q.get(), ld, pp.OH, T, cp.O, ybuf.get(),
                                 cbuf.get());
      }
      conv1_relu_maxpool_grads_image(q.get(), ld, pp.OH, T, cp.O, gy + n * out_img, cn,
                                     lanes.get(), gb ? acc + wsize : nullptr);
    }
    Buffer<float> gw1(wsize);
    conv_small::wino_bwd_w_finish(lanes.get(), cp.O, gw1.get());
    for (int64_t i = 0; i < wsize; ++i) acc[i] += gw1.get()[i];
  });
  if (gw) std::copy(sums.get(), sums.get() + wsize, gw);
  if (gb) std::copy(sums.get() + wsize, sums.get() + sums_len, gb);
}
#endif

// --- BatchNorm + ReLU + max_pool2d ------------------------------------------
// The unfused pair writes the BatchNorm output (N,C,H,W), reads it to pool,
// and backward writes and re-reads its full-size gradient. Here each plane is
// normalised into a per-thread buffer in L1 (bn::affine_plane, as
// batch_norm2d_relu writes it) and pooled from there (the same pool kernels as
// the conv fusion), so only the pooled output and its codes reach memory; the
// backward scatters each plane's pooled gradient by the codes into that buffer
// and runs batch_norm2d_backward's per-plane steps on it. The statistics are
// bn::batch_stats's and the gradient sums are taken plane by plane in the same
// order, so outputs equal the unfused ops' bit for bit.

// Whether the pool is the exact 2x2 stride-2 one over the plane.
inline bool exact_2x2_plane(const Pool2dParams& pp) {
  return is_2x2_s2(pp) && pp.H == 2 * pp.OH && pp.W == 2 * pp.OW;
}

}  // namespace

template <typename T>
void batch_norm2d_relu_maxpool_forward(const Pool2dParams& pp, const T* x, const T* w,
                                       const T* b, T* mean, T* var, double eps, bool training,
                                       T* y, uint8_t* codes) {
  const int64_t N = pp.N, C = pp.C, HW = pp.H * pp.W, OP = pp.OH * pp.OW;
  if (C == 0) return;
  Buffer<T> consts(2 * C);
  const T* scale = consts.get();
  const T* shift = consts.get() + C;
  bn::forward_setup(N, C, HW, x, w, b, mean, var, eps, training, consts.get());
  if (N == 0 || OP == 0) return;
  Pool2dParams p1 = pp;
  p1.N = 1;
  p1.C = 1;
  const bool exact = exact_2x2_plane(pp);
  parallel_for(N * C, bn::plane_grain(HW), [&](int64_t lo, int64_t hi) {
    Scratch<T> r(kSlotFusedMid, HW + kRowSlack);  // the 2x2 kernel reads past the last row
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t c = p % C;
      T* yp = y + p * OP;
      uint8_t* cp = codes ? codes + p * OP : nullptr;
      if (exact) {  // relu_maxpool2x2_forward applies the relu itself
        bn::affine_plane<false>(x + p * HW, HW, mean[c], scale[c], shift[c], r.get());
        if (relu_maxpool2x2_forward(r.get(), 1, pp.OH, pp.OW, yp, cp)) continue;
        relu_inplace(r.get(), HW);
      } else {
        bn::affine_plane<true>(x + p * HW, HW, mean[c], scale[c], shift[c], r.get());
      }
      max_pool2d_forward<T>(p1, r.get(), yp);
      if (cp) window_codes(p1, r.get(), cp);
    }
  });
}

template <typename T>
void batch_norm2d_relu_maxpool_backward(const Pool2dParams& pp, const T* gy, const T* x,
                                        const T* w, const T* b, const T* mean, const T* var,
                                        double eps, bool training, const uint8_t* codes, T* gx,
                                        T* gw, T* gb) {
  const int64_t N = pp.N, C = pp.C, HW = pp.H * pp.W, OP = pp.OH * pp.OW;
  if (C == 0) return;
  const int64_t planes = N * C;
  Buffer<T> fwd(codes ? 0 : 2 * C);  // the forward's scale and shift, to recompute planes
  if (!codes) bn::forward_consts(C, w, b, var, eps, fwd.get(), fwd.get() + C);
  Pool2dParams p1 = pp;
  p1.N = 1;
  p1.C = 1;
  const bool exact = exact_2x2_plane(pp);
  // g (HW + kRowSlack) = the gradient at relu(batch_norm2d(x)) of plane p: by
  // the codes, or without them as max_pool2d_backward and relu_backward on the
  // plane recomputed into r (any window size: no one-byte codes needed).
  auto route = [&](int64_t p, T* g, T* r) {
    const T* gp = gy + p * OP;
    if (codes) {
      const uint8_t* cp = codes + p * OP;
      if (!exact || !codes2x2_backward(cp, gp, 1, pp.OH, pp.OW, g, static_cast<T*>(nullptr))) {
        scatter_codes(p1, gp, cp, g);
      }
      return;
    }
    const int64_t c = p % C;
    bn::affine_plane<true>(x + p * HW, HW, mean[c], fwd.get()[c], fwd.get()[C + c], r);
    max_pool2d_backward<T>(p1, gp, r, g);
    relu_backward_inplace(g, r, HW);
  };
  auto each_plane = [&](auto&& body) {
    parallel_for(planes, bn::plane_grain(HW), [&](int64_t lo, int64_t hi) {
      Scratch<T> g(kSlotFusedGrad, HW + kRowSlack);
      Scratch<T> r(kSlotFusedMid, codes ? 1 : HW);
      for (int64_t p = lo; p < hi; ++p) {
        route(p, g.get(), r.get());
        body(p, g.get());
      }
    });
  };
  Buffer<double> part(2 * planes);
  double* pp2 = part.get();
  each_plane([&](int64_t p, const T* g) {
    bn::plane_grad_sums(g, x + p * HW, HW, static_cast<double>(mean[p % C]), pp2[2 * p],
                        pp2[2 * p + 1]);
  });
  Buffer<T> consts(3 * C);  // k, a, d of bn::grad_plane
  T* k = consts.get();
  bn::grad_consts(N, C, HW, pp2, w, var, eps, training, k, gw, gb);
  if (!gx) return;
  each_plane([&](int64_t p, const T* g) {
    const int64_t c = p % C;
    bn::grad_plane(g, x + p * HW, HW, k[c], mean[c], k[C + c], k[2 * C + c], gx + p * HW);
  });
}

template <typename T>
void conv2d_relu_maxpool_forward(const Conv2dParams& cp, const Pool2dParams& pp, const T* x,
                                 const T* w, const T* b, T* y, uint8_t* codes) {
  const int64_t in_img = cp.C * cp.H * cp.W;
  const int64_t mid_img = cp.O * cp.OH * cp.OW;
  const int64_t out_img = pp.C * pp.OH * pp.OW;
  if (cp.N == 0 || out_img == 0) return;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  if constexpr (std::is_same_v<T, float>) {
    if (conv1_pool_applies(cp, pp)) {
      conv1_relu_maxpool_forward(cp, pp, x, w, b, y, codes);
      return;
    }
  }
#endif
  if (!per_image(cp.N)) {
    Buffer<T> mid(cp.N * mid_img);
    conv2d_forward<T>(cp, x, w, b, mid.get());
    relu_inplace(mid.get(), cp.N * mid_img);
    max_pool2d_forward<T>(pp, mid.get(), y);
    if (codes) window_codes(pp, mid.get(), codes);
    return;
  }
  Conv2dParams c1 = cp;
  c1.N = 1;
  Pool2dParams p1 = pp;
  p1.N = 1;
  const bool exact = exact_2x2_pool(cp, pp);
  parallel_for(cp.N, 1, [&](int64_t n0, int64_t n1) {
    Scratch<T> mid(kSlotFusedMid, mid_img + kRowSlack);
    for (int64_t n = n0; n < n1; ++n) {
      uint8_t* cn = codes ? codes + n * out_img : nullptr;
      conv2d_forward<T>(c1, x + n * in_img, w, b, mid.get());
      if (!exact || !relu_maxpool2x2_forward(mid.get(), cp.O, pp.OH, pp.OW, y + n * out_img, cn)) {
        relu_inplace(mid.get(), mid_img);
        max_pool2d_forward<T>(p1, mid.get(), y + n * out_img);
        if (cn) window_codes(p1, mid.get(), cn);
      }
    }
  });
}

template <typename T>
void conv2d_relu_maxpool_backward(const Conv2dParams& cp, const Pool2dParams& pp, const T* gy,
                                  const T* x, const T* w, const T* b, const uint8_t* codes,
                                  T* gx, T* gw, T* gb) {
  const int64_t in_img = cp.C * cp.H * cp.W;
  const int64_t P = cp.OH * cp.OW;
  const int64_t mid_img = cp.O * P;
  const int64_t out_img = pp.C * pp.OH * pp.OW;
  const int64_t wsize = cp.O * (cp.C / cp.groups) * cp.KH * cp.KW;
  if (gw) std::fill(gw, gw + wsize, T(0));
  if (gb) std::fill(gb, gb + cp.O, T(0));
  if (cp.N == 0 || mid_img == 0 || out_img == 0) {
    if (gx) std::fill(gx, gx + cp.N * in_img, T(0));
    return;
  }
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  if constexpr (std::is_same_v<T, float>) {
    if (!gx && conv1_pool_applies(cp, pp)) {
      conv1_relu_maxpool_backward(cp, pp, gy, x, w, b, codes, gw, gb);
      return;
    }
  }
#endif
  if (!per_image(cp.N)) {
    Buffer<T> gmid(cp.N * mid_img);
    if (codes) {
      scatter_codes(pp, gy, codes, gmid.get());
    } else {
      Buffer<T> mid(cp.N * mid_img);
      conv2d_forward<T>(cp, x, w, b, mid.get());
      relu_inplace(mid.get(), cp.N * mid_img);
      max_pool2d_backward<T>(pp, gy, mid.get(), gmid.get());
      relu_backward_inplace(gmid.get(), mid.get(), cp.N * mid_img);
    }
    if (gx) conv2d_backward_input<T>(cp, gmid.get(), w, gx);
    if (gw) conv2d_backward_weight<T>(cp, gmid.get(), x, gw);
    if (gb) {
      for (int64_t n = 0; n < cp.N; ++n) add_channel_sums(gmid.get() + n * mid_img, cp.O, P, gb);
    }
    return;
  }
  Conv2dParams c1 = cp;
  c1.N = 1;
  Pool2dParams p1 = pp;
  p1.N = 1;
  // Weight and bias gradients, (wsize + O) per image range (image_ranges.h).
  const int64_t sums_len = wsize + cp.O;
  Buffer<T> sums(sums_len);
  sums.zero(sums_len);
  const bool exact = exact_2x2_pool(cp, pp);
  sum_over_image_ranges(kSlotFusedSums, cp.N, sums_len, sums.get(),
                        [&](int64_t n0, int64_t n1, T* acc_w) {
    Scratch<T> gmid(kSlotFusedGrad, mid_img + kRowSlack);
    Scratch<T> gw1(kSlotFusedW, wsize);
    T* acc_b = acc_w + wsize;
    T* gbn = gb ? acc_b : nullptr;
    for (int64_t n = n0; n < n1; ++n) {
      const T* xn = x + n * in_img;
      const T* gyn = gy + n * out_img;
      if (codes) {
        const uint8_t* cn = codes + n * out_img;
        if (!exact || !codes2x2_backward(cn, gyn, cp.O, pp.OH, pp.OW, gmid.get(), gbn)) {
          scatter_codes(p1, gyn, cn, gmid.get());
          if (gb) add_channel_sums(gmid.get(), cp.O, P, acc_b);
        }
      } else {
        Scratch<T> mid(kSlotFusedMid, mid_img + kRowSlack);
        conv2d_forward<T>(c1, xn, w, b, mid.get());
        if (!exact || !relu_maxpool2x2_backward(mid.get(), gyn, cp.O, pp.OH, pp.OW, gmid.get(),
                                                 gbn)) {
          relu_inplace(mid.get(), mid_img);
          max_pool2d_backward<T>(p1, gyn, mid.get(), gmid.get());
          relu_backward_inplace(gmid.get(), mid.get(), mid_img);
          if (gb) add_channel_sums(gmid.get(), cp.O, P, acc_b);
        }
      }
      if (gx) conv2d_backward_input<T>(c1, gmid.get(), w, gx + n * in_img);
      if (gw) {
        conv2d_backward_weight<T>(c1, gmid.get(), xn, gw1.get());
        for (int64_t i = 0; i < wsize; ++i) acc_w[i] += gw1.get()[i];
      }
    }
  });
  if (gw) std::copy(sums.get(), sums.get() + wsize, gw);
  if (gb) std::copy(sums.get() + wsize, sums.get() + sums_len, gb);
}

#define FASTNN_INSTANTIATE(T)                                                                  \
  template void conv2d_relu_maxpool_forward<T>(const Conv2dParams&, const Pool2dParams&,       \
                                               const T*, const T*, const T*, T*, uint8_t*);    \
  template void conv2d_relu_maxpool_backward<T>(const Conv2dParams&, const Pool2dParams&,      \
                                                const T*, const T*, const T*, const T*,        \
                                                const uint8_t*, T*, T*, T*);                   \
  template void batch_norm2d_relu_maxpool_forward<T>(const Pool2dParams&, const T*, const T*,  \
                                                     const T*, T*, T*, double, bool, T*,       \
                                                     uint8_t*);                                \
  template void batch_norm2d_relu_maxpool_backward<T>(const Pool2dParams&, const T*, const T*, \
                                                      const T*, const T*, const T*, const T*,  \
                                                      double, bool, const uint8_t*, T*, T*, T*);
FASTNN_INSTANTIATE(float)
FASTNN_INSTANTIATE(double)
#undef FASTNN_INSTANTIATE

}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
