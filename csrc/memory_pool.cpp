// The block cache declared in fastnn/memory_pool.h.
#include "fastnn/memory_pool.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
// Under AddressSanitizer (tools/sanitize.sh) a cached block is poisoned, and so
// is the slack past what an output asked for, so a kernel that writes past its
// output or a use of a freed output is still reported despite the reuse.
#include <sanitizer/asan_interface.h>
#define FASTNN_POOL_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define FASTNN_POOL_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define FASTNN_POOL_POISON(p, n) ((void)(p), (void)(n))
#define FASTNN_POOL_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#include "fastnn/cpuinfo.h"

namespace fastnn {
namespace pool {
namespace {

constexpr size_t kHeader = 64;  // keeps the payload 64-byte aligned
constexpr size_t kPage = 4096;
constexpr uint64_t kMagic = 0xfa57'4e4e'b10c'b10cull;
// Large blocks are 2 MiB aligned and advised to use transparent huge pages,
// as NumPy's own allocator does from 4 MiB (fewer TLB misses on the big
// activations the kernels stream through).
constexpr size_t kHugeFrom = size_t{4} << 20, kHugeAlign = size_t{2} << 20;

struct Header {
  size_t capacity;   // payload bytes
  size_t requested;  // what the block's current owner asked for (<= capacity)
  uint64_t cached;   // when it entered the cache (a counter), while it is there
  uint64_t magic;
};

size_t default_limit() {
  // 1 GiB, or an eighth of physical memory where that is less.
  size_t limit = size_t{1} << 30;
#if defined(__linux__)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) limit = std::min(limit, static_cast<size_t>(pages) * page / 8);
#endif
  return limit;
}

class Pool {
 public:
  Pool() : limit_(default_limit()) {
    if (const char* env = std::getenv("FASTNN_MEMORY_POOL_LIMIT")) {
      int64_t bytes = 0;
      if (parse_size(env, bytes)) {
        limit_.store(static_cast<size_t>(bytes));
      } else {
        env_error_ = std::string("FASTNN_MEMORY_POOL_LIMIT ignored: '") + env +
                     "' is not a byte count like 0, 512M or 2G";
      }
    }
  }

  void* acquire(size_t bytes, bool zero) {
    if (bytes > (size_t{1} << 48)) return nullptr;  // no such block: avoids wrap-around below
    const size_t cap = (std::max<size_t>(bytes, 1) + kPage - 1) / kPage * kPage;
    Header* h = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Best fit within 1/8: a steady loop asks for the same sizes every step,
      // and a much larger block would hold memory a later request needs.
      auto it = by_size_.lower_bound(cap);
      if (it != by_size_.end() && it->first <= cap + cap / 8) {
        h = it->second;
        take(it);
        ++hits_;
        in_use_bytes_ += h->capacity;
        ++in_use_blocks_;
      } else {
        ++misses_;
      }
    }
    if (!h) {
      h = allocate(cap);
      if (!h) return nullptr;
      std::lock_guard<std::mutex> lock(mu_);
      in_use_bytes_ += h->capacity;
      ++in_use_blocks_;
    }
    return hand_out(h, bytes, zero);  // outside the lock: it may fill the block
  }

  void* resize(void* p, size_t bytes) {
    if (!p) return acquire(bytes, false);
    Header* h = header(p);
    if (bytes <= h->capacity) {
      FASTNN_POOL_UNPOISON(p, bytes);
      FASTNN_POOL_POISON(static_cast<char*>(p) + bytes, h->capacity - bytes);
      h->requested = bytes;
      return p;
    }
    void* q = acquire(bytes, false);
    if (!q) return nullptr;
    std::memcpy(q, p, h->requested);
    release(p);
    return q;
  }

  void release(void* p) {
    if (!p) return;
    Header* h = header(p);
    std::vector<Header*> evicted;
    bool keep = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_use_bytes_ -= h->capacity;
      --in_use_blocks_;
      const size_t limit = limit_.load(std::memory_order_relaxed);
      if (h->capacity <= limit) {
        // The oldest blocks make room: when a loop changes the sizes it asks
        // for (training, then evaluation at another batch size), the cache
        // follows instead of staying full of sizes nobody asks for any more.
        evict_oldest_until(limit - h->capacity, evicted);
        FASTNN_POOL_POISON(p, h->capacity);
        put(h);
        keep = true;
      }
    }
    for (Header* e : evicted) deallocate(e);
    if (!keep) deallocate(h);
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return Stats{hits_, misses_, cached_bytes_, by_size_.size(), in_use_bytes_, in_use_blocks_, limit()};
  }

