// Standalone correctness test and benchmark for csrc/kernels/gemm.cpp and the
// thread pool (csrc/parallel.cpp), compiled once per ISA (for baseline drop the
// -m flags; for AVX2 use -mavx2 -mfma -mf16c), e.g. for AVX-512:
//
//   g++ -O3 -std=c++17 -pthread -Icsrc -DFASTNN_ISA_NS=isa_avx512
//       -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512dq -mavx512vl
//       -mprefer-vector-width=512 tools/gemm_bench.cpp csrc/kernels/gemm.cpp
//       csrc/parallel.cpp csrc/cpuinfo.cpp csrc/memory_pool.cpp -o build/gemm_bench_avx512
//   build/gemm_bench_avx512 test      # gemm correctness; exit status 0 = passed
//   build/gemm_bench_avx512 pool      # thread-pool tests (fork, nesting, ...)
//   build/gemm_bench_avx512 bench f32 0,0,256,256,256 0,1,128,128,5408
//       (specs are trans_a,trans_b,M,N,K; prints best time and GFLOP/s)
//
// Options before the mode: --threads N (pool size), --seconds S (per size),
// --cpu (time with process CPU time instead of wall clock).
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "fastnn/parallel.h"
#include "kernels/gemm.h"

using fastnn::FASTNN_ISA_NS::gemm;

