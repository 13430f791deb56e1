// BatchNorm's per-plane and per-channel steps (csrc/kernels/batchnorm.cpp), shared
// with the fused BatchNorm + ReLU + max_pool2d of csrc/kernels/fused.cpp so that
// both compute the statistics, the elementwise passes and the gradient
// constants the same way, bit for bit. Layout as in batchnorm.cpp: N * C planes
// of HW contiguous elements; statistics and gradient sums in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "fastnn/parallel.h"
#include "kernels/ops.h"

#ifndef FASTNN_ISA_NS
#error "FASTNN_ISA_NS must be defined (isa_baseline, isa_avx2 or isa_avx512)"
#endif

namespace fastnn {
namespace FASTNN_ISA_NS {
namespace bn {

// Elements per chunk: below this, waking a second thread costs more than it saves.
constexpr int64_t kGrain = int64_t(1) << 15;
// Independent double accumulators per plane: two AVX-512 (four AVX2) registers,
// enough to hide the add latency.
constexpr int kLanes = 16;

inline int64_t plane_grain(int64_t hw) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(hw, 1));
}

inline double combine(const double* acc, double tail) {
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
inline void channel_sums(const double* part, int64_t N, int64_t C, int stride, int k,
                         double* out) {
  for (int64_t c = 0; c < C; ++c) out[c] = 0;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) out[c] += part[(n * C + c) * stride + k];
  }
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

// The training statistics: mean and biased variance (C,) of x over (N, HW),
// stored in T. One pass over memory: each plane's mean and sum of squared
// deviations from it (a two-pass while the plane is in cache), then the planes
// of a channel are merged exactly, in n order (so the result does not depend
// on the thread count): M2 = sum(M2_p) + sum(HW * (mean_p - mean)^2).
template <typename T>
void batch_stats(int64_t N, int64_t C, int64_t HW, const T* x, T* mean, T* var) {
  const int64_t planes = N * C;
  Buffer<double> stats(2 * C);  // per channel: mean, sum of squared deviations
  double* mean_d = stats.get();
  double* m2 = stats.get() + C;
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

// The forward's setup: the statistics when training (else mean/var are the
// given ones), then the elementwise constants scale_shift (2 * C: scale, then
// shift) from the stats as stored (T), like the eval path and the reference, so
// training and eval on the same stats give the same y.
template <typename T>
void forward_setup(int64_t N, int64_t C, int64_t HW, const T* x, const T* w, const T* b,
                   T* mean, T* var, double eps, bool training, T* scale_shift) {
  if (training) batch_stats(N, C, HW, x, mean, var);
  forward_consts(C, w, b, var, eps, scale_shift, scale_shift + C);
}

// out = (x - m) * s + t over one plane (Relu: then max(., 0), as the relu
// kernel writes it: NaN compares false and passes through).
template <bool Relu, typename T>
inline void affine_plane(const T* __restrict x, int64_t n, T m, T s, T t, T* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = (x[i] - m) * s + t;
    out[i] = Relu && v < T(0) ? T(0) : v;
  }
}

// out = g * k + (x - m) * a + d over one plane: grad_x from the plane's gradient
// g and the constants of grad_consts.
template <typename T>
inline void grad_plane(const T* __restrict g, const T* __restrict x, int64_t n, T k, T m, T a,
                       T d, T* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] * k + (x[i] - m) * a + d;
}

// From the per-plane gradient sums part[2p] = sum(g), part[2p + 1] =
// sum(g * (x - mean)) of plane p = n * C + c (plane_grad_sums), merged per
// channel in n order: gw, gb (each may be null) and, in kad (3 * C), the
// constants k, a, d of grad_plane, in T. gx = k * (g - [sum_g + xhat *
// sum(g * xhat)] / m) with k = w * invstd and xhat = (x - mean) * invstd: the
// batch-stat terms (training only) are affine in x, so gx = g * k + (x - mean)
// * a + d.
template <typename T>
void grad_consts(int64_t N, int64_t C, int64_t HW, const double* part, const T* w, const T* var,
                 double eps, bool training, T* kad, T* gw, T* gb) {
  Buffer<double> sums(2 * C);
  double* sum_g = sums.get();
  double* sum_gx = sums.get() + C;  // sum(g * (x - mean)); times invstd: sum(g * xhat)
  channel_sums(part, N, C, 2, 0, sum_g);
  channel_sums(part, N, C, 2, 1, sum_gx);
  const double m = static_cast<double>(N * HW);
  for (int64_t c = 0; c < C; ++c) {
    const double is = 1.0 / std::sqrt(static_cast<double>(var[c]) + eps);
    const double gwc = sum_gx[c] * is;
    if (gw) gw[c] = static_cast<T>(gwc);
    if (gb) gb[c] = static_cast<T>(sum_g[c]);
    const double kc = w ? is * static_cast<double>(w[c]) : is;
    kad[c] = static_cast<T>(kc);
    kad[C + c] = static_cast<T>(training && m > 0 ? -kc * is * gwc / m : 0.0);
    kad[2 * C + c] = static_cast<T>(training && m > 0 ? -kc * sum_g[c] / m : 0.0);
  }
}

}  // namespace bn
}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
