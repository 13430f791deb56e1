// The running CPU's vendor, family/model and data-cache sizes: the one home of
// the cache numbers that kernel blocking is derived from (csrc/cpuinfo.cpp).
//
// Detected once, at first use: CPUID (Intel leaf 4, AMD leaf 0x8000001D), else
// Linux sysfs (/sys/devices/system/cpu/cpu0/cache/index*), else safe defaults.
// FASTNN_CACHE_SIZES="l1d=32K,l2=1M,l3=32M" overrides any of the three sizes
// (for tests and experiments); set_cache_sizes() does the same at run time.
#pragma once

#include <cstdint>
#include <string>

namespace fastnn {

// Bytes. l1d and l2 are one core's; l3 is the whole shared cache and
// l3_sharing the number of logical CPUs that share it (1 when unknown).
struct CacheSizes {
  int64_t l1d, l2, l3;
  int64_t l3_sharing;
};

struct CpuInfo {
  std::string vendor;  // "GenuineIntel", "AuthenticAMD", ... or "unknown"
  int family = 0, model = 0, stepping = 0;
  CacheSizes detected{};     // what the CPU (or sysfs, or the defaults) said
  std::string source;        // "cpuid", "sysfs" or "default"
};

// What detection found (never changes after the first call).
const CpuInfo& cpu_info();

// The sizes kernels block for: the detected ones, with FASTNN_CACHE_SIZES or
// set_cache_sizes() applied. Cheap (a few relaxed atomic loads); safe to call
// from any thread.
CacheSizes cache_sizes();

// Applies an override spec like "l1d=48K,l2=2M,l3=32M" (keys l1d, l2, l3;
// suffixes K, M, G or none for bytes; each size 1 KiB .. 16 GiB) on top of the
// detected sizes; "" restores them. Returns an error message, or "" on success
// (the sizes are then unchanged). Kernels running at the same time may see
// either geometry; each gemm call reads it once.
std::string set_cache_sizes(const std::string& spec);

// The override spec in force ("" when none).
std::string cache_override();

// Why FASTNN_CACHE_SIZES was ignored (it is then not applied at all), or "".
std::string cache_env_error();

// A byte count as sysfs writes cache sizes and the FASTNN_* size variables
// take them: digits, then optionally K, M or G (binary; "KiB", "MB" accepted),
// at most 2^40 bytes in all. False, bytes untouched, on anything else.
bool parse_size(const std::string& text, int64_t& bytes);

}  // namespace fastnn
