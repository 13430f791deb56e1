"""torch.nn.functional-style API over fastnn's backends.

Layouts follow PyTorch: activations are NCHW (or unbatched CHW), conv weights
OIHW, ``linear`` weights (out_features, in_features). ``stride``, ``padding``
and ``dilation`` are an int or a pair. Inputs may be NumPy arrays (C++ "cpu"
backend), CuPy arrays ("cuda" backend), Python lists, or non-contiguous views;
results are new C-contiguous arrays of the input's float dtype.

Every argument is validated here, before any native code runs: bad input raises
``ValueError`` or ``TypeError`` naming the argument. Backends then receive
C-contiguous arrays of one dtype and plain int pairs (see
:mod:`fastnn.backends`).

If any argument is a ``fastnn.Tensor``, the call is forwarded to the autograd
layer, which registers its handlers in ``_TENSOR_HANDLERS``; this module never
imports autograd.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
import warnings
from types import ModuleType
from typing import Any, Callable

import numpy as np

from fastnn.backends import forced_backend, get_backend

__all__ = [
    "adam_step",
    "avg_pool2d",
    "avg_pool2d_backward",
    "conv2d",
    "conv2d_backward",
    "cross_entropy",
    "dropout",
    "linear",
    "linear_backward",
    "log_softmax",
    "matmul",
    "matmul_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "mse_loss",
    "relu",
    "relu_backward",
    "sgd_step",
    "sigmoid",
    "softmax_cross_entropy",
    "tanh",
]

Array = Any  # numpy.ndarray or cupy.ndarray
Pair = "int | tuple[int, int]"

#: name -> callable with the same signature, registered by fastnn.autograd.
_TENSOR_HANDLERS: dict[str, Callable[..., Any]] = {}

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Larger strides, paddings, dilations and kernels are never meaningful; the bound
# keeps every backend's index arithmetic far from int64 overflow.
_MAX_GEOMETRY = 2**31


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
    """Forward the call to the autograd handler when any argument is a Tensor."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if any(_is_tensor(a) for a in args) or any(_is_tensor(v) for v in kwargs.values()):
            handler = _TENSOR_HANDLERS.get(name)
            if handler is None:
                raise TypeError(f"{name}: fastnn.Tensor inputs are not supported")
            return handler(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def _is_cupy(a: Any) -> bool:
    t = type(a)
    return t is not np.ndarray and t.__module__.startswith("cupy")


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
    on_gpu = [_is_cupy(a) for a in arrays]
    forced = forced_backend()
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


def _xp(a: Array) -> ModuleType:
    if _is_cupy(a):
        import cupy

        return cupy
    return np


# --------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------


def _as_float_array(a: Any, op: str, name: str) -> Array:
    """``a`` as a NumPy/CuPy array of float32 or float64, or raise naming ``name``."""
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


def _int(v: Any, op: str, name: str) -> int:
    if type(v) is int:  # the common case, without the slow ABC check below
        return v
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Integral,)):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__} {v!r}")
    return int(v)


def _pair(v: Any, op: str, name: str, minimum: int) -> tuple[int, int]:
    if type(v) is int and minimum <= v < _MAX_GEOMETRY:  # the common case, fast
        return (v, v)
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{op}: {name} must be an int or a pair, got {v!r}")
        out = (_int(v[0], op, name), _int(v[1], op, name))
    else:
        i = _int(v, op, name)
        out = (i, i)
    if min(out) < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{op}: {name} must be {kind}, got {v!r}")
    if max(out) >= _MAX_GEOMETRY:
        raise ValueError(f"{op}: {name} must be < 2**31, got {v!r}")
    return out


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


# --------------------------------------------------------------------------
# conv2d
# --------------------------------------------------------------------------


