// Fills this ISA build's KernelTable (compiled once per ISA, see CMakeLists.txt).
#include "kernels/ops.h"

namespace fastnn {
namespace FASTNN_ISA_NS {

namespace {
template <typename T>
void fill(KernelTable<T>& t) {
  t.gemm = &gemm<T>;
  t.conv2d_forward = &conv2d_forward<T>;
  t.conv2d_backward_input = &conv2d_backward_input<T>;
  t.conv2d_backward_weight = &conv2d_backward_weight<T>;
  t.max_pool2d_forward = &max_pool2d_forward<T>;
  t.max_pool2d_backward = &max_pool2d_backward<T>;
  t.max_pool2d_with_indices_forward = &max_pool2d_with_indices_forward<T>;
  t.avg_pool2d_forward = &avg_pool2d_forward<T>;
  t.avg_pool2d_backward = &avg_pool2d_backward<T>;
  t.lookup_u8 = &lookup_u8<T>;
  t.relu = &relu<T>;
  t.relu_backward = &relu_backward<T>;
  t.softmax_cross_entropy = &softmax_cross_entropy<T>;
  t.sgd_step = &sgd_step<T>;
  t.adam_step = &adam_step<T>;
  t.batch_norm2d_forward = &batch_norm2d_forward<T>;
  t.batch_norm2d_backward = &batch_norm2d_backward<T>;
  t.batch_norm2d_relu_forward = &batch_norm2d_relu_forward<T>;
  t.batch_norm2d_relu_backward = &batch_norm2d_relu_backward<T>;
  t.conv2d_relu_maxpool_forward = &conv2d_relu_maxpool_forward<T>;
  t.conv2d_relu_maxpool_backward = &conv2d_relu_maxpool_backward<T>;
  t.batch_norm2d_relu_maxpool_forward = &batch_norm2d_relu_maxpool_forward<T>;
  t.batch_norm2d_relu_maxpool_backward = &batch_norm2d_relu_maxpool_backward<T>;
  t.linear_relu_forward = &linear_relu_forward<T>;
  t.linear_relu_backward = &linear_relu_backward<T>;
  t.gemm_blocking = &gemm_blocking<T>;
}
}  // namespace

void fill_table(KernelTable<float>& t) { fill(t); }
void fill_table(KernelTable<double>& t) { fill(t); }

}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