namespace {

#define STR2(x) #x
#define STR(x) STR2(x)

int g_failures = 0;

template <typename T>
struct Case {
  bool ta, tb;
  int64_t M, N, K;
  int64_t pad_a, pad_b, pad_c;  // extra row stride beyond the logical width
  bool accumulate;
};

// Runs one case against a long-double reference; checks the result, that the
// padding of C is untouched, and that C is not read when overwriting (it is
// pre-filled with NaN).
template <typename T>
bool run_case(const Case<T>& c, std::mt19937& rng) {
  const int64_t arows = c.ta ? c.K : c.M, acols = c.ta ? c.M : c.K;
  const int64_t brows = c.tb ? c.N : c.K, bcols = c.tb ? c.K : c.N;
  const int64_t lda = acols + c.pad_a, ldb = bcols + c.pad_b, ldc = c.N + c.pad_c;
  std::uniform_real_distribution<double> U(-1.0, 1.0);
  std::vector<T> A(size_t(std::max<int64_t>(1, arows * lda)));
  std::vector<T> B(size_t(std::max<int64_t>(1, brows * ldb)));
  std::vector<T> C(size_t(std::max<int64_t>(1, c.M * ldc)));
  // Padding of A/B holds huge values so that reading it shows in the result.
  for (int64_t i = 0; i < arows; ++i)
    for (int64_t j = 0; j < lda; ++j) A[i * lda + j] = j < acols ? T(U(rng)) : T(1e30);
  for (int64_t i = 0; i < brows; ++i)
    for (int64_t j = 0; j < ldb; ++j) B[i * ldb + j] = j < bcols ? T(U(rng)) : T(1e30);
  const T sentinel = T(-12345.5);
  for (int64_t i = 0; i < c.M; ++i)
    for (int64_t j = 0; j < ldc; ++j)
      C[i * ldc + j] = j >= c.N                ? sentinel
                       : c.accumulate          ? T(U(rng))
                                               : std::numeric_limits<T>::quiet_NaN();
  std::vector<T> C0 = C;
  gemm<T>(c.ta, c.tb, c.M, c.N, c.K, A.data(), lda, B.data(), ldb, C.data(), ldc, c.accumulate);
  const double eps = std::numeric_limits<T>::epsilon();
  for (int64_t i = 0; i < c.M; ++i) {
    for (int64_t j = 0; j < ldc; ++j) {
      const T got = C[i * ldc + j];
      if (j >= c.N) {
        if (!(got == sentinel)) {
          std::printf("FAIL padding of C written at (%ld,%ld)\n", long(i), long(j));
          return false;
        }
        continue;
      }
      long double ref = c.accumulate ? (long double)C0[i * ldc + j] : 0.0L;
      long double mag = std::fabs(double(ref));
      for (int64_t k = 0; k < c.K; ++k) {
        long double a = c.ta ? A[k * lda + i] : A[i * lda + k];
        long double b = c.tb ? B[j * ldb + k] : B[k * ldb + j];
        ref += a * b;
        mag += std::fabs(double(a * b));
      }
      const double tol = 4.0 * eps * double(mag) * std::sqrt(double(c.K) + 1.0) + 1e-30;
      if (!(std::fabs(double(got - ref)) <= tol)) {
        std::printf("FAIL at (%ld,%ld): got %.9g want %.9g (tol %.3g)\n", long(i), long(j),
                    double(got), double(ref), tol);
        return false;
      }
    }
  }
  return true;
}

template <typename T>
void check(const Case<T>& c, std::mt19937& rng, const char* tname) {
  if (!run_case(c, rng)) {
    ++g_failures;
    std::printf("  case %s ta=%d tb=%d M=%ld N=%ld K=%ld pads=%ld,%ld,%ld acc=%d threads=%d\n",
                tname, c.ta, c.tb, long(c.M), long(c.N), long(c.K), long(c.pad_a),
                long(c.pad_b), long(c.pad_c), c.accumulate, fastnn::get_num_threads());
  }
}

template <typename T>
int test_type(const char* tname) {
  std::mt19937 rng(1234);
  const int before = g_failures;
  int ncases = 0;
  const int64_t sizes[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 47, 64, 100};
  // Every transpose combination over odd and even small sizes (the unpacked
  // path and its ragged edges), with and without padded strides.
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (int64_t M : sizes)
        for (int64_t N : sizes) {
          const int64_t K = sizes[(M * 7 + N * 3) % 14];
          const int64_t pad = (M + N) % 3 == 0 ? 0 : 5;
          const bool acc = (M + 2 * N) % 2 == 1;
          check<T>({bool(ta), bool(tb), M, N, K, pad, pad + 1, pad + 2, acc}, rng, tname);
          ++ncases;
        }
  // K sweep including 0 and sizes around the KC block.
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (int64_t K : {0, 1, 5, 255, 256, 257, 513, 700})
        for (int acc = 0; acc < 2; ++acc) {
          check<T>({bool(ta), bool(tb), 37, 45, K, 3, 0, 1, bool(acc)}, rng, tname);
          ++ncases;
        }
  // Larger problems: packed path with several MC/NC/KC blocks and ragged edges.
  const int64_t big[][3] = {{130, 200, 300}, {257, 520, 260}, {300, 129, 600},
                            {64, 1100, 70},  {1, 700, 700},   {700, 1, 300},
                            {128, 128, 1500}, {521, 300, 257}, {16, 20, 2000},
                            {3, 40, 1100}, {300, 5, 2100}, {2000, 9, 300}};
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (auto& s : big)
        for (int acc = 0; acc < 2; ++acc) {
          check<T>({bool(ta), bool(tb), s[0], s[1], s[2], acc ? 3 : 0, acc ? 0 : 7, acc, bool(acc)},
                   rng, tname);
          ++ncases;
        }
  // M == 0 / N == 0 must be a no-op (C untouched, nothing read).
  {
    T c[4] = {1, 2, 3, 4};
    gemm<T>(false, false, 0, 2, 3, nullptr, 3, nullptr, 2, c, 2, false);
    gemm<T>(true, true, 2, 0, 3, nullptr, 2, nullptr, 3, c, 2, false);
    if (c[0] != 1 || c[3] != 4) {
      std::printf("FAIL M==0/N==0 touched C\n");
      ++g_failures;
    }
    ncases += 2;
  }
  std::printf("%s: %d cases, %d failures (threads=%d)\n", tname, ncases, g_failures - before,
              fastnn::get_num_threads());
  return g_failures - before;
}

int run_tests() {
  for (int nt : {fastnn::get_num_threads(), 1, 3}) {
    fastnn::set_num_threads(nt);
    test_type<float>("f32");
    test_type<double>("f64");
  }
  // A gemm inside a parallel_for chunk runs serially on that thread.
  {
    fastnn::set_num_threads(2);
    std::atomic<int> bad{0};
    fastnn::parallel_for(4, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        std::mt19937 rng{uint32_t(t)};
        if (!run_case<float>({false, true, 200, 150, 300, 0, 0, 0, false}, rng)) ++bad;
      }
    });
    if (bad) {
      std::printf("FAIL nested gemm\n");
      ++g_failures;
    }
  }
  std::printf(g_failures ? "FAILED (%d)\n" : "all gemm tests passed\n", g_failures);
  return g_failures != 0;
}