class _ConvArgs:
    """Validated conv2d geometry shared by forward and backward."""

    __slots__ = (
        "x", "weight", "unbatched", "stride", "padding", "dilation", "groups",
        "extra", "out_shape", "backend",
    )

    def __init__(self, op, x, weight, stride, padding, dilation, groups, extra_arrays=()):
        x = _as_float_array(x, op, "x")
        weight = _as_float_array(weight, op, "weight")
        _same_dtype(op, x, "x", weight, "weight")
        x, self.unbatched = _batched(x, op)
        if weight.ndim != 4:
            raise ValueError(
                f"{op}: weight must be 4-D (O, C/groups, KH, KW), got shape {tuple(weight.shape)}"
            )
        groups = _int(groups, op, "groups")
        if groups < 1:
            raise ValueError(f"{op}: groups must be positive, got {groups}")
        n, c, h, w = x.shape
        o, cg, kh, kw = weight.shape
        if c % groups:
            raise ValueError(f"{op}: input channels {c} are not divisible by groups={groups}")
        if o % groups:
            raise ValueError(f"{op}: weight out-channels {o} not divisible by groups={groups}")
        if cg * groups != c:
            raise ValueError(
                f"{op}: x has {c} channels but weight expects {cg * groups} "
                f"(weight.shape[1]={cg} x groups={groups})"
            )
        stride = _pair(stride, op, "stride", 1)
        dilation = _pair(dilation, op, "dilation", 1)
        extra = (0, 0)  # asymmetric "same" padding: extra zeros at the bottom/right
        if isinstance(padding, str):
            if padding == "valid":
                pad = (0, 0)
            elif padding == "same":
                if stride != (1, 1):
                    raise ValueError(f"{op}: padding='same' requires stride=1, got {stride}")
                total = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))
                pad = (total[0] // 2, total[1] // 2)
                extra = (total[0] - 2 * pad[0], total[1] - 2 * pad[1])
            else:
                raise ValueError(
                    f"{op}: padding must be 'same', 'valid', an int or a pair, got {padding!r}"
                )
        else:
            pad = _pair(padding, op, "padding", 0)
        eff = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
        hp, wp = h + 2 * pad[0] + extra[0], w + 2 * pad[1] + extra[1]
        if eff[0] > hp or eff[1] > wp:
            raise ValueError(
                f"{op}: kernel size {eff[0]}x{eff[1]} (after dilation) is larger than the "
                f"padded input {hp}x{wp}"
            )
        oh = (hp - eff[0]) // stride[0] + 1
        ow = (wp - eff[1]) // stride[1] + 1
        if extra != (0, 0):
            xp = _xp(x)
            x = xp.pad(x, ((0, 0), (0, 0), (0, extra[0]), (0, extra[1])))
        self.x = _contig(x)
        self.weight = _contig(weight)
        self.stride, self.padding, self.dilation, self.groups = stride, pad, dilation, groups
        self.extra = extra
        self.out_shape = (n, o, oh, ow)
        _check_alloc(op, self.out_shape, x.dtype)
        self.backend = _pick_backend(op, [x, weight, *extra_arrays])

    def unbatch(self, a: Array) -> Array:
        return a[0] if self.unbatched else a


def _check_bias(op: str, bias: Any, out_channels: int, ref: Array) -> Array | None:
    if bias is None:
        return None
    bias = _as_float_array(bias, op, "bias")
    if _is_cupy(bias) != _is_cupy(ref):
        raise TypeError(f"{op}: bias and x must both be NumPy or both CuPy arrays")
    _same_dtype(op, ref, "x", bias, "bias")
    if tuple(bias.shape) != (out_channels,):
        raise ValueError(f"{op}: bias must have shape ({out_channels},), got {tuple(bias.shape)}")
    return _contig(bias)


@_tensor_aware
def conv2d(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    stride: Pair = 1,
    padding: Pair | str = 0,
    dilation: Pair = 1,
    groups: int = 1,
) -> Array:
    """2-D convolution (cross-correlation), as ``torch.nn.functional.conv2d``.

    x (N, C, H, W) or (C, H, W); weight (O, C/groups, KH, KW); bias (O,) or None.
    Returns (N, O, OH, OW) with OH = (H + 2*pad - dil*(KH-1) - 1) // stride + 1.
    ``padding`` may also be ``"same"`` (stride 1 only) or ``"valid"``.
    """
    a = _ConvArgs("conv2d", x, weight, stride, padding, dilation, groups)
    b = _check_bias("conv2d", bias, a.out_shape[1], a.x)
    xp = _xp(a.x)
    if 0 in a.out_shape or a.x.shape[1] == 0:
        y = xp.zeros(a.out_shape, dtype=a.x.dtype)
        if b is not None and y.size:
            y += b[None, :, None, None]
        return a.unbatch(y)
    y = a.backend.conv2d(a.x, a.weight, b, a.stride, a.padding, a.dilation, a.groups)
    return a.unbatch(y)


@_tensor_aware
def conv2d_backward(
    grad_out: Array,
    x: Array,
    weight: Array,
    stride: Pair = 1,
    padding: Pair | str = 0,
    dilation: Pair = 1,
    groups: int = 1,
    *,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients of :func:`conv2d` with respect to x, weight and bias.

    Returns ``(grad_x, grad_weight, grad_bias)``; an entry is None where
    ``output_mask`` is False (so the first layer can skip ``grad_x``).
    """
    op = "conv2d_backward"
    grad_out = _as_float_array(grad_out, op, "grad_out")
    a = _ConvArgs(op, x, weight, stride, padding, dilation, groups, extra_arrays=[grad_out])
    _same_dtype(op, a.x, "x", grad_out, "grad_out")
    gy = grad_out[None] if a.unbatched and grad_out.ndim == 3 else grad_out
    _check_grad_out(op, gy, a.out_shape)
    gy = _contig(gy)
    xp = _xp(a.x)
    need_x, need_w, need_b = output_mask
    n, c, hp, wp = a.x.shape
    kh, kw = a.weight.shape[2:]
    empty = gy.size == 0 or a.x.size == 0 or a.weight.size == 0
    gx = gw = gb = None
    if need_x:
        if empty:
            gx = xp.zeros(a.x.shape, dtype=a.x.dtype)
        else:
            gx = a.backend.conv2d_backward_input(
                gy, a.weight, (hp, wp), a.stride, a.padding, a.dilation, a.groups
            )
        if a.extra != (0, 0):
            gx = xp.ascontiguousarray(gx[:, :, : hp - a.extra[0], : wp - a.extra[1]])
        gx = a.unbatch(gx)
    if need_w:
        if empty:
            gw = xp.zeros(a.weight.shape, dtype=a.x.dtype)
        else:
            gw = a.backend.conv2d_backward_weight(
                gy, a.x, (kh, kw), a.stride, a.padding, a.dilation, a.groups
            )
    if need_b:
        gb = gy.sum(axis=(0, 2, 3), dtype=gy.dtype)
    return gx, gw, gb


# --------------------------------------------------------------------------
# matmul and linear
# --------------------------------------------------------------------------


def _matmul_operands(op: str, a: Any, b: Any, extra: tuple = ()) -> tuple[Array, Array, ModuleType]:
    a = _as_float_array(a, op, "a")
    b = _as_float_array(b, op, "b")
    _same_dtype(op, a, "a", b, "b")
    for name, m in (("a", a), ("b", b)):
        if m.ndim not in (2, 3):
            raise ValueError(f"{op}: {name} must be 2-D or 3-D (batched), got shape {m.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"{op}: inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}"
        )
    if a.ndim == 3 and b.ndim == 3 and a.shape[0] != b.shape[0]:
        if 1 not in (a.shape[0], b.shape[0]):
            raise ValueError(
                f"{op}: batch sizes differ: a has {a.shape[0]}, b has {b.shape[0]}"
            )
    return a, b, _pick_backend(op, [a, b, *extra])


def _mm(backend: ModuleType, a: Array, b: Array, ta: bool = False, tb: bool = False) -> Array:
    """op(a) @ op(b) for 2-D/3-D contiguous operands, broadcasting a batch of 1."""
    xp = _xp(a)
    m = a.shape[-1] if ta else a.shape[-2]
    k = a.shape[-2] if ta else a.shape[-1]
    n = b.shape[-2] if tb else b.shape[-1]
    batch = max(a.shape[0] if a.ndim == 3 else 1, b.shape[0] if b.ndim == 3 else 1)
    out_shape = (batch, m, n) if 3 in (a.ndim, b.ndim) else (m, n)
    if 0 in (m, n, batch):
        return xp.zeros(out_shape, dtype=a.dtype)
    if k == 0:
        return xp.zeros(out_shape, dtype=a.dtype)
    if a.ndim == 3 and b.ndim == 2 and not ta:
        # (B,M,K) @ (K,N) is one (B*M,K) @ (K,N) product: no batching needed.
        return backend.matmul(_contig(a).reshape(-1, a.shape[-1]), _contig(b), False, tb).reshape(
            out_shape
        )
    if a.ndim != b.ndim or (a.ndim == 3 and a.shape[0] != b.shape[0]):
        a3 = a if a.ndim == 3 else a[None]
        b3 = b if b.ndim == 3 else b[None]
        a = xp.broadcast_to(a3, (batch, *a3.shape[1:]))
        b = xp.broadcast_to(b3, (batch, *b3.shape[1:]))
    return backend.matmul(_contig(a), _contig(b), ta, tb)


@_tensor_aware
def matmul(a: Array, b: Array) -> Array:
    """``a @ b`` for 2-D (M,K)@(K,N) or batched 3-D (B,M,K)@(B,K,N) operands.

    A 2-D operand, or a batch of 1, broadcasts against a 3-D one.
    """
    a, b, backend = _matmul_operands("matmul", a, b)
    return _mm(backend, a, b)


def _reduce_batch(g: Array, like: Array) -> Array:
    """Sum a broadcast batch dimension back to ``like``'s shape."""
    if g.shape == like.shape:
        return g
    if like.ndim == 2:
        return _contig(g.reshape(-1, *like.shape).sum(axis=0))
    return _contig(g.sum(axis=0, keepdims=True))


@_tensor_aware
def matmul_backward(grad_out: Array, a: Array, b: Array) -> tuple[Array, Array]:
    """Gradients of :func:`matmul`: ``(grad_out @ b^T, a^T @ grad_out)``."""
    op = "matmul_backward"
    grad_out = _as_float_array(grad_out, op, "grad_out")
    a, b, backend = _matmul_operands(op, a, b, extra=(grad_out,))
    _same_dtype(op, a, "a", grad_out, "grad_out")
    batch = max(a.shape[0] if a.ndim == 3 else 1, b.shape[0] if b.ndim == 3 else 1)
    m, n = a.shape[-2], b.shape[-1]
    expected = (batch, m, n) if 3 in (a.ndim, b.ndim) else (m, n)
    _check_grad_out(op, grad_out, expected)
    gy = _contig(grad_out)
    ga = _reduce_batch(_mm(backend, gy, _contig(b), False, True), a)
    if a.ndim == 3 and b.ndim == 2:
        gb = _mm(backend, _contig(a).reshape(-1, a.shape[-1]), gy.reshape(-1, n), True, False)
    else:
        gb = _reduce_batch(_mm(backend, _contig(a), gy, True, False), b)
    return ga, gb


def _linear_operands(op: str, x: Any, weight: Any, extra: tuple = ()):
    x = _as_float_array(x, op, "x")
    weight = _as_float_array(weight, op, "weight")
    _same_dtype(op, x, "x", weight, "weight")
    if weight.ndim != 2:
        raise ValueError(
            f"{op}: weight must be 2-D (out_features, in_features), got shape {weight.shape}"
        )
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: x's last dimension must equal in_features={weight.shape[1]}, "
            f"got x of shape {tuple(x.shape)}"
        )
    return x, weight, _pick_backend(op, [x, weight, *extra])


@_tensor_aware
def linear(x: Array, weight: Array, bias: Array | None = None) -> Array:
    """``x @ weight.T + bias``: x (..., in), weight (out, in), bias (out,) -> (..., out)."""
    x, weight, backend = _linear_operands("linear", x, weight)
    b = _check_bias("linear", bias, weight.shape[0], x)
    x2 = _contig(x).reshape(-1, x.shape[-1])
    y = _mm(backend, x2, _contig(weight), False, True)
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], weight.shape[0])


