"""Runtime configuration: thread count, ISA, CPU caches and blocking, the output
memory pool, and ``show_config``."""

from __future__ import annotations

import os
import platform
import sys


def _native():
    try:
        from fastnn import _C
    except ImportError:
        return None
    return _C


def get_num_threads() -> int:
    """Threads the C++ kernels use (``OMP_NUM_THREADS`` or all cores by default)."""
    c = _native()
    return c.get_num_threads() if c is not None else 1


def _native_setting(name: str, value: int, minimum: int):
    """The extension, once ``value`` (argument ``name``) is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    c = _native()
    if c is None:
        raise RuntimeError("fastnn._C is not built; the CPU backend is unavailable")
    return c


def set_num_threads(n: int) -> None:
    """Set the number of threads the C++ kernels use."""
    _native_setting("n", n, 1).set_num_threads(n)


def park_threads() -> None:
    """Let the kernels' idle worker threads sleep now.

    After each parallel kernel the workers poll for the next one for about 2 ms,
    so back-to-back kernels (a layer's forward, its backward, the optimizer step)
    start at once on every thread. Call this before other multithreaded code
    takes the cores (PyTorch's OpenMP ops, NumPy's BLAS), so the polling does not
    compete with it; the next kernel wakes the workers. No-op without the
    extension."""
    c = _native()
    if c is not None:
        c.park_threads()


def memory_pool_stats() -> dict:
    """Counters of the cache that the C++ kernels' large outputs come from.

    Outputs of at least 256 KiB take their memory from it (they are ordinary
    NumPy arrays that own their data), and give it back when NumPy frees them,
    so a training loop's activations and gradients reuse their pages instead of
    faulting fresh ones in every step. Keys: ``hits`` and ``misses`` (outputs
    served from the cache or by the system), ``cached_bytes`` and
    ``cached_blocks`` (freed blocks held for reuse), ``in_use_bytes`` and
    ``in_use_blocks`` (outputs alive now), ``limit`` (bytes), ``min_bytes`` (the
    smallest output that uses it) and ``enabled``.
    Empty without the extension."""
    c = _native()
    return dict(c.memory_pool_stats()) if c is not None else {}


def set_memory_pool_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` of freed kernel outputs for reuse (the default is
    1 GiB, or an eighth of the machine's memory where that is less;
    ``FASTNN_MEMORY_POOL_LIMIT``, e.g. ``512M``, sets it at import). Blocks past
    the new limit go back to the system now. ``0`` turns the pool off: new
    outputs then come from NumPy's own allocator."""
    _native_setting("nbytes", nbytes, 0).set_memory_pool_limit(nbytes)


def empty_memory_pool() -> None:
    """Give every cached block back to the system (outputs still alive keep theirs,
    and return them to the pool when they die). No-op without the extension."""
    c = _native()
    if c is not None:
        c.memory_pool_clear()


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def cpu_cache_info() -> dict:
    """The CPU (vendor, family/model), the cache sizes the kernels block for and
    the gemm blocking chosen from them, per dtype, for the active ISA.

    Sizes come from CPUID (else sysfs, else defaults); ``FASTNN_CACHE_SIZES``
    (e.g. ``"l1d=32K,l2=1M,l3=32M"``) overrides them. Empty without the extension.
    """
    c = _native()
    if c is None:
        return {}
    cpu = c.cpu_info()
    caches = (f"L1d {_size(cpu['l1d'])}, L2 {_size(cpu['l2'])} per core; "
              f"L3 {_size(cpu['l3'])} shared by {cpu['l3_shared_by']} ({cpu['source']}")
    caches += f", override {cpu['override']!r})" if cpu["override"] else ")"
    info: dict = {
        "cpu": f"{cpu['vendor']} family {cpu['family']} model {cpu['model']}",
        "caches": caches,
    }
    for dtype in ("float32", "float64"):
        b = c.gemm_blocking(dtype)
        info[f"gemm_{dtype}"] = " ".join(f"{k}={b[k]}" for k in ("MR", "NR", "KC", "MC", "NC"))
    return info


def _memory_pool_line(c) -> str | None:
    if c is None:
        return None
    st = c.memory_pool_stats()
    if not st["enabled"]:
        return "off (outputs use NumPy's allocator)"
    return (f"outputs >= {_size(st['min_bytes'])} reuse freed blocks: limit {_size(st['limit'])}, "
            f"cached {_size(st['cached_bytes'])}, hits {st['hits']}, misses {st['misses']}")


def config() -> dict:
    """The facts ``show_config`` prints, as a dict."""
    from fastnn import __version__
    from fastnn.backends import available_backends

    c = _native()
    info: dict = {
        "version": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "backends": available_backends(),
        "isa": c.active_isa() if c is not None else None,
        "supported_isas": c.supported_isas() if c is not None else None,
        "threads": c.get_num_threads() if c is not None else None,
        "FASTNN_ISA": os.environ.get("FASTNN_ISA"),
        **cpu_cache_info(),
        "FASTNN_CACHE_SIZES": os.environ.get("FASTNN_CACHE_SIZES"),
        "memory_pool": _memory_pool_line(c),
        "FASTNN_MEMORY_POOL_LIMIT": os.environ.get("FASTNN_MEMORY_POOL_LIMIT"),
    }
    try:
        from fastnn.backends import cuda

        info.update(cuda.device_info())
    except Exception as exc:  # noqa: BLE001 - report, never fail show_config
        info["cuda"] = f"unavailable ({exc})"
    return info


def show_config() -> None:
    """Print the version, backends, chosen ISA, threads, CPU caches, gemm blocking, the
    output memory pool and GPU."""
    info = config()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:>{width}}: {value}")
