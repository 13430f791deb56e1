"""Shared argument checks, Tensor forwarding and backend choice for ``fastnn.functional``."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import sys
import warnings
from types import ModuleType
from typing import Any, Callable

import numpy as np

from fastnn._array import FLOAT_DTYPES as _FLOAT_DTYPES
from fastnn._array import array_module as _xp
from fastnn._array import from_dlpack as _from_dlpack
from fastnn._array import is_cupy as _is_cupy
from fastnn._array import is_dlpack_foreign as _is_dlpack_foreign
from fastnn._array import wrap_like as _wrap_like
from fastnn.backends import forced_backend, get_backend
from fastnn.geometry import as_int as _int  # noqa: F401 - one home, re-exported here
from fastnn.geometry import as_pair as _pair  # noqa: F401

Array = Any  # numpy.ndarray or cupy.ndarray
Pair = "int | tuple[int, int]"
_F32, _F64 = _FLOAT_DTYPES

#: name -> callable with the same signature, registered by fastnn.autograd.
_TENSOR_HANDLERS: dict[str, Callable[..., Any]] = {}


def register_tensor_handler(op: str, handler: Callable[..., Any]) -> None:
    """Make ``handler`` (same signature as ``fastnn.functional.<op>``) run the call
    whenever an argument is a ``fastnn.Tensor``; the autograd layer registers its
    Functions here, so this package never imports it."""
    _TENSOR_HANDLERS[op] = handler



# --------------------------------------------------------------------------
# Tensor forwarding and backend choice
# --------------------------------------------------------------------------


# Argument types that are never a Tensor or a CuPy array: checked first, because
# every call validates every argument and the generic tests cost ~0.2 us each.
_PLAIN_TYPES = frozenset({np.ndarray, int, float, bool, str, tuple, list, type(None)})


def _is_tensor(a: Any) -> bool:
    t = type(a)
    return t not in _PLAIN_TYPES and getattr(t, "_fastnn_tensor", False)


def _tensor_aware(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Forward the call to the autograd handler when any argument is a Tensor; view
    DLPack producers (torch tensors, JAX arrays) as NumPy/CuPy arrays and give the
    results back as the first such argument's kind (torch in, torch out)."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        foreign = False
        for a in (*args, *kwargs.values()) if kwargs else args:
            t = type(a)
            if t in _PLAIN_TYPES:
                continue
            if getattr(t, "_fastnn_tensor", False):
                handler = _TENSOR_HANDLERS.get(name)
                if handler is None:
                    raise TypeError(f"{name}: fastnn.Tensor inputs are not supported")
                return handler(*args, **kwargs)
            foreign = foreign or _is_dlpack_foreign(a)
        if foreign:
            return _call_through_dlpack(fn, name, args, kwargs)
        return fn(*args, **kwargs)

    return wrapper


def _call_through_dlpack(
    fn: Callable[..., Any], op: str, args: tuple, kwargs: dict[str, Any]
) -> Any:
    """``fn`` on zero-copy NumPy/CuPy views of the DLPack arguments; the result
    wrapped back as the first one's kind (the one wrap-back point)."""
    params = list(inspect.signature(fn).parameters)
    like = next(a for a in (*args, *kwargs.values()) if _is_dlpack_foreign(a))
    args = tuple(
        _from_dlpack(a, op, params[i] if i < len(params) else f"argument {i}")
        if _is_dlpack_foreign(a) else a
        for i, a in enumerate(args)
    )
    kwargs = {k: _from_dlpack(v, op, k) if _is_dlpack_foreign(v) else v
              for k, v in kwargs.items()}
    return _wrap_like(fn(*args, **kwargs), like)


_warned_no_cpu = False


def _default_cpu_backend() -> ModuleType:
    global _warned_no_cpu
    try:
        return get_backend("cpu")
    except ImportError:
        if not _warned_no_cpu:
            warnings.warn(
                "fastnn._C is not built; falling back to the slow NumPy reference backend",
                RuntimeWarning,
                stacklevel=4,
            )
            _warned_no_cpu = True
        return get_backend("numpy")


