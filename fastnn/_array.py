"""Array-module helpers: is this NumPy or CuPy, which module ops it, a host copy,
and the DLPack bridge to other array libraries (torch, JAX, ...).

The one home of these rules; every layer imports them from here. CuPy is never
imported unless an array already is a CuPy array (or a DLPack producer lives on
a GPU); torch and JAX are never imported here: an array of theirs means they
already are.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "array_module",
    "from_dlpack",
    "is_array",
    "is_cupy",
    "is_dlpack_foreign",
    "to_host",
    "wrap_like",
]

#: The float dtypes fastnn computes in (native byte order).
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


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


# --------------------------------------------------------------------------
# DLPack: any producer in, the producer's own kind out
# --------------------------------------------------------------------------

# DLPack device types (dlpack.h): host memory, and memory a CUDA kernel can read.
_DL_CPU = 1
_DL_CUDA = (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged

#: Library (the producer type's top-level module) -> the module whose ``from_dlpack``
#: rebuilds that library's array. Producers of other libraries get NumPy/CuPy
#: arrays back: a ``from_dlpack`` found by guessing could mean something else.
_FROM_DLPACK_HOME = {"torch": "torch", "jaxlib": "jax.numpy", "jax": "jax.numpy"}


def is_dlpack_foreign(a: Any) -> bool:
    """True for a DLPack producer that is neither a NumPy nor a CuPy array (a torch
    tensor, a JAX array, ...): fastnn views it with :func:`from_dlpack`."""
    return (
        hasattr(type(a), "__dlpack__") and not isinstance(a, np.ndarray) and not is_cupy(a)
    )


def from_dlpack(a: Any, op: str, name: str) -> Any:
    """A NumPy (host) or CuPy (CUDA) array sharing ``a``'s memory, without a copy.

    A torch tensor that requires grad is refused: fastnn.functional records no
    torch autograd graph, so a silent ``detach()`` would drop gradients.
    """
    if getattr(a, "requires_grad", False):
        raise TypeError(
            f"{op}: {name} is a tensor that requires grad; fastnn.functional does not "
            "record torch autograd. Use the differentiable ops (torch.ops.fastnn.*, "
            "fastnn.torch.nn modules, fastnn.torch.accelerate) or pass a detached tensor"
        )
    try:
        device_type = int(a.__dlpack_device__()[0])
    except Exception as exc:  # noqa: BLE001 - a producer without a usable device
        raise TypeError(f"{op}: {name} does not report a DLPack device: {exc}") from exc
    try:
        if device_type == _DL_CPU:
            return np.from_dlpack(a)
        if device_type in _DL_CUDA:
            import cupy

            return cupy.from_dlpack(a)
    except (BufferError, RuntimeError, TypeError, ValueError) as exc:
        raise TypeError(f"{op}: {name} cannot be viewed through DLPack: {exc}") from exc
    raise TypeError(
        f"{op}: {name} lives on DLPack device type {device_type}; fastnn runs on the "
        "host (NumPy) and on CUDA (CuPy) only"
    )


def wrap_like(result: Any, like: Any) -> Any:
    """``result`` (a NumPy/CuPy array, None, or a tuple of them) as arrays of ``like``'s
    library (torch, JAX), through DLPack (no copy); other libraries get the
    NumPy/CuPy arrays."""
    if isinstance(result, tuple):
        return tuple(wrap_like(r, like) for r in result)
    if result is None or not is_array(result):
        return result
    home = _FROM_DLPACK_HOME.get(type(like).__module__.split(".")[0])
    if home is None:
        return result
    import importlib

    return importlib.import_module(home).from_dlpack(result)
