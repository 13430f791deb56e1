// CPU vendor/model and cache sizes (see csrc/fastnn/cpuinfo.h).
//
// No model-number tables: the sizes come from the CPU's own cache descriptors,
// so a new part (or a VM that reports its host's caches) is handled as it
// describes itself. Values outside plausible ranges (some hypervisors report
// zeros) fall through to the next source.
#include "fastnn/cpuinfo.h"

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>

#if (defined(__x86_64__) || defined(__i386__))
#define FASTNN_HAVE_CPUID 1
#include <cpuid.h>
#endif

namespace fastnn {

bool parse_size(const std::string& text, int64_t& bytes) {
  size_t i = 0;
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  if (i == text.size() || !std::isdigit(static_cast<unsigned char>(text[i]))) return false;
  int64_t v = 0;
  for (; i < text.size() && std::isdigit(static_cast<unsigned char>(text[i])); ++i) {
    v = v * 10 + (text[i] - '0');
    if (v > (int64_t(1) << 40)) return false;
  }
  int64_t mult = 1;
  if (i < text.size()) {
    switch (std::toupper(static_cast<unsigned char>(text[i]))) {
      case 'K': mult = int64_t(1) << 10; ++i; break;
      case 'M': mult = int64_t(1) << 20; ++i; break;
      case 'G': mult = int64_t(1) << 30; ++i; break;
      default: break;
    }
    if (i < text.size() && std::toupper(static_cast<unsigned char>(text[i])) == 'I') ++i;
    if (i < text.size() && std::toupper(static_cast<unsigned char>(text[i])) == 'B') ++i;
  }
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  // v <= 2^40 times 2^30 would wrap (2^34 + 1 G reads as 1 G): refuse instead.
  if (i != text.size() || v > (int64_t(1) << 40) / mult) return false;
  bytes = v * mult;
  return true;
}

namespace {

// Used when neither CPUID nor sysfs answers: small enough that blocking for
// them stays correct and reasonably fast on any recent x86-64 or ARM core.
constexpr CacheSizes kDefaultSizes{32 << 10, 512 << 10, 8 << 20, 1};

bool plausible(const CacheSizes& s) {
  return s.l1d >= (4 << 10) && s.l1d <= (4 << 20) && s.l2 >= (64 << 10) &&
         s.l2 <= (int64_t(256) << 20) && s.l3 >= 0 && s.l3 <= (int64_t(16) << 30);
}

#ifdef FASTNN_HAVE_CPUID
// Walks a deterministic-cache-parameters leaf (Intel 4, AMD 0x8000001D: the
// same register layout) and fills the L1 data, L2 and L3 sizes.
bool cpuid_caches(unsigned leaf, CacheSizes& out) {
  CacheSizes s{0, 0, 0, 1};
  for (unsigned sub = 0; sub < 16; ++sub) {
    unsigned eax, ebx, ecx, edx;
    __cpuid_count(leaf, sub, eax, ebx, ecx, edx);
    const unsigned type = eax & 0x1f;  // 0: no more caches, 1 data, 2 instr, 3 unified
    if (type == 0) break;
    if (type == 2) continue;
    const unsigned level = (eax >> 5) & 0x7;
    const int64_t ways = ((ebx >> 22) & 0x3ff) + 1;
    const int64_t parts = ((ebx >> 12) & 0x3ff) + 1;
    const int64_t line = (ebx & 0xfff) + 1;
    const int64_t sets = int64_t(ecx) + 1;
    const int64_t bytes = ways * parts * line * sets;
    const int64_t sharing = ((eax >> 14) & 0xfff) + 1;
    if (level == 1) s.l1d = bytes;
    if (level == 2) s.l2 = bytes;
    if (level == 3) {
      s.l3 = bytes;
      s.l3_sharing = sharing;
    }
  }
  if (!plausible(s)) return false;
  out = s;
  return true;
}

void cpuid_detect(CpuInfo& info) {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return;
  const unsigned max_leaf = eax;
  char vendor[13];
  for (int i = 0; i < 4; ++i) {
    vendor[i] = char(ebx >> (8 * i));
    vendor[4 + i] = char(edx >> (8 * i));
    vendor[8 + i] = char(ecx >> (8 * i));
  }
  vendor[12] = '\0';
  info.vendor = vendor;
  if (max_leaf >= 1) {
    __cpuid(1, eax, ebx, ecx, edx);
    const int base_family = (eax >> 8) & 0xf, base_model = (eax >> 4) & 0xf;
    info.family = base_family == 0xf ? base_family + int((eax >> 20) & 0xff) : base_family;
    info.model = (base_family == 0x6 || base_family == 0xf)
                     ? base_model + int(((eax >> 16) & 0xf) << 4)
                     : base_model;
    info.stepping = int(eax & 0xf);
  }
  // Try both leaves whatever the vendor: Hygon, Zhaoxin and VMs differ in which
  // one they fill, and an empty or absent leaf simply fails the plausibility test.
  const unsigned max_ext = __get_cpuid_max(0x80000000u, nullptr);
  bool ok = false;
  if (max_ext >= 0x8000001Du) {
    __cpuid(0x80000001u, eax, ebx, ecx, edx);
    const bool topoext = (ecx >> 22) & 1;
    if (topoext) ok = cpuid_caches(0x8000001Du, info.detected);
  }
  if (!ok && max_leaf >= 4) ok = cpuid_caches(4, info.detected);
  if (ok) info.source = "cpuid";
}
#endif

std::string read_line(const std::string& path) {
  std::ifstream f(path);
  std::string s;
  if (f) std::getline(f, s);
  return s;
}

// Logical CPUs in a sysfs list such as "0-3,8-11".
int64_t count_cpu_list(const std::string& list) {
  int64_t n = 0;
  std::stringstream ss(list);
  std::string part;
  while (std::getline(ss, part, ',')) {
    const size_t dash = part.find('-');
    if (dash == std::string::npos) {
      if (!part.empty()) ++n;
    } else {
      n += std::atoll(part.c_str() + dash + 1) - std::atoll(part.c_str()) + 1;
    }
  }
  return n > 0 ? n : 1;
}

bool sysfs_caches(CacheSizes& out) {
  CacheSizes s{0, 0, 0, 1};
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    const std::string level = read_line(dir + "level");
    if (level.empty()) break;
    const std::string type = read_line(dir + "type");
    if (type == "Instruction") continue;
    int64_t bytes = 0;
    if (!parse_size(read_line(dir + "size"), bytes)) continue;
    if (level == "1") s.l1d = bytes;
    if (level == "2") s.l2 = bytes;
    if (level == "3") {
      s.l3 = bytes;
      s.l3_sharing = count_cpu_list(read_line(dir + "shared_cpu_list"));
    }
  }
  if (!plausible(s)) return false;
  out = s;
  return true;
}

CpuInfo detect() {
  CpuInfo info;
  info.vendor = "unknown";
  info.detected = kDefaultSizes;
  info.source = "default";
#ifdef FASTNN_HAVE_CPUID
  cpuid_detect(info);
#endif
  if (info.source == "default" && sysfs_caches(info.detected)) info.source = "sysfs";
  return info;
}

// The sizes in force, as atomics so that a gemm on one thread and an override
// on another never race (each field is read once per call).
struct Active {
  std::atomic<int64_t> l1d{0}, l2{0}, l3{0}, l3_sharing{1};
  std::mutex mu;  // serialises set_cache_sizes and guards spec
  std::string spec;
  std::string env_error;  // why FASTNN_CACHE_SIZES was ignored, or ""

