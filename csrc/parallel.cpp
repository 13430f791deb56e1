// The fork-safe thread pool declared in fastnn/parallel.h.
//
// Design (see the header for the contract):
// * One process-wide State holds the worker threads. It is created at load time
//   and replaced (the old one deliberately leaked) in a forked child, because the
//   child inherits the memory but none of the threads: destroying joinable
//   std::threads there would call std::terminate, and any mutex the parent held
//   at fork time would stay locked forever.
// * A job is split into at most get_num_threads() contiguous chunks. Chunks are
//   claimed dynamically from one 64-bit atomic that packs (generation, next
//   chunk, chunk count), so a worker that wakes late can never claim a chunk of a
//   newer job, and the caller simply runs every chunk itself if the workers are
//   slow to wake (an oversubscribed machine cannot stall it).
// * Workers poll for ~2 ms after a job (back-to-back kernels, e.g. one gemm per
//   layer, then see the next job within nanoseconds; see spin_time) and then
//   sleep on a condition variable so an idle pool costs no CPU. park_workers()
//   ends the polling early, when other threaded code is about to run.
// * Forking from inside a parallel_for body is not supported (the child would
//   wait for chunks owned by threads it does not have).
// * The caller owns the pool for the duration of a job through try_lock; a
//   concurrent caller (another Python thread) or a nested call (a chunk that
//   calls parallel_for) runs its loop serially instead of waiting.
#include "fastnn/parallel.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FASTNN_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define FASTNN_CPU_RELAX() asm volatile("yield" ::: "memory")
#else
#define FASTNN_CPU_RELAX() ((void)0)
#endif

namespace fastnn {
namespace {

constexpr int kMaxThreads = 1024;
// How long an idle worker polls for the next job before it sleeps. On a
// virtual machine a sleeping worker can take milliseconds to wake (its vCPU is
// halted), and the caller then runs every chunk itself, which leaves the
// worker idle again: long enough polling keeps back-to-back kernels (a layer's
// forward, its backward, the optimizer step) on all threads. OpenBLAS polls far
// longer (~0.1 s). FASTNN_SPIN_US overrides it (0 = sleep at once).
std::chrono::microseconds spin_time() {
  long us = 2000;
  if (const char* env = std::getenv("FASTNN_SPIN_US")) {
    char* end = nullptr;
    long v = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && v >= 0) us = std::min<long>(v, 1000000);
  }
  return std::chrono::microseconds(us);
}

// Set on pool workers (always) and on a caller while it runs a job, so nested
// parallel_for calls run serially (and never try_lock a mutex they own).
thread_local bool t_in_parallel = false;

int default_num_threads() {
  if (const char* env = std::getenv("OMP_NUM_THREADS")) {
    // OMP_NUM_THREADS may be a list ("4,2"); the first level is ours.
    char* end = nullptr;
    long v = std::strtol(env, &end, 10);
    if (end != env && (*end == '\0' || *end == ',') && v >= 1) {
      return static_cast<int>(std::min<long>(v, kMaxThreads));
    }
  }
#if defined(__linux__)
  // The CPUs this process may run on (taskset, cgroup cpusets), not all of them.
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int c = CPU_COUNT(&set);
    if (c >= 1) return std::min(c, kMaxThreads);
  }
#endif
  unsigned hc = std::thread::hardware_concurrency();
  return hc >= 1 ? static_cast<int>(std::min<unsigned>(hc, kMaxThreads)) : 1;
}

// job_ packs: bits 63..32 generation, 31..16 next chunk, 15..0 chunk count.
constexpr uint64_t pack(uint32_t gen, uint32_t next, uint32_t count) {
  return (uint64_t(gen) << 32) | (uint64_t(next) << 16) | uint64_t(count);
}

class State {
 public:
  std::atomic<int> desired{0};  // 0 = not yet read from the environment

  int num_threads() {
    int d = desired.load(std::memory_order_relaxed);
    if (d == 0) {
      int v = default_num_threads();
      // Racing initialisers compute the same value; keep whichever wins.
      desired.compare_exchange_strong(d, v);
      d = desired.load(std::memory_order_relaxed);
    }
    return d;
  }

