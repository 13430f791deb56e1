// Fused Linear + ReLU (forward and backward) on the ISA's gemm.
//
// Forward: y = relu(x @ w^T + b) is one gemm whose epilogue adds the bias and
// clamps as each tile of y is finished (gemm_bias_relu), so y is written once
// and never re-read by separate bias and ReLU passes.
// Backward: the ReLU mask (gy where y > 0) and the bias gradient (its column
// sums) come out of one pass over gy and y; the two gradient products then
// read the masked gradient. Unfused, the mask and the bias sum are two passes.
#include "kernels/ops.h"

#include "fastnn/parallel.h"

namespace fastnn {
namespace FASTNN_ISA_NS {

template <typename T>
void linear_relu_forward(int64_t M, int64_t N, int64_t K, const T* x, const T* w, const T* b,
                         T* y) {
  gemm_bias_relu<T>(false, true, M, N, K, x, K, w, K, y, N, false, b, true);
}

template <typename T>
void linear_relu_backward(int64_t M, int64_t N, int64_t K, const T* gy, const T* x, const T* w,
                          const T* y, T* gx, T* gw, T* gb) {
  const bool products = gx != nullptr || gw != nullptr;
  Buffer<T> gz_buf(products ? M * N : 1);
  T* __restrict gz = gz_buf.get();
  // Columns are split across threads and each column is summed over the rows
  // in order by one thread, so gb does not depend on the thread count.
  parallel_for(N, 256, [&](int64_t j0, int64_t j1) {
    if (gb != nullptr) {
      for (int64_t j = j0; j < j1; ++j) gb[j] = T(0);
    }
    for (int64_t i = 0; i < M; ++i) {
      const T* __restrict gyr = gy + i * N;
      const T* __restrict yr = y + i * N;
      T* __restrict gzr = gz + i * N;
      for (int64_t j = j0; j < j1; ++j) {
        const T g = gyr[j];  // loaded unconditionally so the select vectorizes
        const T v = yr[j] > T(0) ? g : T(0);
        if (products) gzr[j] = v;
        if (gb != nullptr) gb[j] += v;
      }
    }
  });
  if (gx != nullptr) gemm<T>(false, false, M, K, N, gz, N, w, K, gx, K, false);
  if (gw != nullptr) gemm<T>(true, false, N, K, M, gz, N, x, K, gw, K, false);
}

template void linear_relu_forward<float>(int64_t, int64_t, int64_t, const float*, const float*,
                                         const float*, float*);
template void linear_relu_forward<double>(int64_t, int64_t, int64_t, const double*,
                                          const double*, const double*, double*);
template void linear_relu_backward<float>(int64_t, int64_t, int64_t, const float*, const float*,
                                          const float*, const float*, float*, float*, float*);
template void linear_relu_backward<double>(int64_t, int64_t, int64_t, const double*,
                                           const double*, const double*, const double*, double*,
                                           double*, double*);

}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
