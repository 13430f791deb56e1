// BatchNorm over (N, H, W) per channel of NCHW input, forward and backward.
//
// Layout: x, y, gy, gx are (N, C, HW) C-contiguous (HW = H * W); weight, bias,
// mean, var, gw, gb are (C,). Work is split over the N * C planes of HW
// contiguous elements. Per-channel statistics are summed in double: each plane
// by one thread, in a fixed order (kLanes interleaved accumulators, so the loop
// vectorizes without reassociating), then the planes of a channel in n order on
// the calling thread, so results do not depend on the thread count. The
// variance is exact two-pass per plane (a second pass around the plane's mean
// while it is in cache, no E[x^2] - E[x]^2 cancellation), the planes merged with
// Chan et al.'s formula, so the forward reads x from memory twice, not three
// times. The elementwise passes run in T as y = (x - mean) * scale + shift, the
// order fastnn.backends._array_ops uses.
//
// batch_norm2d_relu_* fuse the ReLU that follows: the forward writes
// max(y, 0) in the same pass (bit for bit relu(batch_norm2d(x))); the backward
// recomputes the forward's y from x and the stats to mask the incoming gradient,
// so neither the pre-ReLU output nor a mask is stored or read.
//
// The per-plane and per-channel steps live in kernels/batchnorm.h (namespace bn),
// shared with the fused BatchNorm + ReLU + max_pool2d of fused.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fastnn/parallel.h"
#include "kernels/batchnorm.h"
#include "kernels/ops.h"

namespace fastnn {
namespace FASTNN_ISA_NS {

namespace {

using bn::plane_grain;

// out = relu_backward(g, y) over one plane, y = (x - m) * s + t recomputed as the
// forward computed it (so the mask is the forward's bit for bit): g where y > 0,
// else +0. The mask goes through memory as all-ones/zero words ANDed with g's
// bits: as a select, GCC turns the load of g into a masked load that waits on
// the compare, which ran the backward at half speed.
template <typename T>
void relu_mask_plane(const T* __restrict g, const T* __restrict x, int64_t n, T m, T s, T t,
                     T* __restrict out) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr int64_t kChunk = 256;
  U mk[kChunk];
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t len = std::min(kChunk, n - i0);
    for (int64_t j = 0; j < len; ++j) mk[j] = U(0) - U((x[i0 + j] - m) * s + t > T(0));
    for (int64_t j = 0; j < len; ++j) {
      U bits;
      std::memcpy(&bits, g + i0 + j, sizeof(T));
      bits &= mk[j];
      std::memcpy(out + i0 + j, &bits, sizeof(T));
    }
  }
}

// out = (in - mu[c]) * a[c] + b[c] over every plane (Relu: then max(., 0), as the
// relu kernel writes it); or, with g, out = g * k[c] + (in - mu[c]) * a[c] + b[c],
// where with Relu g is first masked by relu_mask_plane with the forward's
// constants fs, ft (unused otherwise). Per-channel constants are in T.
template <bool Relu, typename T>
void affine_planes(int64_t N, int64_t C, int64_t HW, const T* __restrict in,
                   const T* __restrict g, const T* mu, const T* a, const T* b, const T* k,
                   const T* fs, const T* ft, T* __restrict out) {
  parallel_for(N * C, plane_grain(HW), [&](int64_t lo, int64_t hi) {
    Buffer<T> masked(Relu && g ? HW : 0);  // one plane of the masked gradient, in L1
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t c = p % C;
      const T* __restrict xp = in + p * HW;
      T* __restrict op = out + p * HW;
      if (g == nullptr) {
        bn::affine_plane<Relu>(xp, HW, mu[c], a[c], b[c], op);
      } else {
        const T* __restrict gp = g + p * HW;
        if (Relu) {
          relu_mask_plane(gp, xp, HW, mu[c], fs[c], ft[c], masked.get());
          gp = masked.get();
        }
        bn::grad_plane(gp, xp, HW, k[c], mu[c], a[c], b[c], op);
      }
    }
  });
}

template <bool Relu, typename T>
void forward_impl(int64_t N, int64_t C, int64_t HW, const T* x, const T* w, const T* b, T* mean,
                  T* var, double eps, bool training, T* y) {
  if (C == 0) return;
  Buffer<T> consts(2 * C);  // scale, shift
  bn::forward_setup(N, C, HW, x, w, b, mean, var, eps, training, consts.get());
  affine_planes<Relu, T>(N, C, HW, x, nullptr, mean, consts.get(), consts.get() + C, nullptr,
                         nullptr, nullptr, y);
}

