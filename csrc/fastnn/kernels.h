// Kernel interface shared by every ISA build of csrc/kernels/*.cpp.
//
// Layout conventions (all arrays C-contiguous, row-major):
//   activations NCHW, conv weights OIHW (I = C / groups), matrices row-major.
// Each file under csrc/kernels/ is compiled once per ISA (baseline, AVX2+FMA,
// AVX-512) with FASTNN_ISA_NS set to that ISA's namespace; dispatch.cpp picks one
// KernelTable at import from what the CPU supports. Kernels never allocate
// Python objects and never touch the GIL, so the bindings can release it.
#pragma once

#include <cstdint>

namespace fastnn {

// Geometry of one conv2d call. Padding is symmetric (top = bottom = ph,
// left = right = pw); asymmetric "same" padding is handled in Python.
struct Conv2dParams {
  int64_t N, C, H, W;       // input
  int64_t O, KH, KW;        // weight (O, C / groups, KH, KW)
  int64_t OH, OW;           // output
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t groups;
};

// Geometry of one pooling call. OH/OW come from Python, which applies torch's
// ceil_mode rule; windows may then run past the padded input and are clipped.
struct Pool2dParams {
  int64_t N, C, H, W;
  int64_t OH, OW;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  bool count_include_pad;   // avg only
  int64_t divisor_override; // avg only; 0 means none
};

template <typename T>
struct KernelTable {
  // C[M,N] (+)= op(A) @ op(B); op(A) is A^T when trans_a (A stored K x M).
  // lda/ldb/ldc are row strides in elements. accumulate=false overwrites C.
  void (*gemm)(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
               const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
               int64_t ldc, bool accumulate);

  // y (N,O,OH,OW) = conv(x (N,C,H,W), w (O,C/g,KH,KW)) + b (O,) ; b may be null.
  void (*conv2d_forward)(const Conv2dParams& p, const T* x, const T* w,
                         const T* b, T* y);
  // gx (N,C,H,W) from gy (N,O,OH,OW) and w. Overwrites gx.
  void (*conv2d_backward_input)(const Conv2dParams& p, const T* gy,
                                const T* w, T* gx);
  // gw (O,C/g,KH,KW) from gy and x. Overwrites gw.
  void (*conv2d_backward_weight)(const Conv2dParams& p, const T* gy,
                                 const T* x, T* gw);

  // y (N,C,OH,OW). Padded positions are -inf; NaN wins (propagates) as in torch.
  void (*max_pool2d_forward)(const Pool2dParams& p, const T* x, T* y);
  // gx (N,C,H,W), overwritten; each window's gradient goes to the first
  // maximal element in row-major window order, or to its last NaN (torch's rule).
  void (*max_pool2d_backward)(const Pool2dParams& p, const T* gy, const T* x,
                              T* gx);
  // y and ind (N,C,OH,OW): each window's max and the flat index (h*W + w) in
  // its input plane of the first maximum, or of the last NaN (torch's rule).
  void (*max_pool2d_with_indices_forward)(const Pool2dParams& p, const T* x, T* y,
                                          int64_t* ind);
  void (*avg_pool2d_forward)(const Pool2dParams& p, const T* x, T* y);
  void (*avg_pool2d_backward)(const Pool2dParams& p, const T* gy, T* gx);

  // Elementwise ops of the training loop (csrc/kernels/elementwise.cpp).
  // out (B, row_len) = table (256,)[images[rows[b]] (n, row_len) uint8]; rows
  // (B,) in [0, n) (checked by the caller), or null for rows 0..B-1.
  void (*lookup_u8)(const uint8_t* images, int64_t row_len, const int64_t* rows, int64_t B,
                    const T* table, T* out);
  // y = max(x, 0), NaN stays NaN.
  void (*relu)(const T* x, T* y, int64_t n);
  // gx = gy where y > 0, else 0.
  void (*relu_backward)(const T* gy, const T* y, T* gx, int64_t n);
  // logits (N,K), labels (N,) in [0, K) (checked by the caller) -> *loss =
  // batch mean (NaN for N = 0), grad (N,K) = (softmax - onehot) / N.
  void (*softmax_cross_entropy)(const T* logits, const int64_t* labels, int64_t N,
                                int64_t K, T* loss, T* grad);
  // In place, torch.optim.SGD (dampening 0); buf may be null when momentum == 0.
  void (*sgd_step)(T* param, const T* grad, T* buf, int64_t n, double lr,
                   double momentum, double weight_decay, bool nesterov);
  // In place, torch.optim.Adam (decoupled = false) / AdamW (decoupled = true);
  // step is 1-based.
  void (*adam_step)(T* param, const T* grad, T* exp_avg, T* exp_avg_sq, int64_t n,
                    int64_t step, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool decoupled);

