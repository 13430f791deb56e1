"""Array-module helpers: is this NumPy or CuPy, which module ops it, and a host copy.

The one home of these rules; every layer imports them from here. CuPy is never
imported unless an array already is a CuPy array.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["array_module", "is_array", "is_cupy", "to_host"]


def is_cupy(a: Any) -> bool:
    """True for a CuPy array (checked by type, without importing CuPy)."""
    t = type(a)
    return t is not np.ndarray and t.__module__.startswith("cupy")


def is_array(a: Any) -> bool:
    """True for a NumPy or CuPy array."""
    return isinstance(a, np.ndarray) or is_cupy(a)


def array_module(a: Any) -> ModuleType:
    """``cupy`` for a CuPy array, else ``numpy`` (the ``xp`` of array-API code)."""
    if is_cupy(a):
        import cupy

        return cupy
    return np


def to_host(a: Any) -> np.ndarray:
    """A NumPy array with ``a``'s values: CuPy arrays are copied to the host."""
    if is_cupy(a):
        return a.get()
    return np.asarray(a)