// b is read only with Relu (to recompute the forward's mask).
template <bool Relu, typename T>
void backward_impl(int64_t N, int64_t C, int64_t HW, const T* gy, const T* x, const T* w,
                   const T* b, const T* mean, const T* var, double eps, bool training, T* gx,
                   T* gw, T* gb) {
  if (C == 0) return;
  const int64_t planes = N * C;
  Buffer<T> fwd(Relu ? 2 * C : 0);  // the forward's scale and shift, for the relu mask
  T* fs = fwd.get();
  T* ft = fwd.get() + (Relu ? C : 0);
  if (Relu) bn::forward_consts(C, w, b, var, eps, fs, ft);
  Buffer<double> part(2 * planes);
  double* pp = part.get();
  parallel_for(planes, plane_grain(HW), [&](int64_t lo, int64_t hi) {
    Buffer<T> masked(Relu ? HW : 0);  // one plane of the masked gradient, in L1
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t c = p % C;
      const T* g = gy + p * HW;
      if (Relu) {
        relu_mask_plane(g, x + p * HW, HW, mean[c], fs[c], ft[c], masked.get());
        g = masked.get();
      }
      bn::plane_grad_sums(g, x + p * HW, HW, static_cast<double>(mean[c]), pp[2 * p],
                          pp[2 * p + 1]);
    }
  });
  Buffer<T> consts(3 * C);  // k, a, d of bn::grad_plane
  T* k = consts.get();
  bn::grad_consts(N, C, HW, pp, w, var, eps, training, k, gw, gb);
  if (gx) affine_planes<Relu, T>(N, C, HW, x, gy, mean, k + C, k + 2 * C, k, fs, ft, gx);
}

}  // namespace

template <typename T>
void batch_norm2d_forward(int64_t N, int64_t C, int64_t HW, const T* x, const T* w, const T* b,
                          T* mean, T* var, double eps, bool training, T* y) {
  forward_impl<false>(N, C, HW, x, w, b, mean, var, eps, training, y);
}

template <typename T>
void batch_norm2d_backward(int64_t N, int64_t C, int64_t HW, const T* gy, const T* x,
                           const T* w, const T* mean, const T* var, double eps, bool training,
                           T* gx, T* gw, T* gb) {
  backward_impl<false>(N, C, HW, gy, x, w, static_cast<const T*>(nullptr), mean, var, eps,
                       training, gx, gw, gb);
}

template <typename T>
void batch_norm2d_relu_forward(int64_t N, int64_t C, int64_t HW, const T* x, const T* w,
                               const T* b, T* mean, T* var, double eps, bool training, T* y) {
  forward_impl<true>(N, C, HW, x, w, b, mean, var, eps, training, y);
}

template <typename T>
void batch_norm2d_relu_backward(int64_t N, int64_t C, int64_t HW, const T* gy, const T* x,
                                const T* w, const T* b, const T* mean, const T* var, double eps,
                                bool training, T* gx, T* gw, T* gb) {
  backward_impl<true>(N, C, HW, gy, x, w, b, mean, var, eps, training, gx, gw, gb);
}

#define FASTNN_INSTANTIATE(T)                                                                  \
  template void batch_norm2d_forward<T>(int64_t, int64_t, int64_t, const T*, const T*,         \
                                        const T*, T*, T*, double, bool, T*);                   \
  template void batch_norm2d_backward<T>(int64_t, int64_t, int64_t, const T*, const T*,        \
                                         const T*, const T*, const T*, double, bool, T*, T*, T*); \
  template void batch_norm2d_relu_forward<T>(int64_t, int64_t, int64_t, const T*, const T*,    \
                                             const T*, T*, T*, double, bool, T*);              \
  template void batch_norm2d_relu_backward<T>(int64_t, int64_t, int64_t, const T*, const T*,   \
                                              const T*, const T*, const T*, const T*, double,  \
                                              bool, T*, T*, T*);
FASTNN_INSTANTIATE(float)
FASTNN_INSTANTIATE(double)
#undef FASTNN_INSTANTIATE

}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
