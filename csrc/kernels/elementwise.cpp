// Elementwise kernels of the training loop: relu, bias add, softmax
// cross-entropy, the in-place optimizer steps, and the data loader's batch
// (a row gather and a uint8 table lookup).
//
// These are memory-bound one-pass loops written so GCC vectorizes them for the
// ISA this file is compiled for (branch-free selects, no aliasing between
// inputs and outputs except the documented in-place ones). The optimizer steps
// evaluate in T, in the same order as fastnn.backends.numpy_ref, so the two
// agree to rounding.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "fastnn/parallel.h"
#include "kernels/ops.h"

namespace fastnn {
namespace FASTNN_ISA_NS {

namespace {
// Elements per chunk: below this, waking a second thread costs more than it saves.
constexpr int64_t kGrain = int64_t(1) << 15;

// Optimizer state (momentum, Adam's moments) below the smallest normal number
// is stored as 0. Where a gradient stays 0 (a dead unit) the state decays
// geometrically through the subnormal range, and on x86 every arithmetic op
// on a subnormal can take a microcode assist: with a quarter of the seed
// model's Adam state subnormal after two epochs, the step ran 10x slower and
// epochs grew longer as training went on. A subnormal moment moves no
// parameter anyway (Adam divides it by sqrt(v) + eps, eps >> 1e-38).
template <typename T>
inline T flush_subnormal(T x) {
  return std::abs(x) < std::numeric_limits<T>::min() ? T(0) : x;
}
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
  // One loop per variant (compile-time flags) with the constants in locals: run-time
  // branches or captured references inside the loop keep GCC from vectorizing it.
  auto run = [&](auto wd_tag, auto mom_tag, auto nest_tag) {
    constexpr bool kWd = decltype(wd_tag)::value, kMom = decltype(mom_tag)::value;
    constexpr bool kNest = decltype(nest_tag)::value;
    parallel_for(n, kGrain, [&](int64_t b, int64_t e) {
      T* __restrict pp = param;
      const T* __restrict gp = grad;
      T* __restrict bp = buf;
      const T c_lr = lr_t, c_mom = mom, c_wd = wd;
      for (int64_t i = b; i < e; ++i) {
        T g = kWd ? gp[i] + c_wd * pp[i] : gp[i];
        if (kMom) {
          const T v = flush_subnormal(bp[i] * c_mom + g);
          bp[i] = v;
          g = kNest ? g + c_mom * v : v;
        }
        pp[i] -= c_lr * g;
      }
    });
  };
  using t = std::true_type;
  using f = std::false_type;
  const bool use_wd = weight_decay != 0, use_mom = momentum != 0;
  if (!use_mom) {
    use_wd ? run(t{}, f{}, f{}) : run(f{}, f{}, f{});
  } else if (nesterov) {
    use_wd ? run(t{}, t{}, t{}) : run(f{}, t{}, t{});
  } else {
    use_wd ? run(t{}, t{}, f{}) : run(f{}, t{}, f{});
  }
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
  // sqrt(v) * (1 / sqrt(bc2)) rather than sqrt(v) / sqrt(bc2): the step is bound by
  // the divider (vsqrtps and vdivps share it), and this keeps one sqrt and one
  // division per element. Never overflows where the division would not.
  const T inv_bc2s = static_cast<T>(1.0 / bc2_sqrt);
  const T eps_t = static_cast<T>(eps);
  const T wd = static_cast<T>(weight_decay);
  const T decay = static_cast<T>(1.0 - lr * weight_decay);
  const bool l2 = weight_decay != 0 && !decoupled;
  const bool shrink = weight_decay != 0 && decoupled;
  // The weight-decay variants are separate loops (compile-time flags): with the
  // run-time branches inside, GCC does not vectorize the loop at all (~10x slower).
  auto run = [&](auto l2_tag, auto shrink_tag) {
    constexpr bool kL2 = decltype(l2_tag)::value, kShrink = decltype(shrink_tag)::value;
    parallel_for(n, kGrain, [&](int64_t b, int64_t e) {
      T* __restrict pp = param;
      const T* __restrict gp = grad;
      T* __restrict mp = exp_avg;
      T* __restrict vp = exp_avg_sq;
      // Locals, not captured references: loads through the closure could alias the
      // stores as far as GCC knows, which also blocks vectorization.
      const T c_b1 = b1, c_b2 = b2, c_one_b1 = one_b1, c_one_b2 = one_b2, c_inv = inv_bc2s;
      const T c_eps = eps_t, c_step = step_size, c_wd = wd, c_decay = decay;
      for (int64_t i = b; i < e; ++i) {
        T p = pp[i];
        if (kShrink) p *= c_decay;
        const T g = kL2 ? gp[i] + c_wd * p : gp[i];
        const T m = flush_subnormal(mp[i] * c_b1 + c_one_b1 * g);
        const T v = flush_subnormal(vp[i] * c_b2 + c_one_b2 * g * g);
        mp[i] = m;
        vp[i] = v;
        const T denom = std::sqrt(v) * c_inv + c_eps;
        pp[i] = p - c_step * m / denom;
      }
    });
  };
  using t = std::true_type;
  using f = std::false_type;
  if (l2) {
    run(t{}, f{});
  } else if (shrink) {
    run(f{}, t{});
  } else {
    run(f{}, f{});
  }
}

// out (B, row_len) = table[images[rows[b]]] (rows null: row b), images (n,
// row_len) uint8, table (256,). One pass over the batch instead of NumPy's
// gather, then take (which casts every pixel to an intp index first): 4-8x
// faster, and the lookup is exact, so the values are NumPy's bit for bit.
template <typename T>
void lookup_u8(const uint8_t* __restrict images, int64_t row_len, const int64_t* rows, int64_t B,
               const T* __restrict table, T* __restrict out) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(row_len, 1));
  parallel_for(B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      // Shuffled rows are scattered over the dataset, beyond the hardware
      // prefetchers: fetch the row after next while this one is looked up.
      if (rows != nullptr && b + 2 < b1) {
        const char* ahead = reinterpret_cast<const char*>(images + rows[b + 2] * row_len);
        for (int64_t off = 0; off < row_len; off += 64) __builtin_prefetch(ahead + off, 0, 0);
      }
      const uint8_t* __restrict src = images + (rows ? rows[b] : b) * row_len;
      T* __restrict dst = out + b * row_len;
      for (int64_t i = 0; i < row_len; ++i) dst[i] = table[src[i]];
    }
  });
}

#define FASTNN_INSTANTIATE(T)                                                                   \
  template void lookup_u8<T>(const uint8_t*, int64_t, const int64_t*, int64_t, const T*, T*);   \
  template void relu<T>(const T*, T*, int64_t);                                                 \
  template void relu_backward<T>(const T*, const T*, T*, int64_t);                              \
  template void softmax_cross_entropy<T>(const T*, const int64_t*, int64_t, int64_t, T*, T*);   \
  template void sgd_step<T>(T*, const T*, T*, int64_t, double, double, double, bool);           \
  template void adam_step<T>(T*, const T*, T*, T*, int64_t, int64_t, double, double, double,    \
                             double, double, bool);
FASTNN_INSTANTIATE(float)
FASTNN_INSTANTIATE(double)
#undef FASTNN_INSTANTIATE

}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
