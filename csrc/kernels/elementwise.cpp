// Elementwise kernels of the training loop: relu, bias add, softmax
// cross-entropy and the in-place optimizer steps.
//
// These are memory-bound one-pass loops written so GCC vectorizes them for the
// ISA this file is compiled for (branch-free selects, no aliasing between
// inputs and outputs except the documented in-place ones). The optimizer steps
// evaluate in T, in the same order as fastnn.backends.numpy_ref, so the two
// agree to rounding.
#include <cmath>
#include <limits>

#include "fastnn/parallel.h"
#include "kernels/ops.h"

namespace fastnn {
namespace FASTNN_ISA_NS {

namespace {
// Elements per chunk: below this, waking a second thread costs more than it saves.
constexpr int64_t kGrain = int64_t(1) << 15;
}  // namespace

template <typename T>
void relu(const T* __restrict x, T* __restrict y, int64_t n) {
  parallel_for(n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T v = x[i];
      y[i] = v < T(0) ? T(0) : v;  // NaN compares false, so it passes through
    }
  });
}

template <typename T>
void relu_backward(const T* __restrict gy, const T* __restrict y, T* __restrict gx, int64_t n) {
  parallel_for(n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      // Load gy unconditionally so the select vectorizes; `y > 0 ? gy[i] : 0`
      // reads gy only on one side and compiles to a branch that mispredicts.
      const T g = gy[i];
      gx[i] = y[i] > T(0) ? g : T(0);
    }
  });
}

template <typename T>
void bias_add(T* __restrict y, const T* __restrict bias, int64_t outer, int64_t C,
              int64_t inner) {
  const int64_t rows = outer * C;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1));
  parallel_for(rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T v = bias[r % C];
      T* row = y + r * inner;
      for (int64_t i = 0; i < inner; ++i) row[i] += v;
    }
  });
}

template <typename T>
void softmax_cross_entropy(const T* __restrict logits, const int64_t* __restrict labels,
                           int64_t N, int64_t K, T* loss, T* __restrict grad) {
  if (N == 0) {
    *loss = std::numeric_limits<T>::quiet_NaN();  // mean over an empty batch
    return;
  }
  // Per-row losses, summed afterwards in a fixed order so the result does not
  // depend on the thread count.
  Buffer<double> row_loss(N);
  const T inv_n = T(1) / static_cast<T>(N);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(K, 1));
  parallel_for(N, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* z = logits + i * K;
      T* g = grad + i * K;
      T m = z[0];
      for (int64_t k = 1; k < K; ++k) m = (z[k] > m || z[k] != z[k]) ? z[k] : m;
      // Subtracting the row max keeps exp() from overflowing.
      T s = 0;
      for (int64_t k = 0; k < K; ++k) {
        const T ek = std::exp(z[k] - m);
        g[k] = ek;
        s += ek;
      }
      const T log_s = std::log(s);
      const T inv_s = T(1) / s;
      for (int64_t k = 0; k < K; ++k) g[k] = g[k] * inv_s * inv_n;
      const int64_t y = labels[i];
      g[y] -= inv_n;
      row_loss.get()[i] = static_cast<double>(log_s - (z[y] - m));
    }
  });
  double total = 0;
  for (int64_t i = 0; i < N; ++i) total += row_loss.get()[i];
  *loss = static_cast<T>(total / static_cast<double>(N));
}

template <typename T>
void sgd_step(T* __restrict param, const T* __restrict grad, T* __restrict buf, int64_t n,
              double lr, double momentum, double weight_decay, bool nesterov) {
  const T lr_t = static_cast<T>(lr), mom = static_cast<T>(momentum);
  const T wd = static_cast<T>(weight_decay);
  const bool use_wd = weight_decay != 0, use_mom = momentum != 0;
  parallel_for(n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      T g = use_wd ? grad[i] + wd * param[i] : grad[i];
      if (use_mom) {
        const T v = buf[i] * mom + g;
        buf[i] = v;
        g = nesterov ? g + mom * v : v;
      }
      param[i] -= lr_t * g;
    }
  });
}

template <typename T>
void adam_step(T* __restrict param, const T* __restrict grad, T* __restrict exp_avg,
               T* __restrict exp_avg_sq, int64_t n, int64_t step, double lr, double beta1,
               double beta2, double eps, double weight_decay, bool decoupled) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  const T b1 = static_cast<T>(beta1), b2 = static_cast<T>(beta2);
  const T one_b1 = static_cast<T>(1.0 - beta1), one_b2 = static_cast<T>(1.0 - beta2);
  const T step_size = static_cast<T>(lr / bc1);
  const T bc2s = static_cast<T>(bc2_sqrt);
  const T eps_t = static_cast<T>(eps);
  const T wd = static_cast<T>(weight_decay);
  const T decay = static_cast<T>(1.0 - lr * weight_decay);
  const bool l2 = weight_decay != 0 && !decoupled;
  const bool shrink = weight_decay != 0 && decoupled;
  parallel_for(n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      T p = param[i];
      if (shrink) p *= decay;
      const T g = l2 ? grad[i] + wd * p : grad[i];
      const T m = exp_avg[i] * b1 + one_b1 * g;
      const T v = exp_avg_sq[i] * b2 + one_b2 * g * g;
      exp_avg[i] = m;
      exp_avg_sq[i] = v;
      const T denom = std::sqrt(v) / bc2s + eps_t;
      param[i] = p - step_size * m / denom;
    }
  });
}

#define FASTNN_INSTANTIATE(T)                                                                   \
  template void relu<T>(const T*, T*, int64_t);                                                 \
  template void relu_backward<T>(const T*, const T*, T*, int64_t);                              \
  template void bias_add<T>(T*, const T*, int64_t, int64_t, int64_t);                           \
  template void softmax_cross_entropy<T>(const T*, const int64_t*, int64_t, int64_t, T*, T*);   \
  template void sgd_step<T>(T*, const T*, T*, int64_t, double, double, double, bool);           \
  template void adam_step<T>(T*, const T*, T*, T*, int64_t, int64_t, double, double, double,    \
                             double, double, bool);
FASTNN_INSTANTIATE(float)
FASTNN_INSTANTIATE(double)
#undef FASTNN_INSTANTIATE

}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