  // BatchNorm per channel of x (N,C,HW) (csrc/kernels/batchnorm.cpp); w, b, mean,
  // var are (C,); w and b may be null (1 and 0). training: mean and var are
  // outputs, the batch mean and biased variance over (N, HW) (N*HW >= 1);
  // otherwise inputs. y = (x - mean) / sqrt(var + eps) * w + b.
  void (*batch_norm2d_forward)(int64_t N, int64_t C, int64_t HW, const T* x, const T* w,
                               const T* b, T* mean, T* var, double eps, bool training, T* y);
  // Gradients from gy (N,C,HW), with mean/var as the forward used them; with
  // training, gx includes the paths through the batch statistics. gx (N,C,HW),
  // gw and gb (C,) may each be null (not wanted); the others are overwritten.
  void (*batch_norm2d_backward)(int64_t N, int64_t C, int64_t HW, const T* gy, const T* x,
                                const T* w, const T* mean, const T* var, double eps,
                                bool training, T* gx, T* gw, T* gb);
  // The same with the ReLU that follows fused: y = max(batch_norm2d(x), 0) bit for
  // bit; the backward masks gy where that y is not > 0 (recomputed from x, the
  // stats and b, as the forward computed it), then runs batch_norm2d_backward.
  void (*batch_norm2d_relu_forward)(int64_t N, int64_t C, int64_t HW, const T* x, const T* w,
                                    const T* b, T* mean, T* var, double eps, bool training,
                                    T* y);
  void (*batch_norm2d_relu_backward)(int64_t N, int64_t C, int64_t HW, const T* gy,
                                     const T* x, const T* w, const T* b, const T* mean,
                                     const T* var, double eps, bool training, T* gx, T* gw,
                                     T* gb);

  // Fused conv2d + bias + ReLU + max_pool2d (csrc/kernels/fused.cpp). The pool
  // geometry takes the conv output as its input (pp.N = N, pp.C = O,
  // pp.H = OH, pp.W = OW). y (N,O,POH,POW) = max_pool2d(relu(conv2d(x))) bit for
  // bit, without materialising the conv output. codes (N,O,POH,POW) uint8, when
  // not null, gets each pooled output's winning window tap (kh*KW + kw) or 255
  // where no gradient passes (max <= 0, or NaN).
  void (*conv2d_relu_maxpool_forward)(const Conv2dParams& cp, const Pool2dParams& pp,
                                      const T* x, const T* w, const T* b, T* y,
                                      uint8_t* codes);
  // Gradients of the fused op from gy (N,O,POH,POW): routed by the forward's
  // codes when given, else by recomputing the conv output image by image (b is
  // read only then). gx (N,C,H,W), gw (O,C/g,KH,KW), gb (O,) may each be null
  // (not wanted); the others are overwritten.
  void (*conv2d_relu_maxpool_backward)(const Conv2dParams& cp, const Pool2dParams& pp,
                                       const T* gy, const T* x, const T* w, const T* b,
                                       const uint8_t* codes, T* gx, T* gw, T* gb);

  // Fused BatchNorm + ReLU + max_pool2d (csrc/kernels/fused.cpp), pp the pool
  // over x (N,C,H,W): y (N,C,POH,POW) = max_pool2d(relu(batch_norm2d(x))) bit
  // for bit, mean/var as batch_norm2d_forward (computed when training), codes
  // as conv2d_relu_maxpool_forward's. The (N,C,H,W) BatchNorm output is never
  // written: each plane is normalised and pooled in cache.
  void (*batch_norm2d_relu_maxpool_forward)(const Pool2dParams& pp, const T* x, const T* w,
                                            const T* b, T* mean, T* var, double eps,
                                            bool training, T* y, uint8_t* codes);
  // Its gradients from gy (N,C,POH,POW): routed by the forward's codes when
  // given, else by max_pool2d_backward on each plane recomputed (b is read only
  // then; any window size), then
  // batch_norm2d_backward's math on each plane in cache. gx (N,C,H,W), gw and
  // gb (C,) may each be null (not wanted); the others are overwritten.
  void (*batch_norm2d_relu_maxpool_backward)(const Pool2dParams& pp, const T* gy, const T* x,
                                             const T* w, const T* b, const T* mean,
                                             const T* var, double eps, bool training,
                                             const uint8_t* codes, T* gx, T* gw, T* gb);

  // Fused Linear + ReLU (csrc/kernels/linear.cpp): y (M,N) = relu(x (M,K) @
  // w (N,K)^T + b (N,)), b may be null; bit-identical to gemm, bias add, relu.
  void (*linear_relu_forward)(int64_t M, int64_t N, int64_t K, const T* x, const T* w,
                              const T* b, T* y);
  // Gradients from gy (M,N) and the forward's y: gz = gy where y > 0;
  // gx (M,K) = gz @ w, gw (N,K) = gz^T @ x, gb (N,) = column sums of gz. Each
  // output may be null (not wanted); the others are overwritten.
  void (*linear_relu_backward)(int64_t M, int64_t N, int64_t K, const T* gy, const T* x,
                               const T* w, const T* y, T* gx, T* gw, T* gb);
  // The gemm's blocking for T with the cache sizes in force: {MR, NR, KC, MC, NC}.
  void (*gemm_blocking)(int64_t out[5]);
};

#define FASTNN_DECLARE_ISA(ns)            \
  namespace ns {                          \
  void fill_table(KernelTable<float>& t);  \
  void fill_table(KernelTable<double>& t); \
  }
FASTNN_DECLARE_ISA(isa_baseline)
FASTNN_DECLARE_ISA(isa_avx2)
FASTNN_DECLARE_ISA(isa_avx512)
#undef FASTNN_DECLARE_ISA

// The table chosen at import (see dispatch.cpp).
const KernelTable<float>& table_f32();
const KernelTable<double>& table_f64();
// "avx512", "avx2" or "baseline".
const char* active_isa();
// Comma-separated list of ISAs this CPU can run, best first.
const char* supported_isas();
// Select an ISA by name ("best" = the best supported); returns false if the
// name is unknown or the CPU/OS cannot run it (the selection is then unchanged).
bool select_isa(const char* name);

}  // namespace fastnn