// ---------------------------------------------------------------------------
// Thread-pool tests.
// ---------------------------------------------------------------------------
bool covers_once(int64_t n, int64_t grain) {
  std::vector<std::atomic<int>> hits(size_t(std::max<int64_t>(n, 1)));
  for (auto& h : hits) h = 0;
  fastnn::parallel_for(n, grain, [&](int64_t b, int64_t e) {
    if (e - b < std::min<int64_t>(std::max<int64_t>(grain, 1), n)) hits[0] += 1000;  // too small
    for (int64_t i = b; i < e; ++i) hits[size_t(i)]++;
  });
  for (int64_t i = 0; i < n; ++i)
    if (hits[size_t(i)] != 1) return false;
  return true;
}

int run_pool_tests() {
  int fails = 0;
  auto expect = [&](bool ok, const char* what) {
    if (!ok) {
      std::printf("FAIL %s\n", what);
      ++fails;
    }
  };
  for (int64_t n : {0, 1, 2, 3, 7, 100, 1000})
    for (int64_t g : {0, 1, 5, 1000}) expect(covers_once(n, g), "coverage");
  {
    std::atomic<long> sum{0};
    fastnn::parallel_for(4, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        fastnn::parallel_for(10, 1, [&](int64_t b2, int64_t e2) { sum += e2 - b2; });
    });
    expect(sum == 40, "nested");
  }
  {
    std::vector<std::thread> ts;
    std::atomic<int> bad{0};
    for (int k = 0; k < 4; ++k)
      ts.emplace_back([&] {
        for (int r = 0; r < 2000; ++r) bad += !covers_once(37, 3);
      });
    for (auto& th : ts) th.join();
    expect(bad == 0, "concurrent callers");
  }
  for (int nt : {1, 3, 2, 8, 2}) {
    fastnn::set_num_threads(nt);
    expect(fastnn::get_num_threads() == nt, "get_num_threads");
    expect(covers_once(1000, 1), "coverage after resize");
    std::atomic<int> chunks{0};
    fastnn::parallel_for(1000, 1, [&](int64_t, int64_t) { chunks++; });
    expect(chunks == nt, "chunk count == threads");
  }
  {
    bool threw = false;
    try {
      fastnn::set_num_threads(0);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    expect(threw, "set_num_threads(0) throws");
  }
  {
    // fork() while another thread is in the middle of jobs: the child gets a
    // fresh pool that works (2 chunks) and never deadlocks.
    std::atomic<bool> stop{false};
    std::thread bg([&] {
      while (!stop) covers_once(1000, 1);
    });
    for (int k = 0; k < 20; ++k) {
      pid_t pid = fork();
      if (pid == 0) {
        bool ok = covers_once(1000, 1) && covers_once(5, 1);
        std::atomic<int> chunks{0};
        fastnn::parallel_for(100, 1, [&](int64_t, int64_t) { chunks++; });
        _exit(ok && chunks == 2 ? 0 : 1);
      }
      int st = 0;
      waitpid(pid, &st, 0);
      expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "forked child");
    }
    stop = true;
    bg.join();
  }
  {
    bool caught = false;
    try {
      fastnn::parallel_for(10, 1, [](int64_t b, int64_t) {
        if (b > 0) throw 5;
      });
    } catch (int) {
      caught = true;
    }
    expect(caught, "exception propagates");
    expect(covers_once(10, 1), "pool usable after exception");
  }
  {
    // Latency of an almost empty 2-chunk job (workers spinning).
    const int R = 20000;
    std::atomic<long> x{0};
    auto t = std::chrono::steady_clock::now();
    for (int r = 0; r < R; ++r) fastnn::parallel_for(2, 1, [&](int64_t b, int64_t e) { x += e - b; });
    double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t).count();
    std::printf("empty parallel_for: %.3f us/call\n", us / R);
  }
  std::printf(fails ? "pool: FAILED (%d)\n" : "pool: all tests passed\n", fails);
  return fails != 0;
}