@_tensor_aware
def linear_backward(
    grad_out: Array,
    x: Array,
    weight: Array,
    *,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients of :func:`linear`: ``(grad_x, grad_weight, grad_bias)``."""
    op = "linear_backward"
    grad_out = _as_float_array(grad_out, op, "grad_out")
    x, weight, backend = _linear_operands(op, x, weight, extra=(grad_out,))
    _same_dtype(op, x, "x", grad_out, "grad_out")
    _check_grad_out(op, grad_out, (*x.shape[:-1], weight.shape[0]))
    gy = _contig(grad_out).reshape(-1, weight.shape[0])
    x2 = _contig(x).reshape(-1, x.shape[-1])
    need_x, need_w, need_b = output_mask
    gx = _mm(backend, gy, _contig(weight)).reshape(x.shape) if need_x else None
    gw = _mm(backend, gy, x2, True, False) if need_w else None
    gb = gy.sum(axis=0, dtype=gy.dtype) if need_b else None
    return gx, gw, gb


# --------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------


def _pool_out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    # torch: the last window must start inside the input or the left padding.
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool_geometry(
    op: str, shape: tuple[int, ...], kernel_size: Any, stride: Any, padding: Any,
    dilation: Any, ceil_mode: Any, prefix: str = "", what: str = "input",
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int],
           tuple[int, int, int, int]]:
    """Validate pooling arguments over an (N, C, H, W) ``shape``; torch's rules.

    Returns kernel, stride, padding, dilation and the output shape. ``prefix``
    names the arguments (``pool_`` in the fused op), ``what`` the pooled array.
    """
    k = _pair(kernel_size, op, f"{prefix}kernel_size", 1)
    s = k if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) \
        else _pair(stride, op, f"{prefix}stride", 1)
    p = _pair(padding, op, f"{prefix}padding", 0)
    d = _pair(dilation, op, f"{prefix}dilation", 1)
    if not isinstance(ceil_mode, (bool, np.bool_)):
        raise TypeError(
            f"{op}: {prefix}ceil_mode must be a bool, got {type(ceil_mode).__name__}"
        )
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(
            f"{op}: {prefix}padding {p} must be at most half of {prefix}kernel_size {k} "
            "(torch's rule)"
        )
    n, c, h, w = shape
    eff = (d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1)
    if eff[0] > h + 2 * p[0] or eff[1] > w + 2 * p[1]:
        raise ValueError(
            f"{op}: {prefix}kernel_size {eff[0]}x{eff[1]} (after dilation) is larger than the "
            f"padded {what} {h + 2 * p[0]}x{w + 2 * p[1]}"
        )
    oh = _pool_out_size(h, k[0], s[0], p[0], d[0], bool(ceil_mode))
    ow = _pool_out_size(w, k[1], s[1], p[1], d[1], bool(ceil_mode))
    return k, s, p, d, (n, c, oh, ow)


class _PoolArgs:
    __slots__ = ("x", "unbatched", "kernel", "stride", "padding", "dilation", "out_shape",
                 "backend")

    def __init__(self, op, x, kernel_size, stride, padding, dilation, ceil_mode, extra=()):
        x = _as_float_array(x, op, "x")
        x, self.unbatched = _batched(x, op)
        k, s, p, d, out_shape = _pool_geometry(
            op, x.shape, kernel_size, stride, padding, dilation, ceil_mode
        )
        self.x = _contig(x)
        self.kernel, self.stride, self.padding, self.dilation = k, s, p, d
        self.out_shape = out_shape
        _check_alloc(op, self.out_shape, x.dtype)
        self.backend = _pick_backend(op, [x, *extra])

    def unbatch(self, a: Array) -> Array:
        return a[0] if self.unbatched else a

    def grad_out(self, op: str, grad_out: Array) -> Array:
        _same_dtype(op, self.x, "x", grad_out, "grad_out")
        gy = grad_out[None] if self.unbatched and grad_out.ndim == 3 else grad_out
        _check_grad_out(op, gy, self.out_shape)
        return _contig(gy)


@_tensor_aware
def max_pool2d(
    x: Array,
    kernel_size: Pair,
    stride: Pair | None = None,
    padding: Pair = 0,
    dilation: Pair = 1,
    ceil_mode: bool = False,
) -> Array:
    """Max pooling, as ``torch.nn.functional.max_pool2d``: (N,C,H,W) -> (N,C,OH,OW).

    ``stride`` defaults to ``kernel_size``. Padded cells never win; NaN propagates.
    """
    a = _PoolArgs("max_pool2d", x, kernel_size, stride, padding, dilation, ceil_mode)
    if 0 in a.out_shape:
        return a.unbatch(_xp(a.x).empty(a.out_shape, dtype=a.x.dtype))
    y = a.backend.max_pool2d(a.x, a.kernel, a.stride, a.padding, a.dilation, a.out_shape[2:])
    return a.unbatch(y)


@_tensor_aware
def max_pool2d_backward(
    grad_out: Array,
    x: Array,
    kernel_size: Pair,
    stride: Pair | None = None,
    padding: Pair = 0,
    dilation: Pair = 1,
    ceil_mode: bool = False,
) -> Array:
    """Gradient of :func:`max_pool2d` w.r.t. x; ties go to the first maximum."""
    op = "max_pool2d_backward"
    grad_out = _as_float_array(grad_out, op, "grad_out")
    a = _PoolArgs(op, x, kernel_size, stride, padding, dilation, ceil_mode, extra=[grad_out])
    gy = a.grad_out(op, grad_out)
    if gy.size == 0 or a.x.size == 0:
        return a.unbatch(_xp(a.x).zeros(a.x.shape, dtype=a.x.dtype))
    gx = a.backend.max_pool2d_backward(gy, a.x, a.kernel, a.stride, a.padding, a.dilation)
    return a.unbatch(gx)


def _divisor(op: str, divisor_override: Any) -> int | None:
    if divisor_override is None:
        return None
    d = _int(divisor_override, op, "divisor_override")
    if d == 0:
        raise ValueError(f"{op}: divisor_override must be non-zero")
    return d


@_tensor_aware
def avg_pool2d(
    x: Array,
    kernel_size: Pair,
    stride: Pair | None = None,
    padding: Pair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> Array:
    """Average pooling, as ``torch.nn.functional.avg_pool2d``: (N,C,H,W) -> (N,C,OH,OW).

    By default padded cells count in the divisor (``count_include_pad=True``).
    """
    op = "avg_pool2d"
    a = _PoolArgs(op, x, kernel_size, stride, padding, 1, ceil_mode)
    div = _divisor(op, divisor_override)
    if 0 in a.out_shape:
        return a.unbatch(_xp(a.x).empty(a.out_shape, dtype=a.x.dtype))
    y = a.backend.avg_pool2d(
        a.x, a.kernel, a.stride, a.padding, a.out_shape[2:], bool(count_include_pad), div
    )
    return a.unbatch(y)


@_tensor_aware
def avg_pool2d_backward(
    grad_out: Array,
    x: Array,
    kernel_size: Pair,
    stride: Pair | None = None,
    padding: Pair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> Array:
    """Gradient of :func:`avg_pool2d` w.r.t. x."""
    op = "avg_pool2d_backward"
    grad_out = _as_float_array(grad_out, op, "grad_out")
    a = _PoolArgs(op, x, kernel_size, stride, padding, 1, ceil_mode, extra=[grad_out])
    div = _divisor(op, divisor_override)
    gy = a.grad_out(op, grad_out)
    if gy.size == 0 or a.x.size == 0:
        return a.unbatch(_xp(a.x).zeros(a.x.shape, dtype=a.x.dtype))
    gx = a.backend.avg_pool2d_backward(
        gy, a.x.shape[2:], a.kernel, a.stride, a.padding, bool(count_include_pad), div
    )
    return a.unbatch(gx)


# --------------------------------------------------------------------------
# activations and losses
# --------------------------------------------------------------------------


@_tensor_aware
def relu(x: Array) -> Array:
    """max(x, 0) elementwise (NaN stays NaN)."""
    x = _as_float_array(x, "relu", "x")
    if x.size == 0:
        return _xp(x).empty(x.shape, dtype=x.dtype)
    return _pick_backend("relu", [x]).relu(_contig(x))


@_tensor_aware
def relu_backward(grad_out: Array, y: Array) -> Array:
    """grad_out where the ReLU output ``y`` is positive, else 0."""
    op = "relu_backward"
    grad_out = _as_float_array(grad_out, op, "grad_out")
    y = _as_float_array(y, op, "y")
    _same_dtype(op, y, "y", grad_out, "grad_out")
    _check_grad_out(op, grad_out, y.shape)
    if y.size == 0:
        return _xp(y).empty(y.shape, dtype=y.dtype)
    return _pick_backend(op, [grad_out, y]).relu_backward(_contig(grad_out), _contig(y))


@_tensor_aware
def sigmoid(x: Array) -> Array:
    """1 / (1 + exp(-x)), computed without overflow for large |x|."""
    x = _as_float_array(x, "sigmoid", "x")
    xp = _xp(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


@_tensor_aware
def tanh(x: Array) -> Array:
    """Hyperbolic tangent elementwise."""
    x = _as_float_array(x, "tanh", "x")
    return _xp(x).tanh(x)


@_tensor_aware
def log_softmax(x: Array, dim: int = -1) -> Array:
    """log(softmax(x)) along ``dim``, stable for large values."""
    x = _as_float_array(x, "log_softmax", "x")
    dim = _int(dim, "log_softmax", "dim")
    if not -x.ndim <= dim < max(x.ndim, 1):
        raise ValueError(f"log_softmax: dim {dim} out of range for {x.ndim}-D x")
    xp = _xp(x)
    m = x.max(axis=dim, keepdims=True) if x.size else x
    shifted = x - m
    return shifted - xp.log(xp.exp(shifted).sum(axis=dim, keepdims=True))


def _labels(op: str, labels: Any, n: int, k: int) -> Array:
    if not (_is_cupy(labels) or isinstance(labels, np.ndarray)):
        labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{op}: labels must be integers, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{op}: labels must have shape ({n},), got {tuple(labels.shape)}")
    if isinstance(labels, np.ndarray) and n and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"{op}: labels must lie in [0, {k}), got range "
                         f"[{labels.min()}, {labels.max()}]")
    # On the GPU the range check would force a host sync; the kernel guards instead.
    return _contig(labels.astype(_xp(labels).int64, copy=False))


@_tensor_aware
def softmax_cross_entropy(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Fused softmax + cross-entropy: ``(mean loss as a 0-d array, grad_logits)``.

    logits (N, K) float, labels (N,) integer class indices in [0, K).
    grad_logits = (softmax(logits) - onehot(labels)) / N.
    """
    op = "softmax_cross_entropy"
    logits = _as_float_array(logits, op, "logits")
    if logits.ndim != 2:
        raise ValueError(f"{op}: logits must be 2-D (N, classes), got shape {logits.shape}")
    n, k = logits.shape
    if k == 0:
        raise ValueError(f"{op}: logits must have at least one class")
    labels = _labels(op, labels, n, k)
    backend = _pick_backend(op, [logits, labels])
    if n == 0:
        xp = _xp(logits)
        return xp.asarray(xp.nan, dtype=logits.dtype), xp.empty_like(logits)
    return backend.softmax_cross_entropy(_contig(logits), labels)


@_tensor_aware
def cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy of (N, K) logits against (N,) integer labels."""
    return softmax_cross_entropy(logits, labels)[0]


@_tensor_aware
def mse_loss(input: Array, target: Array) -> Array:  # noqa: A002 - torch's name
    """Mean squared error over all elements, as a 0-d array."""
    input = _as_float_array(input, "mse_loss", "input")
    target = _as_float_array(target, "mse_loss", "target")
    _same_dtype("mse_loss", input, "input", target, "target")
    if input.shape != target.shape:
        raise ValueError(
            f"mse_loss: target shape {tuple(target.shape)} != input shape {tuple(input.shape)}"
        )
    d = input - target
    return (d * d).mean(dtype=input.dtype)


@_tensor_aware
def dropout(
    x: Array, p: float = 0.5, training: bool = True, rng: np.random.Generator | None = None
) -> Array:
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p)."""
    x = _as_float_array(x, "dropout", "x")
    if not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"dropout: p must be a probability in [0, 1], got {p!r}")
    if not training or p == 0:
        return x.copy()
    xp = _xp(x)
    if p == 1:
        return xp.zeros_like(x)
    if xp is np:
        keep = (rng or np.random.default_rng()).random(x.shape) >= p
    else:
        keep = xp.random.random(x.shape) >= p
    return x * (keep * x.dtype.type(1.0 / (1.0 - p)))


