// Sums over the images of a batch (weight and bias gradients) that must not
// depend on thread timing: [0, N) is split into at most one contiguous range
// per thread, each range sums into its own buffer, and the buffers are added
// in range order. Used by conv2d.cpp and fused.cpp, for one ISA build.
#pragma once

#include <algorithm>
#include <cstdint>

#include "fastnn/parallel.h"
#include "kernels/ops.h"
#include "kernels/simd.h"

namespace fastnn {
namespace FASTNN_ISA_NS {

template <typename T>
inline void zero_row(T* dst, int64_t n) {
  using V = simd::Vec<T>;
  int64_t i = 0;
  for (; i + V::L <= n; i += V::L) V::storeu(dst + i, V::zero());
  if (i < n) V::storep(dst + i, V::zero(), n - i);
}

template <typename T>
inline void add_row(T* __restrict dst, const T* __restrict src, int64_t n) {
  using V = simd::Vec<T>;
  int64_t i = 0;
  for (; i + V::L <= n; i += V::L) V::storeu(dst + i, V::add(V::loadu(dst + i), V::loadu(src + i)));
  if (i < n) V::storep(dst + i, V::add(V::loadp(dst + i, n - i), V::loadp(src + i, n - i)), n - i);
}

// Ranges for N images: one per thread, at most one per image.
inline int64_t image_ranges(int64_t N) {
  return std::max<int64_t>(1, std::min<int64_t>(N, get_num_threads()));
}

// body(c, n0, n1) for each range c of `ranges` over [0, N), in parallel when
// there is more than one.
template <typename F>
void for_image_ranges(int64_t N, int64_t ranges, const F& body) {
  auto run = [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) body(c, N * c / ranges, N * (c + 1) / ranges);
  };
  if (ranges > 1) {
    parallel_for(ranges, 1, run);
  } else {
    run(0, 1);
  }
}

// out (len, zero on entry) = the sum over [0, N): range_sum(n0, n1, acc) adds
// a range's sum to acc (zero on entry: out itself for the first range, a
// partial from scratch `slot` of the calling thread for the others). The
// result depends on the thread count, never on timing. The slot must not be
// one that range_sum's own kernels use on this thread (the partials are live
// throughout); with a single range none is taken.
template <typename T, typename F>
void sum_over_image_ranges(ScratchSlot slot, int64_t N, int64_t len, T* out, const F& range_sum) {
  const int64_t ranges = image_ranges(N);
  if (ranges == 1) {
    range_sum(0, N, out);
    return;
  }
  Scratch<T> partial(slot, (ranges - 1) * len);
  for_image_ranges(N, ranges, [&](int64_t c, int64_t n0, int64_t n1) {
    T* acc = c == 0 ? out : partial.get() + (c - 1) * len;
    if (c != 0) zero_row(acc, len);
    range_sum(n0, n1, acc);
  });
  for (int64_t c = 1; c < ranges; ++c) add_row(out, partial.get() + (c - 1) * len, len);
}

}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