def _pick_backend(op: str, arrays: list[Array]) -> ModuleType:
    """The backend for these arrays: the forced one, else by array type."""
    forced = forced_backend()
    if forced is None and all(type(a) is np.ndarray for a in arrays):
        return _default_cpu_backend()  # the common case, without the checks below
    on_gpu = [_is_cupy(a) for a in arrays]
    if forced is not None:
        if forced != "cuda" and any(on_gpu):
            raise TypeError(
                f"{op}: got a CuPy array inside fastnn.backend({forced!r}); "
                "move it to the host with .get() or use backend('cuda')"
            )
        return get_backend(forced)
    if any(on_gpu):
        if not all(on_gpu):
            raise TypeError(f"{op}: cannot mix CuPy and NumPy arrays")
        return get_backend("cuda")
    return _default_cpu_backend()




# --------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------


def _as_float_array(a: Any, op: str, name: str) -> Array:
    """``a`` as a NumPy/CuPy array of float32 or float64, or raise naming ``name``."""
    if type(a) is np.ndarray and (a.dtype is _F32 or a.dtype is _F64):
        return a  # the common case: NumPy's own float dtypes are singletons
    if _is_cupy(a) or isinstance(a, np.ndarray):
        arr = a
    elif isinstance(a, (list, tuple, numbers.Number)) or hasattr(a, "__array__"):
        try:
            arr = np.asarray(a)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{op}: {name} could not be converted to an array: {exc}") from exc
        if arr.dtype.kind in "iub":
            arr = arr.astype(np.float32)  # Python lists of ints become float32
    else:
        raise TypeError(
            f"{op}: {name} must be a NumPy or CuPy array, got {type(a).__name__}"
        )
    if arr.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or float64, got dtype {arr.dtype}")
    return arr


def _same_dtype(op: str, ref: Array, ref_name: str, other: Array, name: str) -> None:
    if other.dtype != ref.dtype:
        raise TypeError(
            f"{op}: {name} has dtype {other.dtype} but {ref_name} has dtype {ref.dtype}; "
            "convert one of them explicitly"
        )


def _contig(a: Array) -> Array:
    return a if a.flags.c_contiguous else _xp(a).ascontiguousarray(a)


def _flag(v: Any, op: str, name: str) -> bool:
    """A bool argument (ceil_mode, count_include_pad): torch rejects ints and None too."""
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{op}: {name} must be a bool, got {type(v).__name__}")
    return bool(v)


def _batched(x: Array, op: str, name: str = "x") -> tuple[Array, bool]:
    """Accept (N,C,H,W) or unbatched (C,H,W); return 4-D and whether it was 3-D."""
    if x.ndim == 4:
        return x, False
    if x.ndim == 3:
        return x[None], True
    raise ValueError(
        f"{op}: {name} must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape {tuple(x.shape)}"
    )


def _check_alloc(op: str, shape: tuple[int, ...], dtype: Any) -> None:
    """MemoryError, before any backend runs, for an output no machine can hold."""
    if math.prod(shape) * np.dtype(dtype).itemsize > sys.maxsize:
        raise MemoryError(f"{op}: the output of shape {tuple(shape)} cannot be allocated")


def _check_grad_out(op: str, grad_out: Array, expected: tuple[int, ...]) -> None:
    if tuple(grad_out.shape) != tuple(expected):
        raise ValueError(
            f"{op}: grad_out must have the forward output's shape {tuple(expected)}, "
            f"got {tuple(grad_out.shape)}"
        )


def _check_bias(
    op: str, bias: Any, out_channels: int, ref: Array, name: str = "bias", same_dtype: bool = True
) -> Array | None:
    """A per-channel vector ``name`` of shape (out_channels,) on ``ref``'s device, or None."""
    if bias is None:
        return None
    bias = _as_float_array(bias, op, name)
    if _is_cupy(bias) != _is_cupy(ref):
        raise TypeError(f"{op}: {name} and x must both be NumPy or both CuPy arrays")
    if same_dtype:
        _same_dtype(op, ref, "x", bias, name)
    if tuple(bias.shape) != (out_channels,):
        raise ValueError(
            f"{op}: {name} must have shape ({out_channels},), got {tuple(bias.shape)}"
        )
    return _contig(bias)
