// Debug aid shared by the kernels' scratch allocators (ops.h, gemm.cpp).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>

#ifndef FASTNN_ISA_NS
#error "FASTNN_ISA_NS must name the ISA namespace (set by CMakeLists.txt)"
#endif

// In the ISA namespace like every kernel helper: an inline function shared by
// builds with different ISA flags would leave the linker free to pick the
// AVX-512 copy for all of them.
namespace fastnn {
namespace FASTNN_ISA_NS {

// With FASTNN_POISON_SCRATCH set (read once), fresh scratch memory is filled
// with all-ones bytes (NaN as float32 and float64) before a kernel sees it, so
// a kernel that lets a never-written scratch element reach its output turns it
// into NaN that the tests notice. AddressSanitizer does not report such reads;
// tools/sanitize.sh sets it. (Stale scratch also costs speed when it happens to
// hold subnormals: see conv1_relu_maxpool_image in fused.cpp.)
inline void poison_fill(void* p, size_t bytes) {
  static const bool on = std::getenv("FASTNN_POISON_SCRATCH") != nullptr;
  if (on) std::memset(p, 0xff, bytes);
}

}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
