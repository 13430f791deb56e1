"""Runtime configuration: thread count, ISA, CPU caches and blocking, and ``show_config``."""

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


def set_num_threads(n: int) -> None:
    """Set the number of threads the C++ kernels use."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    c = _native()
    if c is None:
        raise RuntimeError("fastnn._C is not built; the CPU backend is unavailable")
    c.set_num_threads(n)


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
    }
    try:
        from fastnn.backends import cuda

        info.update(cuda.device_info())
    except Exception as exc:  # noqa: BLE001 - report, never fail show_config
        info["cuda"] = f"unavailable ({exc})"
    return info


def show_config() -> None:
    """Print the version, backends, chosen ISA, threads, CPU caches, gemm blocking and GPU."""
    for key, value in config().items():
        print(f"{key:>16}: {value}")
