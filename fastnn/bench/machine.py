"""The machine a run happened on, and its two ceilings measured in the same run:
NumPy's float32 GEMM rate (the "sgemm peak" compute-bound ops are compared
against) and a large ``np.copyto``'s bandwidth (for memory-bound ops).

NumPy is measured as installed. ``OPENBLAS_CORETYPE`` (and ``OPENBLAS_L2_SIZE``),
which some machines set to work around old OpenBLAS bugs, force a slower kernel;
:func:`openblas_note` says so, and ``benchmarks/bench_cpu_targets.py`` measures
NumPy in a child process with both removed to get its true speed.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from typing import Any

import numpy as np

OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def _best_of(fn: Any, repeats: int) -> float:
    fn()  # warm-up: page faults, BLAS thread start, buffer allocation
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def sgemm_peak(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of NumPy's float32 ``(n,n) @ (n,n)``, best of ``repeats`` (a peak, so
    the best sample rather than the median)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    return 2.0 * n**3 / _best_of(lambda: np.matmul(a, b, out=c), repeats) / 1e9


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """GB/s of ``np.copyto`` between two float32 arrays of ``mib`` MiB each, counting
    the bytes read plus the bytes written; best of ``repeats``."""
    src = np.ones(mib * 2**20 // 4, np.float32)
    dst = np.zeros_like(src)
    return 2.0 * src.nbytes / _best_of(lambda: np.copyto(dst, src), repeats) / 1e9


#: per run mode: sgemm size, large-copy MiB, repeats.
CEILING_SIZES = {"full": (2048, 256, 5), "quick": (1024, 64, 3), "tiny": (256, 8, 2)}


def measure_ceilings(mode: str = "full") -> dict[str, Any]:
    """sgemm peak (2048^2 full, 1024^2 quick) and copy bandwidth: a large copy
    (256 MiB full, 64 MiB quick: both well past a 32 MiB L3) and an in-cache one
    (4 MiB), measured now, in this process. ``tiny`` (tests) uses small sizes
    whose numbers mean little."""
    if mode not in CEILING_SIZES:
        raise ValueError(f"mode must be one of {sorted(CEILING_SIZES)}, got {mode!r}")
    n, big, repeats = CEILING_SIZES[mode]
    return {
        "sgemm_n": n,
        "sgemm_gflops": round(sgemm_peak(n, repeats), 2),
        "copy_mib": big,
        "copy_gb_s": round(copy_bandwidth(big, repeats), 2),
        "copy_cache_gb_s": round(copy_bandwidth(4, 4 * repeats), 2),
    }


def best_ceilings(*measured: dict[str, Any]) -> dict[str, Any]:
    """Ceilings measured several times in a run (at its start and end) merged into the
    best of each: a peak is what the machine can do, and a busy moment only hides it."""
    out = dict(measured[0])
    for m in measured[1:]:
        for key in ("sgemm_gflops", "copy_gb_s", "copy_cache_gb_s"):
            out[key] = max(out[key], m[key])
    return out


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes (and the hypervisor's steal) have used since boot,
    from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


class ForeignCPU:
    """How much CPU other processes took while a run was going on: the machine's busy
    time minus this process's and its reaped children's (the worker processes, once
    closed). The load average cannot tell, as it counts the run's own threads."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = _busy_cpu_seconds()
        self._own0 = _own_cpu_seconds()

    def share(self) -> float | None:
        """Fraction of all cores' time used by others since construction (0..1)."""
        busy = _busy_cpu_seconds()
        if busy is None or self._busy0 is None:
            return None
        wall = (time.monotonic() - self._t0) * (os.cpu_count() or 1)
        other = (busy - self._busy0) - (_own_cpu_seconds() - self._own0)
        return min(1.0, max(0.0, other / wall)) if wall > 0 else None


