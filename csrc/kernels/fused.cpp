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
  parallel_for(cp.N, 1, [&](int64_t n0, int64_t n1) {
    Scratch<T> mid(kSlotFusedMid, mid_img);
    for (int64_t n = n0; n < n1; ++n) {
      conv2d_forward<T>(c1, x + n * in_img, w, b, mid.get());
      relu_inplace(mid.get(), mid_img);
      max_pool2d_forward<T>(p1, mid.get(), y + n * out_img);
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
  // Contiguous image ranges, one per chunk, each summing its own weight and
  // bias gradients; the partials are added in chunk order at the end.
  const int64_t chunks = std::min<int64_t>(cp.N, get_num_threads());
  const int64_t acc_len = wsize + cp.O;
  Buffer<T> acc(chunks * acc_len);
  acc.zero(chunks * acc_len);
  parallel_for(chunks, 1, [&](int64_t c0, int64_t c1_) {
    Scratch<T> mid(kSlotFusedMid, mid_img);
    Scratch<T> gmid(kSlotFusedGrad, mid_img);
    Scratch<T> gw1(kSlotFusedW, wsize);
    for (int64_t c = c0; c < c1_; ++c) {
      T* acc_w = acc.get() + c * acc_len;
      T* acc_b = acc_w + wsize;
      const int64_t n0 = cp.N * c / chunks, n1 = cp.N * (c + 1) / chunks;
      for (int64_t n = n0; n < n1; ++n) {
        const T* xn = x + n * in_img;
        conv2d_forward<T>(c1, xn, w, b, mid.get());
        relu_inplace(mid.get(), mid_img);
        max_pool2d_backward<T>(p1, gy + n * out_img, mid.get(), gmid.get());
        relu_backward_inplace(gmid.get(), mid.get(), mid_img);
        if (gx) conv2d_backward_input<T>(c1, gmid.get(), w, gx + n * in_img);
        if (gw) {
          conv2d_backward_weight<T>(c1, gmid.get(), xn, gw1.get());
          for (int64_t i = 0; i < wsize; ++i) acc_w[i] += gw1.get()[i];
        }
        if (gb) add_channel_sums(gmid.get(), cp.O, P, acc_b);
      }
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    const T* acc_w = acc.get() + c * acc_len;
    if (gw) {
      for (int64_t i = 0; i < wsize; ++i) gw[i] += acc_w[i];
    }
    if (gb) {
      for (int64_t o = 0; o < cp.O; ++o) gb[o] += acc_w[wsize + o];
    }
  }
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
