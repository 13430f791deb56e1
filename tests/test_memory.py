"""Memory behaviour of the kernels, through ``fastnn.functional``.

* 10,000 calls on small shapes (forward, backward, optimizer steps and calls
  rejected as bad input) do not grow the resident set beyond a small bound
  (/proc/self/statm, after a warm-up).
* The bindings hold no references: inputs' reference counts are unchanged after
  many calls (successful or failing) and every result is freed when dropped.
* An output that cannot be allocated (petabytes, or more elements than int64
  can count) raises MemoryError or ValueError on every backend; no segfault, no
  silent overflow.
"""

from __future__ import annotations

import gc
import os
import sys
import weakref

import numpy as np
import pytest
from conftest import HOST_BACKENDS, NATIVE

import fastnn
import fastnn.functional as F

# ASan's quarantine keeps freed memory resident on purpose: RSS bounds mean
# nothing in a sanitizer build (tools/sanitize.sh sets this).
SANITIZED = os.environ.get("FASTNN_SANITIZED") == "1"
CALLS = 10_000
RSS_BOUND = 24 * 2**20  # bytes of growth tolerated over 10,000 calls


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _workload(dtype=np.float32):
    """A cycle of small calls; each output is a few KB so a leaked output per call
    (or a leaked workspace) shows up as tens of MB."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 16, 16)).astype(dtype)
    w = rng.standard_normal((8, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(8).astype(dtype)
    gy = rng.standard_normal((2, 8, 16, 16)).astype(dtype)
    a, m = rng.standard_normal((32, 24)).astype(dtype), rng.standard_normal((24, 40)).astype(dtype)
    logits, labels = rng.standard_normal((32, 10)).astype(dtype), rng.integers(0, 10, 32)
    p, g = rng.standard_normal(1000).astype(dtype), rng.standard_normal(1000).astype(dtype)
    buf, ea, eas = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    xt = x.transpose(0, 1, 3, 2)  # non-contiguous: exercises the copy path
    bad = x.astype(np.int32)
    calls = [
        lambda: F.conv2d(x, w, b, padding=1),
        lambda: F.conv2d_backward(gy, x, w, padding=1),
        lambda: F.conv2d(xt, w, None, stride=2),
        lambda: F.matmul(a, m),
        lambda: F.matmul_backward(np.ones((32, 40), dtype), a, m),
        lambda: F.linear(a, m.T, None),
        lambda: F.max_pool2d(x, 2),
        lambda: F.max_pool2d_backward(np.ones((2, 3, 8, 8), dtype), x, 2),
        lambda: F.avg_pool2d(x, 3, 2, 1),
        lambda: F.avg_pool2d_backward(np.ones((2, 3, 8, 8), dtype), x, 3, 2, 1),
        lambda: F.relu_backward(gy, F.relu(gy)),
        lambda: F.softmax_cross_entropy(logits, labels),
        lambda: F.sgd_step(p, g, buf, 1e-3, momentum=0.9),
        lambda: F.adam_step(p, g, ea, eas, 1, 1e-3),
    ]
    errors = [
        lambda: F.conv2d(bad, w),                       # wrong dtype
        lambda: F.conv2d(x, w, None, stride=0),         # bad geometry
        lambda: F.matmul(a, a),                         # shape mismatch
        lambda: F.softmax_cross_entropy(logits, labels + 10),  # labels out of range
    ]
    return calls, errors, (x, w, b, gy, a, m, logits, labels, p, g, buf, ea, eas, xt, bad)


def _run(calls, errors, n: int) -> None:
    for i in range(n):
        if i % 8 == 7:
            try:
                errors[(i // 8) % len(errors)]()
            except (TypeError, ValueError):
                pass
            else:
                raise AssertionError("bad input was accepted")
        else:
            calls[i % len(calls)]()


@pytest.mark.skipif(SANITIZED, reason="RSS is meaningless under ASan (quarantine)")
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_rss_stays_bounded_over_10000_calls(backend: str) -> None:
    calls, errors, _ = _workload()
    with fastnn.backend(backend):
        _run(calls, errors, 1000)  # warm-up: allocator arenas, caches, thread pool
        gc.collect()
        before = rss_bytes()
        _run(calls, errors, CALLS)
        gc.collect()
        grown = rss_bytes() - before
    assert grown < RSS_BOUND, f"RSS grew by {grown / 2**20:.1f} MiB over {CALLS} calls"


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_no_reference_leaks(backend: str) -> None:
    calls, errors, inputs = _workload()
    with fastnn.backend(backend):
        _run(calls, errors, 100)
        gc.collect()
        counts = [sys.getrefcount(a) for a in inputs]
        _run(calls, errors, 2000)
        gc.collect()
        assert [sys.getrefcount(a) for a in inputs] == counts, "an input gained references"
        refs = []
        for fn in calls[:-2]:  # the optimizer steps return None
            out = fn()
            for o in out if isinstance(out, tuple) else (out,):
                if isinstance(o, np.ndarray):
                    refs.append(weakref.ref(o.base if o.base is not None else o))
            del out, o
        gc.collect()
        alive = [r for r in refs if r() is not None]
        assert not alive, f"{len(alive)} results are still referenced after being dropped"


@pytest.mark.skipif(not NATIVE, reason="fastnn._C is not built")
def test_native_error_paths_hold_no_references() -> None:
    """The bindings re-check their arguments; raising must not leak the inputs."""
    from fastnn import _C

    x = np.zeros((1, 1, 4, 4), np.float32)
    w = np.zeros((1, 1, 3, 3), np.float64)  # dtype mismatch: rejected by _C
    nc = np.zeros((1, 1, 4, 8), np.float32)[..., ::2]  # not contiguous

    def fail_many() -> None:  # a function, so no loop variable keeps a reference
        for _ in range(2000):
            for args in ((x, w, None, (1, 1), (0, 0), (1, 1), 1),
                         (nc, x[:, :, :3, :3].copy(), None, (1, 1), (0, 0), (1, 1), 1)):
                with pytest.raises((TypeError, ValueError)):
                    _C.conv2d(*args)
            with pytest.raises((TypeError, ValueError)):
                _C.relu(nc)

    fail_many()
    gc.collect()
    before = [sys.getrefcount(a) for a in (x, w, nc)]
    fail_many()
    gc.collect()
    assert [sys.getrefcount(a) for a in (x, w, nc)] == before


# --------------------------------------------------------------------------
# outputs that cannot be allocated
# --------------------------------------------------------------------------

PB = 2**50


def _huge_cases():
    one = np.ones((1, 1, 1, 1), np.float32)
    col = np.broadcast_to(np.ones((1, 1), np.float32), (2**24, 1))  # 0-stride, 4 bytes
    row = np.broadcast_to(np.ones((1, 1), np.float32), (1, 2**24))
    return {
        # 2**25 x 2**25 output pixels: 4 PiB of float32.
        "conv2d_4PiB": lambda: F.conv2d(one, one, padding=2**24),
        # (2**32)**2 outputs: more elements than int64 indexing can address safely.
        "conv2d_2pow64_elems": lambda: F.conv2d(one, one, padding=2**31),
        # Padding that overflows int64 when doubled inside a kernel.
        "conv2d_pad_2pow62": lambda: F.conv2d(one, one, padding=2**62),
        "conv2d_pad_2pow62_bias": lambda: F.conv2d(one, one, np.ones(1, np.float32),
                                                   padding=(2**62, 0)),
        # (2**24, 1) @ (1, 2**24) = 2**48 elements, 1 PiB.
        "matmul_1PiB": lambda: F.matmul(col, row),
        "linear_1PiB": lambda: F.linear(col, col),
        "relu_broadcast_4PiB": lambda: F.relu(
            np.broadcast_to(np.ones(1, np.float32), (PB,))),
    }


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("case", sorted(_huge_cases()))
def test_unallocatable_output_raises_cleanly(backend: str, case: str) -> None:
    fn = _huge_cases()[case]
    with fastnn.backend(backend), pytest.raises((MemoryError, ValueError)) as info:
        fn()
    assert str(info.value), "the error must say what failed"
