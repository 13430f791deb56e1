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
#include "fastnn/memory_pool.h"  // poison_enabled
#include "kernels/gemm.h"  // gemm<T> of this ISA

#ifndef FASTNN_ISA_NS
#error "FASTNN_ISA_NS must name the ISA namespace (set by CMakeLists.txt)"
#endif

namespace fastnn {
namespace FASTNN_ISA_NS {

// Fresh scratch memory is filled with NaN bytes under FASTNN_POISON_SCRATCH
// (fastnn::poison_enabled, fastnn/memory_pool.h), so a kernel that lets a
// never-written scratch element reach its output turns it into NaN that the
// tests notice. (Stale scratch also costs speed when it happens to hold
// subnormals: see conv1_relu_maxpool_image in fused.cpp.)
inline void poison_fill(void* p, size_t bytes) {
  if (poison_enabled()) std::memset(p, 0xff, bytes);
}

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
    poison_fill(ptr_, bytes);
  }
  ~Buffer() { std::free(ptr_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* get() const { return ptr_; }
  void zero(int64_t n) { std::memset(ptr_, 0, static_cast<size_t>(n) * sizeof(T)); }

 private:
  T* ptr_ = nullptr;
};

// Per-thread scratch memory that is kept between calls, so steady-state kernels
// neither call the allocator nor fault in fresh pages (a large aligned_alloc is
// a new mmap whose pages the kernel must clear on first touch). Each purpose
// uses its own slot, so buffers that are live at the same time never share
// one; requests above kKeepBytes get a private allocation freed on scope exit.
enum ScratchSlot : int {
  kSlotCol = 0,        // im2col / col2im columns
  kSlotWinoIn = 1,     // Winograd transformed input
  kSlotWinoOut = 2,    // Winograd products / transformed grad_out
  kSlotWinoGrid = 3,   // Winograd zero-padded plane
  kSlotPartial = 4,    // per-chunk weight-gradient partials (caller thread)
  kSlotWeights = 5,    // transformed weights or their gradients (caller thread)
  kSlotLanes = 6,      // lane-wise weight-gradient sums (small-K conv)
  kSlotFusedMid = 7,   // fused conv+relu+pool: one image's conv output
  kSlotFusedGrad = 8,  // fused conv+relu+pool: its gradient
  kSlotFusedW = 9,     // fused conv+relu+pool: one image's weight gradient
  kSlotFusedSums = 10, // fused conv+relu+pool: per-range gradient partials (caller thread)
  kSlotFusedCodes = 11, // fused conv+relu+pool: one image's recomputed window codes
  kNumSlots = 12,
};

class ThreadScratch {
 public:
  static constexpr size_t kKeepBytes = size_t(32) << 20;
  static void* get(int slot, size_t bytes) {
    static thread_local ThreadScratch t;
    Slot& s = t.slots_[slot];
    if (bytes > s.cap) {
      std::free(s.ptr);
      s.ptr = nullptr;
      s.cap = 0;
      const size_t cap = (bytes + 4095) & ~size_t(4095);
      s.ptr = std::aligned_alloc(64, cap);
      if (s.ptr == nullptr) throw std::bad_alloc();
      s.cap = cap;
      poison_fill(s.ptr, cap);
    }
    return s.ptr;
  }
  ~ThreadScratch() {
    for (Slot& s : slots_) std::free(s.ptr);
  }

 private:
  struct Slot {
    void* ptr = nullptr;
    size_t cap = 0;
  };
  Slot slots_[kNumSlots];
};

// An uninitialised, 64-byte aligned array of n T from the calling thread's
// scratch slot (or, when large, a private allocation). Valid until the next
// Scratch on the same slot and thread.
template <typename T>
class Scratch {
 public:
  Scratch(ScratchSlot slot, int64_t n) {
    const size_t bytes = static_cast<size_t>(n > 0 ? n : 1) * sizeof(T);
    if (bytes > ThreadScratch::kKeepBytes) {
      owned_ = static_cast<T*>(std::aligned_alloc(64, (bytes + 63) & ~size_t(63)));
      if (owned_ == nullptr) throw std::bad_alloc();
      poison_fill(owned_, bytes);
      ptr_ = owned_;
    } else {
      ptr_ = static_cast<T*>(ThreadScratch::get(slot, bytes));
    }
  }
  ~Scratch() { std::free(owned_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return ptr_; }
  void zero(int64_t n) { std::memset(ptr_, 0, static_cast<size_t>(n) * sizeof(T)); }

 private:
  T* ptr_ = nullptr;
  T* owned_ = nullptr;
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
// The 2x2 stride-2 unpadded pool (MNIST's), which pool.cpp and the fused op
// run on fast paths.
inline bool is_2x2_s2(const Pool2dParams& p) {
  return p.kh == 2 && p.kw == 2 && p.sh == 2 && p.sw == 2 && p.ph == 0 && p.pw == 0 &&
         p.dh == 1 && p.dw == 1 && 2 * p.OH <= p.H && 2 * p.OW <= p.W;
}
template <typename T>
void max_pool2d_forward(const Pool2dParams& p, const T* x, T* y);
template <typename T>
void max_pool2d_backward(const Pool2dParams& p, const T* gy, const T* x, T* gx);
template <typename T>
void max_pool2d_with_indices_forward(const Pool2dParams& p, const T* x, T* y, int64_t* ind);
template <typename T>
void avg_pool2d_forward(const Pool2dParams& p, const T* x, T* y);
template <typename T>
void avg_pool2d_backward(const Pool2dParams& p, const T* gy, T* gx);

// --- fused.cpp ---------------------------------------------------------------
template <typename T>
void conv2d_relu_maxpool_forward(const Conv2dParams& cp, const Pool2dParams& pp, const T* x,
                                 const T* w, const T* b, T* y, uint8_t* codes);
template <typename T>
void conv2d_relu_maxpool_backward(const Conv2dParams& cp, const Pool2dParams& pp, const T* gy,
                                  const T* x, const T* w, const T* b, const uint8_t* codes,
                                  T* gx, T* gw, T* gb);
template <typename T>
void batch_norm2d_relu_maxpool_forward(const Pool2dParams& pp, const T* x, const T* w,
                                       const T* b, T* mean, T* var, double eps, bool training,
                                       T* y, uint8_t* codes);
template <typename T>
void batch_norm2d_relu_maxpool_backward(const Pool2dParams& pp, const T* gy, const T* x,
                                        const T* w, const T* b, const T* mean, const T* var,
                                        double eps, bool training, const uint8_t* codes, T* gx,
                                        T* gw, T* gb);

// --- linear.cpp --------------------------------------------------------------
template <typename T>
void linear_relu_forward(int64_t M, int64_t N, int64_t K, const T* x, const T* w, const T* b,
                         T* y);
template <typename T>
void linear_relu_backward(int64_t M, int64_t N, int64_t K, const T* gy, const T* x, const T* w,
                          const T* y, T* gx, T* gw, T* gb);

// --- batchnorm.cpp -----------------------------------------------------------
template <typename T>
void batch_norm2d_forward(int64_t N, int64_t C, int64_t HW, const T* x, const T* w, const T* b,
                          T* mean, T* var, double eps, bool training, T* y);
template <typename T>
void batch_norm2d_backward(int64_t N, int64_t C, int64_t HW, const T* gy, const T* x,
                           const T* w, const T* mean, const T* var, double eps, bool training,
                           T* gx, T* gw, T* gb);
template <typename T>
void batch_norm2d_relu_forward(int64_t N, int64_t C, int64_t HW, const T* x, const T* w,
                               const T* b, T* mean, T* var, double eps, bool training, T* y);
template <typename T>
void batch_norm2d_relu_backward(int64_t N, int64_t C, int64_t HW, const T* gy, const T* x,
                                const T* w, const T* b, const T* mean, const T* var, double eps,
                                bool training, T* gx, T* gw, T* gb);

// --- elementwise.cpp ---------------------------------------------------------
template <typename T>
void lookup_u8(const uint8_t* images, int64_t row_len, const int64_t* rows, int64_t B,
               const T* table, T* out);
template <typename T>
void relu(const T* x, T* y, int64_t n);
template <typename T>
void relu_backward(const T* gy, const T* y, T* gx, int64_t n);
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
