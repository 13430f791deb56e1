// Fused conv2d + bias + ReLU + max_pool2d, forward and backward, for one ISA build.
//
// The unfused layer writes and re-reads the conv output several times (conv,
// relu, pool; then pool backward, relu backward, conv backward), each a pass
// over an activation that is 4x the pooled output and does not fit in cache
// (128 x 32 x 26 x 26 float32 = 11 MB for MNIST). Here each thread takes whole
// images and keeps one image's conv output in a per-thread scratch buffer that
// stays in L2: forward runs conv -> relu -> pool on it and writes only the
// pooled output; backward recomputes the image's conv output (cheaper than
// storing and re-reading it), runs pool backward and relu backward on it in
// cache and feeds the result straight to the conv backward kernels.
//
// The per-image steps call the same kernels as the unfused path (nested
// parallel_for calls run serially on the worker), so the forward output is
// bit-identical to max_pool2d(relu(conv2d(x))) and the gradients differ from
// the unfused ones only in the order the per-image weight/bias sums are added.
#include <algorithm>

#include "fastnn/parallel.h"
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

// Whether the pool is the 2x2 stride-2 unpadded one and tiles the conv output
// exactly (no leftover row or column).
inline bool exact_2x2_pool(const Conv2dParams& cp, const Pool2dParams& pp) {
  return is_2x2_s2(pp) && cp.OH == 2 * pp.OH && cp.OW == 2 * pp.OW;
}

// y (C, OH, OW) = max_pool2d(relu(m), 2x2, stride 2) of the conv output m
// (C, 2*OH, 2*OW), bit for bit the relu and max_pool2d passes (the same
// selects and max operations on the same values, in the same order) in one
// pass whose loads are whole vectors. Returns false, doing nothing, unless
// this is a float AVX-512 build and a pooled row fits one vector (OW <= 16).
// m needs kRowSlack floats past C*H*W (loads run past a row's end).
template <typename T>
bool relu_maxpool2x2_forward(const T*, int64_t, int64_t, int64_t, T*) {
  return false;
}
#if defined(__AVX512F__) && defined(__AVX512DQ__)
template <>
bool relu_maxpool2x2_forward<float>(const float* __restrict m, int64_t C, int64_t OH, int64_t OW,
                                    float* __restrict y) {
  using V = simd::Vec<float>;
  using R = V::reg;
  if (OW > V::L) return false;
  const int64_t W = 2 * OW;
  const R zero = V::zero();
  auto relu = [&](R v) { return V::select(V::gt(zero, v), zero, v); };  // as relu_inplace
  for (int64_t row = 0; row < C * OH; ++row) {
    const float* r0 = m + row * 2 * W;
    R e, o;
    V::deinterleave(simd::max_nan<float>(relu(V::loadu(r0)), relu(V::loadu(r0 + W))),
                    simd::max_nan<float>(relu(V::loadu(r0 + V::L)), relu(V::loadu(r0 + W + V::L))),
                    e, o);
    V::storep(y + row * OW, simd::max_nan<float>(e, o), OW);
  }
  return true;
}
#endif

// gm (C, 2*OH, 2*OW) = the gradient at the conv output m (same shape) of
// max_pool2d(relu(m), 2x2, stride 2), from g (C, OH, OW); gb[c] += the sum of
// channel c's gradient when gb is given. Returns false, doing nothing, unless
// this is a float AVX-512 build and a pooled row fits one vector (OW <= 16).
//
// One pass instead of relu, max_pool2d_backward and relu_backward: a window's
// gradient goes to its first maximum, and only if that maximum is > 0. relu
// keeps values > 0 and their order, so wherever relu passes a gradient the
// first maximum of relu(m) is the first maximum of m; a window holding a NaN
// gets none (pool backward picks the NaN, whose relu is not > 0). So plain
// ordered compares find the winner, and one unordered test zeroes NaN windows
// -- 6 compares instead of 10 and 8 mask ops; with in-lane shuffles for the
// even/odd split (the pooled gradient permuted once into their lane order)
// instead of 8 two-source permutes, a row pair takes 24 cycles instead of 33.
// Each row pair is loaded and stored as whole vectors: a row's store runs
// past its end into the next row, which a later store (rows go in address
// order) overwrites. m and gm need kRowSlack floats past C*H*W.
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
  const __m512 zero = _mm512_setzero_ps();
  const int64_t W = 2 * OW;
  // Window j of a row pair is in lane j of the pooled gradient; the shuffles
  // below put windows 0 1 8 9 2 3 10 11 .. in lanes 0..15.
  const __m512i order = _mm512_setr_epi32(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
  const __mmask16 cols = static_cast<__mmask16>((1u << OW) - 1u);
  for (int64_t ch = 0; ch < C; ++ch) {
    __m512 sum = zero;
    for (int64_t oh = 0; oh < OH; ++oh) {
      const float* r0 = m + (ch * OH + oh) * 2 * W;
      float* g0 = gm + (ch * OH + oh) * 2 * W;
      const __m512 l0 = _mm512_loadu_ps(r0), h0 = _mm512_loadu_ps(r0 + 16);
      const __m512 l1 = _mm512_loadu_ps(r0 + W), h1 = _mm512_loadu_ps(r0 + W + 16);
      // Window taps a b / c d, each window in the same lane of all four.
      const __m512 a = _mm512_shuffle_ps(l0, h0, 0x88), b = _mm512_shuffle_ps(l0, h0, 0xdd);
      const __m512 c = _mm512_shuffle_ps(l1, h1, 0x88), d = _mm512_shuffle_ps(l1, h1, 0xdd);
      const __mmask16 nan = _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q) |
                            _mm512_cmp_ps_mask(c, d, _CMP_UNORD_Q);
      const __mmask16 ub = _mm512_cmp_ps_mask(b, a, _CMP_GT_OQ);
      __m512 mx = _mm512_mask_blend_ps(ub, a, b);
      const __mmask16 uc = _mm512_cmp_ps_mask(c, mx, _CMP_GT_OQ);
      mx = _mm512_mask_blend_ps(uc, mx, c);
      const __mmask16 ud = _mm512_cmp_ps_mask(d, mx, _CMP_GT_OQ);
      mx = _mm512_mask_blend_ps(ud, mx, d);
      const __mmask16 live = _mm512_cmp_ps_mask(mx, zero, _CMP_GT_OQ) & ~nan;
      // Lanes past OW load 0, so they add nothing to the sum.
      const __m512 gr = _mm512_maskz_mov_ps(
          live, _mm512_permutexvar_ps(order, _mm512_maskz_loadu_ps(cols, g + (ch * OH + oh) * OW)));
      sum = _mm512_add_ps(sum, gr);
      const __m512 gd = _mm512_maskz_mov_ps(ud, gr);
      const __m512 gc = _mm512_maskz_mov_ps(uc & ~ud, gr);
      const __m512 gb_ = _mm512_maskz_mov_ps(ub & ~uc & ~ud, gr);
      const __m512 ga = _mm512_maskz_mov_ps(~ub & ~uc & ~ud, gr);
      _mm512_storeu_ps(g0, _mm512_unpacklo_ps(ga, gb_));
      _mm512_storeu_ps(g0 + 16, _mm512_unpackhi_ps(ga, gb_));
      _mm512_storeu_ps(g0 + W, _mm512_unpacklo_ps(gc, gd));
      _mm512_storeu_ps(g0 + W + 16, _mm512_unpackhi_ps(gc, gd));
    }
    if (gb) gb[ch] += _mm512_reduce_add_ps(sum);
  }
  return true;
}
#endif