  void set_limit(size_t bytes) {
    std::vector<Header*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit_.store(bytes, std::memory_order_relaxed);
      evict_oldest_until(bytes, evicted);
    }
    for (Header* e : evicted) deallocate(e);
  }

  // Frees every cached block; the limit stays (so outputs keep coming here).
  void clear() {
    std::vector<Header*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      evict_oldest_until(0, evicted);
    }
    for (Header* e : evicted) deallocate(e);
  }

  size_t limit() const { return limit_.load(std::memory_order_relaxed); }
  const std::string& env_error() const { return env_error_; }

 private:
  // The cache's two indexes, kept in step (callers hold mu_).
  void put(Header* h) {
    h->cached = ++clock_;
    by_size_.emplace(h->capacity, h);
    by_age_.emplace(h->cached, h);
    cached_bytes_ += h->capacity;
  }
  void take(std::multimap<size_t, Header*>::iterator it) {
    Header* h = it->second;
    by_age_.erase(h->cached);
    by_size_.erase(it);
    cached_bytes_ -= h->capacity;
  }
  void evict_oldest_until(size_t bytes, std::vector<Header*>& evicted) {
    while (cached_bytes_ > bytes) {
      Header* h = by_age_.begin()->second;
      auto range = by_size_.equal_range(h->capacity);
      for (auto it = range.first; it != range.second; ++it) {
        if (it->second == h) {
          take(it);
          break;
        }
      }
      evicted.push_back(h);
    }
  }

  static void* payload(Header* h) { return reinterpret_cast<char*>(h) + kHeader; }

  static void* hand_out(Header* h, size_t bytes, bool zero) {
    void* p = payload(h);
    h->requested = bytes;
    FASTNN_POOL_UNPOISON(p, bytes);
    FASTNN_POOL_POISON(static_cast<char*>(p) + bytes, h->capacity - bytes);
    if (zero) {
      std::memset(p, 0, bytes);
    } else if (poison_enabled()) {
      std::memset(p, 0xff, bytes);
    }
    return p;
  }

  static Header* header(void* p) {
    Header* h = reinterpret_cast<Header*>(static_cast<char*>(p) - kHeader);
    // A pointer from elsewhere would corrupt the cache: stop here instead.
    if (h->magic != kMagic) std::abort();
    return h;
  }

  static Header* allocate(size_t cap) {
    const size_t align = cap >= kHugeFrom ? kHugeAlign : kHeader;
    void* raw = nullptr;
    if (posix_memalign(&raw, align, cap + kHeader) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (cap >= kHugeFrom) madvise(raw, cap + kHeader, MADV_HUGEPAGE);
#endif
    Header* h = static_cast<Header*>(raw);
    h->capacity = cap;
    h->requested = 0;
    h->cached = 0;
    h->magic = kMagic;
    return h;
  }

  static void deallocate(Header* h) {
    FASTNN_POOL_UNPOISON(payload(h), h->capacity);
    h->magic = 0;
    std::free(h);
  }

  std::mutex mu_;
  std::multimap<size_t, Header*> by_size_;  // cached blocks: capacity -> block
  std::map<uint64_t, Header*> by_age_;      // the same blocks: Header::cached -> block
  uint64_t clock_ = 0;
  uint64_t hits_ = 0, misses_ = 0;
  size_t cached_bytes_ = 0, in_use_bytes_ = 0, in_use_blocks_ = 0;
  std::atomic<size_t> limit_;  // read without the lock by limit()
  std::string env_error_;
};

// Never destroyed: arrays freed during interpreter shutdown still return
// their blocks here after static destructors would have run.
Pool& the_pool() {
  static Pool* p = new Pool();
  return *p;
}

}  // namespace

void* acquire(size_t bytes) { return the_pool().acquire(bytes, false); }
void* acquire_zeroed(size_t bytes) { return the_pool().acquire(bytes, true); }
void* resize(void* p, size_t bytes) { return the_pool().resize(p, bytes); }
void release(void* p) { the_pool().release(p); }
Stats stats() { return the_pool().stats(); }
void set_limit(size_t bytes) { the_pool().set_limit(bytes); }
size_t limit() { return the_pool().limit(); }
void clear() { the_pool().clear(); }
std::string env_error() { return the_pool().env_error(); }

}  // namespace pool

bool poison_enabled() {
  static const bool on = std::getenv("FASTNN_POISON_SCRATCH") != nullptr;
  return on;
}

}  // namespace fastnn
