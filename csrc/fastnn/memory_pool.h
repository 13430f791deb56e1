// A cache of large freed blocks for the arrays the kernels return.
//
// Why: a training step allocates the same activations and gradients every
// step and frees them a step later. glibc serves blocks this large by mmap,
// or trims them off the top of its heap once a few MB are free, so the pages
// come back zero-filled and every first touch faults: on the `strong` preset
// about 6,300 faults and 20+ ms of system time per 55 ms step, in a user's own
// training loop (the CLI also tunes glibc, fastnn/_malloc.py). Blocks kept
// here are reused with their pages mapped.
//
// Blocks carry a 64-byte header (their capacity), so release() and resize()
// need only the pointer. Thread-safe (one mutex; a block is at least
// kMinBytes, so the lock is rare next to the work on the memory).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace fastnn {
namespace pool {

// Smaller arrays never come here: glibc's heap serves them without faults.
constexpr size_t kMinBytes = size_t{256} << 10;

// A 64-byte aligned block of at least `bytes` bytes (a cached one when one of
// bytes .. 9/8 bytes, rounded to pages, is free), or nullptr when out of memory.
void* acquire(size_t bytes);
// acquire(), zero-filled.
void* acquire_zeroed(size_t bytes);
// realloc semantics for a block from acquire(): the first min(old, new) bytes
// move to a block of `bytes` (p itself when it is large enough); nullptr, with
// p untouched, when out of memory.
void* resize(void* p, size_t bytes);
// Returns a block from acquire() to the cache, whose oldest blocks go back to
// the system as far as needed to stay within the limit; a block larger than
// the limit goes back itself. nullptr is ignored.
void release(void* p);

struct Stats {
  uint64_t hits;           // acquire() served from the cache
  uint64_t misses;         // acquire() served by the system
  uint64_t cached_bytes;   // free blocks held now
  uint64_t cached_blocks;
  uint64_t in_use_bytes;   // blocks handed out and not yet released
  uint64_t in_use_blocks;
  uint64_t limit;          // most bytes the cache holds (0: off)
};
Stats stats();
// Sets the limit and frees cached blocks past it, oldest first.
void set_limit(size_t bytes);
// The limit (cheap: no lock). Callers take no block from the pool while it is 0.
size_t limit();
// Frees every cached block.
void clear();

// The limit starts at min(1 GiB, physical memory / 8), or FASTNN_MEMORY_POOL_LIMIT
// (a byte count like 0, 512M or 2G; 0 turns caching off). Why that variable
// was ignored, or "".
std::string env_error();

}  // namespace pool

// Whether FASTNN_POISON_SCRATCH is set (read once). Fresh kernel scratch
// (kernels/ops.h) and every output block the pool hands out (new or reused)
// are then filled with all-ones bytes, NaN as float32 and float64, so that an
// element a kernel never wrote reaches the tests as NaN instead of whatever
// the memory held (AddressSanitizer does not report such reads).
// tools/sanitize.sh sets it. Defined out of line: one copy for all ISA builds.
bool poison_enabled();

}  // namespace fastnn
