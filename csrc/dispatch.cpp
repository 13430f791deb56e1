// Runtime ISA selection: which per-ISA KernelTable the bindings use.
//
// All ISA builds are linked in; at load time the best one this CPU *and OS*
// can run is chosen (AVX-512 needs the OS to save the opmask/ZMM state, which
// cpuid alone does not tell, hence the xgetbv check). The bindings then apply
// FASTNN_ISA (see bindings.cpp) and tests switch at runtime via select_isa.
#include <atomic>
#include <cstring>

#include "fastnn/kernels.h"

#if (defined(__x86_64__) || defined(__i386__)) && !defined(FASTNN_BASELINE_ONLY)
#define FASTNN_X86_DISPATCH 1
#include <cpuid.h>
#endif

namespace fastnn {
namespace {

enum Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kNumIsa = 3 };
const char* const kIsaNames[kNumIsa] = {"baseline", "avx2", "avx512"};

#ifdef FASTNN_X86_DISPATCH
// XCR0: which register states the OS saves on context switches.
unsigned long long xcr0() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
  if (!(ecx & bit_OSXSAVE)) return 0;  // xgetbv would fault
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}
#endif

struct Tables {
  KernelTable<float> f32[kNumIsa] = {};
  KernelTable<double> f64[kNumIsa] = {};
  bool supported[kNumIsa] = {true, false, false};
  int best = kBaseline;
  std::atomic<int> active{kBaseline};
  char supported_list[64] = {};

  Tables() {
    isa_baseline::fill_table(f32[kBaseline]);
    isa_baseline::fill_table(f64[kBaseline]);
#ifdef FASTNN_X86_DISPATCH
    isa_avx2::fill_table(f32[kAvx2]);
    isa_avx2::fill_table(f64[kAvx2]);
    isa_avx512::fill_table(f32[kAvx512]);
    isa_avx512::fill_table(f64[kAvx512]);
    __builtin_cpu_init();
    const unsigned long long x = xcr0();
    const bool os_avx = (x & 0x6) == 0x6;        // XMM + YMM state
    const bool os_avx512 = (x & 0xE6) == 0xE6;   // + opmask, ZMM_Hi256, Hi16_ZMM
    supported[kAvx2] = os_avx && __builtin_cpu_supports("avx2") &&
                       __builtin_cpu_supports("fma");
    supported[kAvx512] = supported[kAvx2] && os_avx512 &&
                         __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vl");
#endif
    for (int i = kNumIsa - 1; i >= 0; --i) {
      if (!supported[i]) continue;
      if (best == kBaseline && i != kBaseline) best = i;
      if (supported_list[0] != '\0') std::strcat(supported_list, ",");
      std::strcat(supported_list, kIsaNames[i]);
    }
    active.store(best);
  }
};

Tables& tables() {
  static Tables t;  // thread-safe one-time init
  return t;
}

}  // namespace

const KernelTable<float>& table_f32() {
  Tables& t = tables();
  return t.f32[t.active.load(std::memory_order_relaxed)];
}

const KernelTable<double>& table_f64() {
  Tables& t = tables();
  return t.f64[t.active.load(std::memory_order_relaxed)];
}

const char* active_isa() { return kIsaNames[tables().active.load()]; }

const char* supported_isas() { return tables().supported_list; }

bool select_isa(const char* name) {
  Tables& t = tables();
  if (name == nullptr) return false;
  if (std::strcmp(name, "best") == 0) {
    t.active.store(t.best);
    return true;
  }
  for (int i = 0; i < kNumIsa; ++i) {
    if (std::strcmp(name, kIsaNames[i]) == 0) {
      if (!t.supported[i]) return false;
      t.active.store(i);
      return true;
    }
  }
  return false;
}

}  // namespace fastnn
