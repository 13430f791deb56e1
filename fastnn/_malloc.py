"""Keep freed heap memory for reuse (glibc): a training step frees and allocates
the same activations every step, and glibc by default returns the top of the heap
to the OS once more than a few MB are free (and serves large blocks by mmap), so
every step faulted its pages back in (about 8,300 pages, 32 MB, per step of the
``strong`` preset: 15% of its time in one thread).

:func:`retain_freed_memory` is what ``fastnn train`` calls; a library user's
process is left as it is unless they call it too. The native kernels' own large
outputs do not depend on it: they come from fastnn's pool of freed blocks
(``csrc/memory_pool.cpp``, :func:`fastnn.memory_pool_stats`).
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest accepted mmap threshold on 64-bit (HEAP_MAX_SIZE / 2).
_MMAP_MAX = 32 * 2**20
_TRIM = 2**30


def retain_freed_memory() -> bool:
    """Serve blocks up to 32 MiB from the heap and trim it only past 1 GiB free, so a
    steady training loop reuses its pages instead of faulting them in each step.
    True where glibc's ``mallopt`` accepted both settings; False elsewhere (musl,
    macOS), which changes nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM))