  // Idle workers stop polling and sleep now (see park_workers in the header): a
  // worker that has seen the newest job sleeps once it finds that job parked. A
  // level, not an edge, so a worker still finishing (or not yet woken for) that
  // job when park() runs also sleeps; a newer job wakes them all as usual.
  void park() {
    park_gen_.store(wake_gen_.load(std::memory_order_acquire), std::memory_order_release);
  }

  void run(int64_t n, int64_t grain,
           const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    int nt = num_threads();
    int64_t max_chunks = std::max<int64_t>(1, n / grain);
    int64_t chunks = std::min<int64_t>(nt, max_chunks);
    if (chunks <= 1 || t_in_parallel || !owner_.try_lock()) {
      serial(n, fn);
      return;
    }
    std::lock_guard<std::mutex> own(owner_, std::adopt_lock);
    t_in_parallel = true;
    struct Reset {
      ~Reset() { t_in_parallel = false; }
    } reset;

    resize_locked(nt);
    chunks = std::min<int64_t>(chunks, int64_t(workers_.size()) + 1);
    if (chunks <= 1) {
      fn(0, n);
      return;
    }

    fn_ = &fn;
    n_ = n;
    error_ = nullptr;
    done_.store(0, std::memory_order_relaxed);
    uint32_t gen = ++gen_counter_;
    job_.store(pack(gen, 0, uint32_t(chunks)), std::memory_order_release);
    wake(gen);

    // The caller claims chunks like any worker, then waits only for chunks
    // already in flight on other threads.
    work_on(gen);
    int spins = 0;
    while (done_.load(std::memory_order_acquire) != chunks) {
      if (++spins < 4096) {
        FASTNN_CPU_RELAX();
      } else {
        std::this_thread::yield();
      }
    }
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static void serial(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    bool was = t_in_parallel;
    t_in_parallel = true;
    struct Reset {
      bool was;
      ~Reset() { t_in_parallel = was; }
    } reset{was};
    fn(0, n);
  }

  // Claims and runs chunks of job `gen` until none are left.
  void work_on(uint32_t gen) {
    uint64_t v = job_.load(std::memory_order_acquire);
    for (;;) {
      if (uint32_t(v >> 32) != gen) return;
      uint32_t next = uint32_t(v >> 16) & 0xffff;
      uint32_t count = uint32_t(v) & 0xffff;
      if (next >= count) return;
      if (!job_.compare_exchange_weak(v, pack(gen, next + 1, count),
                                      std::memory_order_acq_rel,
                                      std::memory_order_acquire)) {
        continue;
      }
      // The job cannot finish before this chunk is counted done, so fn_/n_ are
      // stable here.
      int64_t b = n_ * next / count;
      int64_t e = n_ * (next + 1) / count;
      try {
        (*fn_)(b, e);
      } catch (...) {
        std::lock_guard<std::mutex> lk(error_mu_);
        if (!error_) error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_acq_rel);
      v = job_.load(std::memory_order_acquire);
    }
  }

  void wake(uint32_t gen) {
    wake_gen_.store(gen, std::memory_order_seq_cst);
    // Pairs with the sleepers_ increment in worker_loop (Dekker style): either
    // the sleeper sees the new generation, or we see the sleeper and notify.
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lk(cv_mu_); }
      cv_.notify_all();
    }
  }

  void worker_loop(int index) {
    t_in_parallel = true;
    const auto spin = spin_time();
    uint32_t seen = wake_gen_.load(std::memory_order_acquire);
    for (;;) {
      auto until = std::chrono::steady_clock::now() + spin;
      int polls = 0;
      while (wake_gen_.load(std::memory_order_acquire) == seen &&
             !stop_.load(std::memory_order_relaxed)) {
        FASTNN_CPU_RELAX();
        if ((++polls & 63) == 0 && (park_gen_.load(std::memory_order_acquire) == seen ||
                                    std::chrono::steady_clock::now() > until)) {
          std::unique_lock<std::mutex> lk(cv_mu_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          while (wake_gen_.load(std::memory_order_seq_cst) == seen &&
                 !stop_.load(std::memory_order_relaxed)) {
            cv_.wait(lk);
          }
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
          break;
        }
      }
      if (stop_.load(std::memory_order_relaxed) && index >= stop_from_) return;
      seen = wake_gen_.load(std::memory_order_acquire);
      work_on(seen);
    }
  }

  // Makes the pool hold nt - 1 workers. Caller holds owner_.
  void resize_locked(int nt) {
    size_t want = size_t(std::max(1, nt) - 1);
    if (workers_.size() == want) return;
    if (workers_.size() > want) {
      stop_from_ = int(want);
      stop_.store(true, std::memory_order_seq_cst);
      {
        std::lock_guard<std::mutex> lk(cv_mu_);
      }
      cv_.notify_all();
      for (size_t i = want; i < workers_.size(); ++i) workers_[i].join();
      workers_.resize(want);
      stop_.store(false, std::memory_order_seq_cst);
      // Survivors may have woken on stop_; they go back to waiting for a
      // generation they have already seen, which is correct.
      stop_from_ = kMaxThreads;
      return;
    }
    workers_.reserve(want);
    for (size_t i = workers_.size(); i < want; ++i) {
      workers_.emplace_back([this, i] { worker_loop(int(i)); });
    }
  }

  std::mutex owner_;  // held by the thread whose job is running
  std::vector<std::thread> workers_;
  std::atomic<bool> stop_{false};
  std::atomic<int> stop_from_{kMaxThreads};  // workers with index >= this exit on stop_

  // Current job (written by the owner before publishing job_).
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<uint64_t> job_{0};
  std::atomic<int64_t> done_{0};
  uint32_t gen_counter_ = 0;
  std::mutex error_mu_;
  std::exception_ptr error_;

  std::atomic<uint32_t> wake_gen_{0};
  // The job generation park() found newest; pollers that have seen it sleep.
  std::atomic<uint32_t> park_gen_{~uint32_t(0)};
  std::atomic<int> sleepers_{0};
  std::mutex cv_mu_;
  std::condition_variable cv_;
};

