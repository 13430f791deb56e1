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
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fastnn/parallel.h"
#include "kernels/ops.h"

namespace fastnn {
namespace FASTNN_ISA_NS {

namespace {

// Elements per chunk: below this, waking a second thread costs more than it saves.
constexpr int64_t kGrain = int64_t(1) << 15;
// Independent double accumulators per plane: two AVX-512 (four AVX2) registers,
// enough to hide the add latency.
constexpr int kLanes = 16;

int64_t plane_grain(int64_t hw) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(hw, 1)); }

double combine(const double* acc, double tail) {
  double s = 0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s + tail;
}

// sum(p[i] - shift) over one plane, in double.
template <typename T>
double plane_sum(const T* __restrict p, int64_t n, double shift) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(p[i + j]) - shift;
  }
  double tail = 0;
  for (; i < n; ++i) tail += static_cast<double>(p[i]) - shift;
  return combine(acc, tail);
}

// sum((p[i] - mean)^2) over one plane, in double.
template <typename T>
double plane_sqdev(const T* __restrict p, int64_t n, double mean) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const double d = static_cast<double>(p[i + j]) - mean;
      acc[j] += d * d;
    }
  }
  double tail = 0;
  for (; i < n; ++i) {
    const double d = static_cast<double>(p[i]) - mean;
    tail += d * d;
  }
  return combine(acc, tail);
}

// Per-channel sums of per-plane partials part[n * C + c] (stride `stride`
// doubles per plane, offset `k`), in n order.
void channel_sums(const double* part, int64_t N, int64_t C, int stride, int k, double* out) {
  for (int64_t c = 0; c < C; ++c) out[c] = 0;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) out[c] += part[(n * C + c) * stride + k];
  }
}

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
      const T m = mu[c], s = a[c], t = b[c];
      const T* __restrict xp = in + p * HW;
      T* __restrict op = out + p * HW;
      if (g == nullptr) {
        for (int64_t i = 0; i < HW; ++i) {
          const T v = (xp[i] - m) * s + t;
          op[i] = Relu && v < T(0) ? T(0) : v;  // NaN compares false and passes through
        }
      } else {
        const T kc = k[c];
        const T* __restrict gp = g + p * HW;
        if (Relu) {
          relu_mask_plane(gp, xp, HW, m, fs[c], ft[c], masked.get());
          gp = masked.get();
        }
        for (int64_t i = 0; i < HW; ++i) op[i] = gp[i] * kc + (xp[i] - m) * s + t;
      }
    }
  });
}

// The forward's elementwise constants: y = (x - mean) * scale + shift, in T.
template <typename T>
void forward_consts(int64_t C, const T* w, const T* b, const T* var, double eps, T* scale,
                    T* shift) {
  for (int64_t c = 0; c < C; ++c) {
    const double is = 1.0 / std::sqrt(static_cast<double>(var[c]) + eps);
    scale[c] = static_cast<T>(w ? is * static_cast<double>(w[c]) : is);
    shift[c] = b ? b[c] : T(0);
  }
}

// (sum(g), sum(g * (x - mean))) over one plane, in double.
template <typename T>
void plane_grad_sums(const T* __restrict g, const T* __restrict x, int64_t n, double mean,
                     double& sum_g, double& sum_gx) {
  double ag[kLanes] = {}, agx[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const double gj = static_cast<double>(g[i + j]);
      ag[j] += gj;
      agx[j] += gj * (static_cast<double>(x[i + j]) - mean);
    }
  }
  double tg = 0, tgx = 0;
  for (; i < n; ++i) {
    const double gi = static_cast<double>(g[i]);
    tg += gi;
    tgx += gi * (static_cast<double>(x[i]) - mean);
  }
  sum_g = combine(ag, tg);
  sum_gx = combine(agx, tgx);
}

template <bool Relu, typename T>
void forward_impl(int64_t N, int64_t C, int64_t HW, const T* x, const T* w, const T* b, T* mean,
                  T* var, double eps, bool training, T* y) {
  if (C == 0) return;
  const int64_t planes = N * C;
  Buffer<double> stats(2 * C);  // per channel: mean, sum of squared deviations
  double* mean_d = stats.get();
  double* m2 = stats.get() + C;
  if (training) {
    // One pass over memory: each plane's mean and sum of squared deviations from
    // it (a two-pass while the plane is in cache), then the planes of a channel
    // are merged exactly: M2 = sum(M2_p) + sum(HW * (mean_p - mean)^2).
    const double m = static_cast<double>(N * HW);
    Buffer<double> part(2 * planes);
    double* pp = part.get();
    parallel_for(planes, plane_grain(HW), [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const T* xp = x + p * HW;
        const double mp = plane_sum(xp, HW, 0.0) / static_cast<double>(HW);
        pp[2 * p] = mp;
        pp[2 * p + 1] = plane_sqdev(xp, HW, mp);
      }
    });
    channel_sums(pp, N, C, 2, 0, mean_d);
    for (int64_t c = 0; c < C; ++c) mean_d[c] /= static_cast<double>(N);
    channel_sums(pp, N, C, 2, 1, m2);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const double d = pp[2 * (n * C + c)] - mean_d[c];
        m2[c] += static_cast<double>(HW) * d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = static_cast<T>(mean_d[c]);
      var[c] = static_cast<T>(m2[c] / m);
    }
  }
  // The elementwise pass uses the stats as stored (T), like the eval path and the
  // reference, so training and eval on the same stats give the same y.
  Buffer<T> consts(2 * C);
  T* scale = consts.get();
  T* shift = consts.get() + C;
  forward_consts(C, w, b, var, eps, scale, shift);
  affine_planes<Relu, T>(N, C, HW, x, nullptr, mean, scale, shift, nullptr, nullptr, nullptr,
                         y);
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
  if (Relu) forward_consts(C, w, b, var, eps, fs, ft);
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
      plane_grad_sums(g, x + p * HW, HW, static_cast<double>(mean[c]), pp[2 * p], pp[2 * p + 1]);
    }
  });
  Buffer<double> sums(2 * C);
  double* sum_g = sums.get();
  double* sum_gx = sums.get() + C;  // sum(g * (x - mean)); times invstd: sum(g * xhat)
  channel_sums(pp, N, C, 2, 0, sum_g);
  channel_sums(pp, N, C, 2, 1, sum_gx);
  Buffer<T> consts(3 * C);
  T* k = consts.get();
  T* a = consts.get() + C;
  T* d = consts.get() + 2 * C;
  const double m = static_cast<double>(N * HW);
  for (int64_t c = 0; c < C; ++c) {
    const double is = 1.0 / std::sqrt(static_cast<double>(var[c]) + eps);
    const double gwc = sum_gx[c] * is;
    if (gw) gw[c] = static_cast<T>(gwc);
    if (gb) gb[c] = static_cast<T>(sum_g[c]);
    // gx = k * (g - [sum_g + xhat * sum(g * xhat)] / m) with k = w * invstd and
    // xhat = (x - mean) * invstd: the batch-stat terms are affine in x.
    const double kc = w ? is * static_cast<double>(w[c]) : is;
    k[c] = static_cast<T>(kc);
    a[c] = static_cast<T>(training && m > 0 ? -kc * is * gwc / m : 0.0);
    d[c] = static_cast<T>(training && m > 0 ? -kc * sum_g[c] / m : 0.0);
  }
  if (gx) affine_planes<Relu, T>(N, C, HW, x, gy, mean, a, d, k, fs, ft, gx);
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