  void store(const CacheSizes& s) {
    l1d.store(s.l1d, std::memory_order_relaxed);
    l2.store(s.l2, std::memory_order_relaxed);
    l3.store(s.l3, std::memory_order_relaxed);
    l3_sharing.store(s.l3_sharing, std::memory_order_relaxed);
  }
};

// Parses spec over base; returns an error or "".
std::string apply_spec(const std::string& spec, CacheSizes& s) {
  std::stringstream ss(spec);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.find_first_not_of(" \t") == std::string::npos) continue;
    const size_t eq = item.find('=');
    if (eq == std::string::npos) return "expected key=size, got '" + item + "'";
    std::string key = item.substr(0, eq);
    key.erase(0, key.find_first_not_of(" \t"));
    key.erase(key.find_last_not_of(" \t") + 1);
    for (auto& ch : key) ch = char(std::tolower(static_cast<unsigned char>(ch)));
    int64_t bytes = 0;
    if (!parse_size(item.substr(eq + 1), bytes) || bytes < 1024 ||
        bytes > (int64_t(16) << 30)) {
      return "size of '" + key + "' must be 1K .. 16G (e.g. 32K, 1M), got '" +
             item.substr(eq + 1) + "'";
    }
    if (key == "l1d" || key == "l1") {
      s.l1d = bytes;
    } else if (key == "l2") {
      s.l2 = bytes;
    } else if (key == "l3") {
      s.l3 = bytes;
    } else {
      return "unknown cache '" + key + "' (use l1d, l2, l3)";
    }
  }
  return "";
}

Active& active() {
  static Active* a = [] {
    auto* p = new Active;  // leaked on purpose: kernels may run during exit
    CacheSizes s = cpu_info().detected;
    if (const char* env = std::getenv("FASTNN_CACHE_SIZES")) {
      p->env_error = apply_spec(env, s);
      if (p->env_error.empty()) {
        p->spec = env;
      } else {
        s = cpu_info().detected;  // a malformed variable changes nothing
      }
    }
    p->store(s);
    return p;
  }();
  return *a;
}

}  // namespace

const CpuInfo& cpu_info() {
  static const CpuInfo info = detect();
  return info;
}

CacheSizes cache_sizes() {
  Active& a = active();
  return CacheSizes{a.l1d.load(std::memory_order_relaxed), a.l2.load(std::memory_order_relaxed),
                    a.l3.load(std::memory_order_relaxed),
                    a.l3_sharing.load(std::memory_order_relaxed)};
}

std::string set_cache_sizes(const std::string& spec) {
  Active& a = active();
  std::lock_guard<std::mutex> lock(a.mu);
  CacheSizes s = cpu_info().detected;
  const std::string err = apply_spec(spec, s);
  if (!err.empty()) return err;
  a.store(s);
  a.spec = spec;
  return "";
}

std::string cache_env_error() { return active().env_error; }

std::string cache_override() {
  Active& a = active();
  std::lock_guard<std::mutex> lock(a.mu);
  return a.spec;
}

}  // namespace fastnn