// Never deleted: a forked child abandons the parent's State (see the top).
std::atomic<State*> g_state{nullptr};

State& state() {
  State* s = g_state.load(std::memory_order_acquire);
  if (s) return *s;
  State* fresh = new State();
  if (g_state.compare_exchange_strong(s, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;  // lost the race; it never started a thread
  return *s;
}

void atfork_child() {
  // The child has only the forking thread. Abandon (leak) the parent's pool:
  // its workers do not exist here and its mutexes may be locked forever. A
  // fresh State is created on first use. The thread count the parent chose
  // carries over.
  State* old = g_state.load(std::memory_order_relaxed);
  int keep = old ? old->desired.load(std::memory_order_relaxed) : 0;
  g_state.store(nullptr, std::memory_order_relaxed);
  t_in_parallel = false;
  if (keep > 0) state().desired.store(keep, std::memory_order_relaxed);
}

struct Init {
  Init() {
    state();
    pthread_atfork(nullptr, nullptr, atfork_child);
  }
} g_init;

}  // namespace

int get_num_threads() { return state().num_threads(); }

// Not (yet) declared in fastnn/parallel.h; kernels declare it themselves.
bool in_parallel_region() { return t_in_parallel; }

void set_num_threads(int n) {
  if (n < 1) {
    throw std::invalid_argument("set_num_threads: n must be >= 1, got " + std::to_string(n));
  }
  // Applied by the next parallel_for that owns the pool (resizing needs the
  // owner lock, which a nested or concurrent caller may not get).
  state().desired.store(std::min(n, kMaxThreads), std::memory_order_relaxed);
}

void parallel_for(int64_t n, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& fn) {
  state().run(n, grain, fn);
}

void park_workers() { state().park(); }

}  // namespace fastnn