# --------------------------------------------------------------------------
# optimizer steps (in place)
# --------------------------------------------------------------------------


def _check_state(op: str, param: Array, **arrays: Any) -> None:
    """Optimizer state is updated in place: same type, dtype, shape, contiguous, writeable."""
    if not (_is_cupy(param) or isinstance(param, np.ndarray)) or param.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: param must be a float32/float64 NumPy or CuPy array")
    if not param.flags.c_contiguous:
        raise ValueError(f"{op}: param must be C-contiguous (it is updated in place)")
    for name, a in arrays.items():
        if a is None:
            continue
        if type(a) is not type(param) or a.dtype != param.dtype or a.shape != param.shape:
            raise ValueError(
                f"{op}: {name} must be a {param.dtype} array of shape {tuple(param.shape)} "
                f"like param, got {getattr(a, 'dtype', type(a).__name__)} "
                f"{tuple(getattr(a, 'shape', ()))}"
            )
        if not a.flags.c_contiguous:
            raise ValueError(f"{op}: {name} must be C-contiguous")
    for name, a in {"param": param, **arrays}.items():
        if name != "grad" and a is not None and not getattr(a.flags, "writeable", True):
            raise ValueError(f"{op}: {name} is read-only but is updated in place")


def _finite(op: str, **values: float) -> None:
    for name, v in values.items():
        if not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{op}: {name} must be a finite number, got {v!r}")


