// A small fork-safe thread pool. It is ours rather than OpenMP's so that the
// thread count is independent of NumPy's OpenBLAS pool (no oversubscription),
// calls from several Python threads at once stay correct (a busy pool runs the
// caller's loop serially), and a fork() in a process that has used the pool
// gives the child a fresh, working pool instead of a hang.
#pragma once

#include <cstdint>
#include <functional>

namespace fastnn {

int get_num_threads();
void set_num_threads(int n);

// Calls fn(begin, end) on disjoint chunks covering [0, n). Chunks are at least
// `grain` iterations; the calling thread takes part. Nested calls run serially.
void parallel_for(int64_t n, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& fn);

// Idle workers stop polling for the next job and sleep now (they otherwise poll
// ~2 ms after each job, on cores that another thread pool, e.g. PyTorch's
// OpenMP, may be about to use). The next parallel_for wakes them.
void park_workers();

// True inside a parallel_for body or on a pool worker, where a nested
// parallel_for would run its chunks serially anyway (kernels plan for 1 thread).
bool in_parallel_region();

}  // namespace fastnn