// ---------------------------------------------------------------------------
// Benchmark.
// ---------------------------------------------------------------------------
// Wall-clock seconds, or process CPU seconds with --cpu: on a shared, busy
// machine CPU time is unaffected by preemption, which makes single-thread
// tuning runs comparable (with several threads it also counts spinning).
bool g_cpu_time = false;
double now_s() {
  if (g_cpu_time) {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

template <typename T>
void bench_one(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double seconds) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  std::vector<T> A(size_t(M * K)), B(size_t(K * N)), C(size_t(M * N));
  for (auto& v : A) v = T(U(rng));
  for (auto& v : B) v = T(U(rng));
  const int64_t lda = ta ? M : K, ldb = tb ? K : N;
  auto call = [&] { gemm<T>(ta, tb, M, N, K, A.data(), lda, B.data(), ldb, C.data(), N, false); };
  call();
  const double flops = 2.0 * double(M) * double(N) * double(K);
  int64_t reps = std::max<int64_t>(1, int64_t(0.02e9 / std::max(flops, 1.0)));
  reps = std::min<int64_t>(reps, 20000);
  double best = 1e30;
  auto t_end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  int rounds = 0;
  while (rounds < 3 || std::chrono::steady_clock::now() < t_end) {
    const double t0 = now_s();
    for (int64_t r = 0; r < reps; ++r) call();
    const double s = now_s() - t0;
    best = std::min(best, s / double(reps));
    if (++rounds > 1000) break;
  }
  std::printf("%d,%d,%ld,%ld,%ld %.2fus %.1fGF\n", ta, tb, long(M), long(N), long(K), best * 1e6,
              flops / best / 1e9);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  int i = 1;
  double seconds = 0.3;
  while (i < argc && argv[i][0] == '-') {
    std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) {
      fastnn::set_num_threads(std::atoi(argv[i + 1]));
      i += 2;
    } else if (a == "--cpu") {
      g_cpu_time = true;
      i += 1;
    } else if (a == "--seconds" && i + 1 < argc) {
      seconds = std::atof(argv[i + 1]);
      i += 2;
    } else {
      break;
    }
  }
  if (i >= argc) {
    std::fprintf(stderr, "usage: %s [--threads N] [--seconds S] test|pool|bench f32|f64 specs...\n",
                 argv[0]);
    return 2;
  }
  std::string mode = argv[i++];
  std::printf("ISA namespace %s, %d threads\n", STR(FASTNN_ISA_NS), fastnn::get_num_threads());
  if (mode == "test") return run_tests();
  if (mode == "pool") return run_pool_tests();
  if (mode == "bench" && i < argc) {
    bool f64 = std::string(argv[i++]) == "f64";
    for (; i < argc; ++i) {
      int ta, tb;
      long M, N, K;
      if (std::sscanf(argv[i], "%d,%d,%ld,%ld,%ld", &ta, &tb, &M, &N, &K) != 5) {
        std::fprintf(stderr, "bad spec %s\n", argv[i]);
        return 2;
      }
      if (f64) {
        bench_one<double>(ta, tb, M, N, K, seconds);
      } else {
        bench_one<float>(ta, tb, M, N, K, seconds);
      }
    }
    return 0;
  }
  std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
  return 2;
}