// Below this many images per thread the per-image split leaves threads idle;
// the batch-level kernels (which split rows/planes) are used instead.
inline bool per_image(int64_t N) { return N >= 2 * static_cast<int64_t>(get_num_threads()); }

}  // namespace

template <typename T>
void conv2d_relu_maxpool_forward(const Conv2dParams& cp, const Pool2dParams& pp, const T* x,
                                 const T* w, const T* b, T* y) {
  const int64_t in_img = cp.C * cp.H * cp.W;
  const int64_t mid_img = cp.O * cp.OH * cp.OW;
  const int64_t out_img = pp.C * pp.OH * pp.OW;
  if (cp.N == 0 || out_img == 0) return;
  if (!per_image(cp.N)) {
    Buffer<T> mid(cp.N * mid_img);
    conv2d_forward<T>(cp, x, w, b, mid.get());
    relu_inplace(mid.get(), cp.N * mid_img);
    max_pool2d_forward<T>(pp, mid.get(), y);
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
      conv2d_forward<T>(c1, x + n * in_img, w, b, mid.get());
      if (!exact || !relu_maxpool2x2_forward(mid.get(), cp.O, pp.OH, pp.OW, y + n * out_img)) {
        relu_inplace(mid.get(), mid_img);
        max_pool2d_forward<T>(p1, mid.get(), y + n * out_img);
      }
    }
  });
}

template <typename T>
void conv2d_relu_maxpool_backward(const Conv2dParams& cp, const Pool2dParams& pp, const T* gy,
                                  const T* x, const T* w, const T* b, T* gx, T* gw, T* gb) {
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
  if (!per_image(cp.N)) {
    Buffer<T> mid(cp.N * mid_img), gmid(cp.N * mid_img);
    conv2d_forward<T>(cp, x, w, b, mid.get());
    relu_inplace(mid.get(), cp.N * mid_img);
    max_pool2d_backward<T>(pp, gy, mid.get(), gmid.get());
    relu_backward_inplace(gmid.get(), mid.get(), cp.N * mid_img);
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
    Scratch<T> mid(kSlotFusedMid, mid_img + kRowSlack);
    Scratch<T> gmid(kSlotFusedGrad, mid_img + kRowSlack);
    Scratch<T> gw1(kSlotFusedW, wsize);
    T* acc_b = acc_w + wsize;
    for (int64_t n = n0; n < n1; ++n) {
      const T* xn = x + n * in_img;
      conv2d_forward<T>(c1, xn, w, b, mid.get());
      if (!exact || !relu_maxpool2x2_backward(mid.get(), gy + n * out_img, cp.O, pp.OH, pp.OW,
                                               gmid.get(), gb ? acc_b : nullptr)) {
        relu_inplace(mid.get(), mid_img);
        max_pool2d_backward<T>(p1, gy + n * out_img, mid.get(), gmid.get());
        relu_backward_inplace(gmid.get(), mid.get(), mid_img);
        if (gb) add_channel_sums(gmid.get(), cp.O, P, acc_b);
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
                                               const T*, const T*, const T*, T*);              \
  template void conv2d_relu_maxpool_backward<T>(const Conv2dParams&, const Pool2dParams&,      \
                                                const T*, const T*, const T*, const T*, T*, T*, \
                                                T*);
FASTNN_INSTANTIATE(float)
FASTNN_INSTANTIATE(double)
#undef FASTNN_INSTANTIATE

}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