def sgd_step(
    param: Array,
    grad: Array,
    momentum_buf: Array | None,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> None:
    """One in-place SGD update with torch.optim.SGD semantics (dampening 0)."""
    op = "sgd_step"
    _check_state(op, param, grad=grad, momentum_buf=momentum_buf)
    _finite(op, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if momentum != 0 and momentum_buf is None:
        raise ValueError(f"{op}: momentum_buf is required when momentum != 0")
    if param.size == 0:
        return
    _pick_backend(op, [param]).sgd_step(
        param, grad, momentum_buf, float(lr), float(momentum), float(weight_decay), bool(nesterov)
    )


def adam_step(
    param: Array,
    grad: Array,
    exp_avg: Array,
    exp_avg_sq: Array,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> None:
    """One in-place Adam (``decoupled=False``) or AdamW update; ``step`` counts from 1."""
    op = "adam_step"
    _check_state(op, param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    _finite(op, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    step = _int(step, op, "step")
    if step < 1:
        raise ValueError(f"{op}: step must be >= 1, got {step}")
    if param.size == 0:
        return
    _pick_backend(op, [param]).adam_step(
        param, grad, exp_avg, exp_avg_sq, step, float(lr), float(beta1), float(beta2),
        float(eps), float(weight_decay), bool(decoupled),
    )


# --------------------------------------------------------------------------
# fused conv2d + ReLU + max_pool2d
# --------------------------------------------------------------------------


def _fused_pool_geometry(
    op: str, conv_out_shape: tuple[int, ...], kernel_size: Any, stride: Any, padding: Any,
    dilation: Any, ceil_mode: Any,
) -> tuple[Pair, Pair, Pair, Pair, tuple[int, int, int, int]]:
    """max_pool2d's checks for a pool over the conv output (argument names prefixed)."""
    return _pool_geometry(op, conv_out_shape, kernel_size, stride, padding, dilation,
                          ceil_mode, prefix="pool_", what="conv output")


@_tensor_aware
def conv2d_relu_max_pool2d(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    stride: Pair = 1,
    padding: Pair | str = 0,
    dilation: Pair = 1,
    groups: int = 1,
    pool_kernel_size: Pair = 2,
    pool_stride: Pair | None = None,
    pool_padding: Pair = 0,
    pool_dilation: Pair = 1,
    pool_ceil_mode: bool = False,
) -> Array:
    """``max_pool2d(relu(conv2d(x, weight, bias, ...)), pool_kernel_size, ...)`` in one op.

    x (N, C, H, W) or (C, H, W); weight (O, C/groups, KH, KW); bias (O,) or None.
    Returns (N, O, POH, POW), bit-identical to the three separate ops. On the cpu
    backend the (N, O, OH, OW) conv output is never materialised; the other
    backends compose the separate ops.
    """
    op = "conv2d_relu_max_pool2d"
    a = _ConvArgs(op, x, weight, stride, padding, dilation, groups)
    b = _check_bias(op, bias, a.out_shape[1], a.x)
    k, s, p, d, out_shape = _fused_pool_geometry(
        op, a.out_shape, pool_kernel_size, pool_stride, pool_padding, pool_dilation,
        pool_ceil_mode,
    )
    if 0 in out_shape or a.x.shape[1] == 0:
        # Degenerate shapes: the separate ops already handle them.
        y = conv2d(a.x, a.weight, b, a.stride, a.padding, a.dilation, a.groups)
        return a.unbatch(max_pool2d(relu(y), k, s, p, d, bool(pool_ceil_mode)))
    y = a.backend.conv2d_relu_max_pool2d(
        a.x, a.weight, b, a.stride, a.padding, a.dilation, a.groups, k, s, p, d, out_shape[2:]
    )
    return a.unbatch(y)


@_tensor_aware
def conv2d_relu_max_pool2d_backward(
    grad_out: Array,
    x: Array,
    weight: Array,
    bias: Array | None = None,
    stride: Pair = 1,
    padding: Pair | str = 0,
    dilation: Pair = 1,
    groups: int = 1,
    pool_kernel_size: Pair = 2,
    pool_stride: Pair | None = None,
    pool_padding: Pair = 0,
    pool_dilation: Pair = 1,
    pool_ceil_mode: bool = False,
    *,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients ``(grad_x, grad_weight, grad_bias)`` of :func:`conv2d_relu_max_pool2d`.

    grad_out has the fused output's shape (N, O, POH, POW). The forward is
    recomputed (``bias`` is needed for that), so nothing but the inputs has to
    be kept between forward and backward. An entry is None where
    ``output_mask`` is False. Same values as backpropagating through the three
    separate ops, up to the summation order of grad_weight/grad_bias.
    """
    op = "conv2d_relu_max_pool2d_backward"
    grad_out = _as_float_array(grad_out, op, "grad_out")
    a = _ConvArgs(op, x, weight, stride, padding, dilation, groups, extra_arrays=[grad_out])
    _same_dtype(op, a.x, "x", grad_out, "grad_out")
    b = _check_bias(op, bias, a.out_shape[1], a.x)
    k, s, p, d, out_shape = _fused_pool_geometry(
        op, a.out_shape, pool_kernel_size, pool_stride, pool_padding, pool_dilation,
        pool_ceil_mode,
    )
    gy = grad_out[None] if a.unbatched and grad_out.ndim == 3 else grad_out
    _check_grad_out(op, gy, out_shape)
    gy = _contig(gy)
    need_x, need_w, need_b = (bool(m) for m in output_mask)
    if gy.size == 0 or a.x.size == 0 or a.weight.size == 0:
        # Degenerate shapes: backpropagate through the separate ops.
        r = relu(conv2d(a.x, a.weight, b, a.stride, a.padding, a.dilation, a.groups))
        g = relu_backward(max_pool2d_backward(gy, r, k, s, p, d, bool(pool_ceil_mode)), r)
        gx, gw, gb = conv2d_backward(g, a.x, a.weight, a.stride, a.padding, a.dilation,
                                     a.groups, output_mask=(need_x, need_w, need_b))
    else:
        gx, gw, gb = a.backend.conv2d_relu_max_pool2d_backward(
            gy, a.x, a.weight, b, a.stride, a.padding, a.dilation, a.groups, k, s, p, d,
            need_x, need_w, need_b,
        )
    if gx is not None:
        if a.extra != (0, 0):
            hp, wp = a.x.shape[2:]
            gx = _xp(a.x).ascontiguousarray(gx[:, :, : hp - a.extra[0], : wp - a.extra[1]])
        gx = a.unbatch(gx)
    return gx, gw, gb
