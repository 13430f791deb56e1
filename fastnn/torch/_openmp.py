"""Ending the spin-wait of PyTorch's idle OpenMP workers before fastnn's kernels run.

After each parallel op, PyTorch's OpenMP workers (libgomp, in the Linux CPU
wheels) keep polling for the next one: libgomp's default is 300,000 rounds of
the PAUSE instruction, which on recent Intel cores (~140 cycles each) is about
15 ms. A model whose layers run on fastnn's own thread pool loses the core such
a worker polls on: measured on a 2-core Intel Xeon (family 6 model 207), the
seed model's accelerated step took 11.8-14.6 ms after the user's batch gather
(``x[idx]``, one torch parallel op) and 7.3-9.2 ms when the workers were
released first.

:func:`release_idle_workers` asks the OpenMP runtime torch loaded to free the
calling thread's worker pool (``omp_pause_resource_all(omp_pause_soft)``,
OpenMP 5.0). Nothing else changes: torch's next parallel op starts its workers
again. It is a no-op where no such runtime is loaded, inside a parallel region
(the runtime refuses), and off Linux.

Every ``torch.ops.fastnn`` op calls it first (:func:`releasing`): ~1 us when
there is nothing to free; where torch and fastnn ops alternate, each switch
costs torch a restart of its workers (~50 us in a tight loop, up to ~1.3 ms
inside a training step on that machine, a VM whose idle vCPU is slow to wake),
against a fastnn kernel run at about half speed for up to ~15 ms. ``set_enabled(False)`` (or
``FASTNN_TORCH_RELEASE_OMP=0`` in the environment) leaves torch's threads alone.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from collections.abc import Callable
from typing import Any

__all__ = ["enabled", "release_idle_workers", "releasing", "runtime_path", "set_enabled"]

_OMP_PAUSE_SOFT = 1
_RUNTIMES = re.compile(r"/lib(gomp|iomp5|omp)[^/]*\.so[^/]*$")
_pause: Any = None  # the runtime's omp_pause_resource_all, False when there is none
_enabled = os.environ.get("FASTNN_TORCH_RELEASE_OMP", "1") != "0"


def enabled() -> bool:
    """Whether fastnn's torch ops release torch's idle OpenMP workers first."""
    return _enabled


def set_enabled(flag: bool) -> None:
    """Turn the release before each ``torch.ops.fastnn`` op on or off."""
    global _enabled
    _enabled = bool(flag)


def runtime_path() -> str | None:
    """The OpenMP runtime library loaded into this process (from /proc/self/maps),
    or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(" ")[-1]
                if _RUNTIMES.search(path):
                    return path
    except OSError:  # no procfs (not Linux)
        pass
    return None


def _pause_fn() -> Any:
    global _pause
    if _pause is None:
        path = runtime_path()
        fn = None
        if path is not None:
            try:
                # Already loaded: this returns the same library, it loads nothing.
                fn = ctypes.CDLL(path, mode=os.RTLD_NOLOAD).omp_pause_resource_all
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            except (OSError, AttributeError):  # an older runtime without OpenMP 5.0
                fn = None
        _pause = fn or False
    return _pause


def release_idle_workers() -> bool:
    """Free the calling thread's idle OpenMP workers now (see the module doc); True
    when the runtime did."""
    fn = _pause_fn()
    return bool(fn) and fn(_OMP_PAUSE_SOFT) == 0


def releasing(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (an op's real implementation) that first releases torch's idle OpenMP
    workers, when enabled. The signature is ``fn``'s (``torch.library`` reads it)."""

    @functools.wraps(fn)
    def impl(*args: Any, **kwargs: Any) -> Any:
        if _enabled:
            release_idle_workers()
        return fn(*args, **kwargs)

    return impl