def foreign_note(share: float | None) -> str | None:
    """A warning when other processes took a noticeable share of the CPU during a run."""
    if share is None or share < 0.05:
        return None
    return (f"note: other processes used {share:.0%} of the CPU during this run; "
            "multi-threaded timings are inflated by it. Re-run on an idle machine.")


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def busy_note(cores: int | None = None) -> str | None:
    """A warning when other processes are using the CPU: a multi-threaded kernel then
    waits at every barrier for a scheduler tick, and timings inflate by milliseconds."""
    load = load_average()
    cores = cores or os.cpu_count() or 1
    if load is None or load < 0.5:
        return None
    return (f"note: load average {load} on {cores} cores: other processes are running, "
            "so multi-threaded timings (fastnn cpu, OpenBLAS, torch) may be inflated. "
            "Benchmark on an idle machine.")


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, else platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_info() -> list[dict[str, Any]]:
    """NumPy's BLAS as threadpoolctl sees it (library, version, kernel, threads);
    empty when threadpoolctl is not installed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("internal_api", "version", "architecture", "num_threads", "threading_layer")
    return [{k: lib.get(k) for k in keep} for lib in threadpool_info()
            if lib.get("user_api") == "blas"]


def openblas_note(environ: dict[str, str] | None = None) -> str | None:
    """A warning when OPENBLAS_CORETYPE forces OpenBLAS's kernel (usually a slower one
    than the CPU supports), naming the kernel threadpoolctl reports. ``environ``
    defaults to ``os.environ``."""
    env = os.environ if environ is None else environ
    forced = {v: env[v] for v in OPENBLAS_VARS if env.get(v)}
    if not forced:
        return None
    kernels = [lib.get("architecture") for lib in blas_info() if lib.get("architecture")]
    running = f"; OpenBLAS runs its {'/'.join(kernels)} kernel" if kernels else ""
    setting = ", ".join(f"{k}={v}" for k, v in forced.items())
    return (f"note: {setting} is set{running}: NumPy (and the numpy reference) may be "
            "slower than this CPU allows. benchmarks/bench_cpu_targets.py measures NumPy "
            "with both variables unset.")


def backend_threads(backend: str) -> int | None:
    """Threads a backend uses in this process: fastnn's pool, OpenBLAS, or torch's."""
    try:
        if backend == "cpu":
            import fastnn

            return fastnn.get_num_threads()
        if backend == "numpy":
            libs = blas_info()
            return libs[0]["num_threads"] if libs else None
        if backend == "torch":
            import torch

            return torch.get_num_threads()
    except Exception:  # noqa: BLE001 - informational only
        return None
    return None


def gpu_info() -> dict[str, Any] | None:
    """Name, memory and compute capability of GPU 0 via CuPy, or None."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        return {"name": name.decode() if isinstance(name, bytes) else str(name),
                "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
                "compute_capability": f"{props['major']}.{props['minor']}",
                "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion()}
    except Exception:  # noqa: BLE001 - no cupy, driver or device
        return None


def machine_info() -> dict[str, Any]:
    """What a reader needs to interpret the numbers (no ceilings: see
    :func:`measure_ceilings`)."""
    import importlib.util

    import fastnn

    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "blas": blas_info(),
        "openblas_env": {v: os.environ[v] for v in OPENBLAS_VARS if os.environ.get(v)},
        "fastnn": fastnn.__version__,
    }
    try:
        from fastnn import _C

        info["fastnn_isa"] = _C.active_isa()
        info["fastnn_threads"] = _C.get_num_threads()
        from fastnn._config import cpu_cache_info

        info["fastnn_cpu"] = cpu_cache_info()
    except Exception:  # noqa: BLE001 - extension not built
        info["fastnn_isa"] = None
    if importlib.util.find_spec("torch") is not None:
        # The version only; torch itself is imported in its own worker process.
        try:
            from importlib.metadata import version

            info["torch"] = version("torch")
        except Exception:  # noqa: BLE001
            info["torch"] = "installed"
    gpu = gpu_info()
    if gpu:
        info["gpu"] = gpu
    return info
