// Declarations of the per-ISA kernels that table.cpp puts into a KernelTable,
// plus small helpers shared by the kernel files.
//
// Everything is inside namespace fastnn::FASTNN_ISA_NS (one copy per ISA build).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "fastnn/kernels.h"
#include "kernels/gemm.h"  // gemm<T> of this ISA

#ifndef FASTNN_ISA_NS
#error "FASTNN_ISA_NS must name the ISA namespace (set by CMakeLists.txt)"
#endif

namespace fastnn {
namespace FASTNN_ISA_NS {

// An uninitialised, 64-byte aligned scratch array. Kernel scratch lives here
// rather than in std::vector so no std template is instantiated with ISA
// flags (the linker could otherwise pick one ISA's copy for every table).
template <typename T>
class Buffer {
 public:
  explicit Buffer(int64_t n) {
    const size_t bytes = (static_cast<size_t>(n > 0 ? n : 1) * sizeof(T) + 63) & ~size_t(63);
    ptr_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (ptr_ == nullptr) throw std::bad_alloc();
  }
  ~Buffer() { std::free(ptr_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* get() const { return ptr_; }
  void zero(int64_t n) { std::memset(ptr_, 0, static_cast<size_t>(n) * sizeof(T)); }

 private:
  T* ptr_ = nullptr;
};

// First output index o >= 0 whose input o*s + off is >= 0, and one past the
// last whose input is < size (clipped to [0, n_out]); off = tap*dilation - pad.
inline void valid_range(int64_t size, int64_t s, int64_t off, int64_t n_out, int64_t& lo,
                        int64_t& hi) {
  // o*s + off >= 0  <=>  o >= ceil(-off / s)
  lo = off >= 0 ? 0 : (-off + s - 1) / s;
  // o*s + off <= size - 1  <=>  o <= floor((size - 1 - off) / s)
  const int64_t last = size - 1 - off;
  hi = last < 0 ? 0 : last / s + 1;
  lo = std::min(lo, n_out);
  hi = std::max(lo, std::min(hi, n_out));
}

// --- conv2d.cpp --------------------------------------------------------------
template <typename T>
void conv2d_forward(const Conv2dParams& p, const T* x, const T* w, const T* b, T* y);
template <typename T>
void conv2d_backward_input(const Conv2dParams& p, const T* gy, const T* w, T* gx);
template <typename T>
void conv2d_backward_weight(const Conv2dParams& p, const T* gy, const T* x, T* gw);

// --- pool.cpp ----------------------------------------------------------------
template <typename T>
void max_pool2d_forward(const Pool2dParams& p, const T* x, T* y);
template <typename T>
void max_pool2d_backward(const Pool2dParams& p, const T* gy, const T* x, T* gx);
template <typename T>
void avg_pool2d_forward(const Pool2dParams& p, const T* x, T* y);
template <typename T>
void avg_pool2d_backward(const Pool2dParams& p, const T* gy, T* gx);

// --- elementwise.cpp ---------------------------------------------------------
template <typename T>
void relu(const T* x, T* y, int64_t n);
template <typename T>
void relu_backward(const T* gy, const T* y, T* gx, int64_t n);
template <typename T>
void bias_add(T* y, const T* b, int64_t outer, int64_t C, int64_t inner);
template <typename T>
void softmax_cross_entropy(const T* logits, const int64_t* labels, int64_t N, int64_t K, T* loss,
                           T* grad);
template <typename T>
void sgd_step(T* param, const T* grad, T* buf, int64_t n, double lr, double momentum,
              double weight_decay, bool nesterov);
template <typename T>
void adam_step(T* param, const T* grad, T* exp_avg, T* exp_avg_sq, int64_t n, int64_t step,
               double lr, double beta1, double beta2, double eps, double weight_decay,
               bool decoupled);

}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
