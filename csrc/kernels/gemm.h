// General matrix multiply for one ISA build (see csrc/fastnn/kernels.h).
// Included by other kernel files compiled with the same FASTNN_ISA_NS, so that
// e.g. the im2col conv calls the gemm of its own ISA directly.
#pragma once

#include <cstdint>

#ifndef FASTNN_ISA_NS
#error "FASTNN_ISA_NS must be defined (isa_baseline, isa_avx2 or isa_avx512)"
#endif

namespace fastnn {
namespace FASTNN_ISA_NS {

// C[M,N] (+)= op(A) @ op(B), all row-major with row strides lda/ldb/ldc (in
// elements). op(A) = A^T when trans_a (A stored K x M, lda >= M), else A is
// stored M x K (lda >= K); likewise op(B) = B^T when trans_b (B stored N x K,
// ldb >= K), else B is K x N (ldb >= N). accumulate=false overwrites C (its old
// contents, even NaN, are never read); accumulate=true adds to it. K == 0
// zeroes C (or leaves it unchanged when accumulating); M == 0 or N == 0 is a
// no-op. A, B and C must not overlap. Uses the fastnn thread pool; when called
// from inside a parallel_for chunk it runs on the calling thread only.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
          const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate);

// gemm with an epilogue on the finished C: C = relu?(op(A) @ op(B) [+ C] +
// bias[j]), bias (N,) may be null; bit-identical to gemm followed by a
// separate bias add and ReLU pass, without that pass over C.
template <typename T>
void gemm_bias_relu(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
                    int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate,
                    const T* bias, bool relu);

// The blocking gemm<T> uses now: {MR, NR, KC, MC, NC} (register tile, then
// cache blocks from the cache sizes in force, see fastnn/cpuinfo.h).
template <typename T>
void gemm_blocking(int64_t out[5]);

extern template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t,
                                 const float*, int64_t, float*, int64_t, bool);
extern template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, const double*, int64_t,
                                  const double*, int64_t, double*, int64_t, bool);

extern template void gemm_bias_relu<float>(bool, bool, int64_t, int64_t, int64_t, const float*,
                                           int64_t, const float*, int64_t, float*, int64_t, bool,
                                           const float*, bool);
extern template void gemm_bias_relu<double>(bool, bool, int64_t, int64_t, int64_t, const double*,
                                            int64_t, const double*, int64_t, double*, int64_t,
                                            bool, const double*, bool);
extern template void gemm_blocking<float>(int64_t*);
extern template void gemm_blocking<double>(int64_t*);

}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
