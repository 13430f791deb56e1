"""Tensor algebra primitives: broadcasting arithmetic, exp/log/abs, shape ops and
reductions. Each is a few lines of array methods NumPy and CuPy share; the
neural-network ops (whose math lives in ``fastnn.functional``) are in
:mod:`.functions`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from fastnn._array import array_module as _xp
from fastnn.autograd.engine import Context, Function
from fastnn.autograd.tensor import Array, Tensor, _as_array


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(getattr(a, "shape", ()))


def _unbroadcast(g: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``g`` over the axes that broadcasting added or stretched, to ``shape``."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    if lead > 0:
        g = g.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return _as_array(g).reshape(shape)



# --------------------------------------------------------------------------
# elementwise arithmetic (broadcasting)
# --------------------------------------------------------------------------


class Add(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Array:
        ctx.shapes = (_shape(a), _shape(b))
        return a + b

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        na, nb = ctx.needs_input_grad
        sa, sb = ctx.shapes
        return (_unbroadcast(g, sa) if na else None, _unbroadcast(g, sb) if nb else None)


class Sub(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Array:
        ctx.shapes = (_shape(a), _shape(b))
        return a - b

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        na, nb = ctx.needs_input_grad
        sa, sb = ctx.shapes
        return (_unbroadcast(g, sa) if na else None, _unbroadcast(-g, sb) if nb else None)


class Mul(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Array:
        na, nb = ctx.needs_input_grad
        ctx.save_for_backward(a if nb else None, b if na else None)
        ctx.shapes = (_shape(a), _shape(b))
        return a * b

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        na, nb = ctx.needs_input_grad
        a, b = ctx.saved_tensors
        sa, sb = ctx.shapes
        return (
            _unbroadcast(g * b, sa) if na else None,
            _unbroadcast(g * a, sb) if nb else None,
        )


class Div(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Array:
        ctx.save_for_backward(a, b)
        ctx.shapes = (_shape(a), _shape(b))
        return a / b

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        na, nb = ctx.needs_input_grad
        a, b = ctx.saved_tensors
        sa, sb = ctx.shapes
        ga = g / b
        return (
            _unbroadcast(ga, sa) if na else None,
            _unbroadcast(-ga * a / b, sb) if nb else None,
        )


class Neg(Function):
    @staticmethod
    def forward(ctx: Context, a: Array) -> Array:
        return -a

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        return -g


class Pow(Function):
    """``x ** exponent`` for a constant (non-Tensor) exponent."""

    @staticmethod
    def forward(ctx: Context, x: Array, exponent: float) -> Array:
        if isinstance(exponent, Tensor):
            raise TypeError("pow: exponent must be a number, not a Tensor")
        ctx.save_for_backward(x)
        ctx.exponent = exponent
        return x**exponent

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        (x,) = ctx.saved_tensors
        e = ctx.exponent
        return g * (e * x ** (e - 1))


class Exp(Function):
    @staticmethod
    def forward(ctx: Context, x: Array) -> Array:
        y = _xp(x).exp(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        return g * ctx.saved_tensors[0]


class Log(Function):
    @staticmethod
    def forward(ctx: Context, x: Array) -> Array:
        ctx.save_for_backward(x)
        return _xp(x).log(x)

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        return g / ctx.saved_tensors[0]


class Abs(Function):
    """|x|; the gradient at 0 is 0 (sign(0) = 0, as in torch)."""

    @staticmethod
    def forward(ctx: Context, x: Array) -> Array:
        ctx.save_for_backward(x)
        return _xp(x).abs(x)

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        x = ctx.saved_tensors[0]
        return g * _xp(x).sign(x)


# --------------------------------------------------------------------------
# shape ops and reductions
# --------------------------------------------------------------------------


class Reshape(Function):
    @staticmethod
    def forward(ctx: Context, x: Array, shape: tuple) -> Array:
        ctx.in_shape = x.shape
        try:
            return x.reshape(shape)
        except ValueError as exc:
            raise ValueError(f"reshape: cannot reshape {tuple(x.shape)} to {shape}: {exc}") from exc

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        return g.reshape(ctx.in_shape)


class Transpose(Function):
    @staticmethod
    def forward(ctx: Context, x: Array, axes: tuple[int, ...] | None) -> Array:
        ctx.axes = axes
        return x.transpose(axes) if axes is not None else x.transpose()

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        if ctx.axes is None:
            return g.transpose()
        return g.transpose(tuple(np.argsort(ctx.axes)))


class GetItem(Function):
    @staticmethod
    def forward(ctx: Context, x: Array, index: Any) -> Array:
        ctx.index = index
        ctx.in_shape = x.shape
        ctx.dtype = x.dtype
        return x[index]

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        xp = _xp(g)
        gx = xp.zeros(ctx.in_shape, dtype=ctx.dtype)
        # add.at sums repeated fancy indices instead of keeping only the last one.
        if xp is np or hasattr(xp.add, "at"):
            xp.add.at(gx, ctx.index, g)
        else:  # CuPy before ufunc.at
            import cupyx

            cupyx.scatter_add(gx, ctx.index, g)
        return gx


def _norm_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, numbers.Integral):
        axis = (axis,)
    out = []
    for a in axis:
        a = int(a)
        if not -ndim <= a < max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a {ndim}-D tensor")
        out.append(a % ndim if ndim else 0)
    return tuple(sorted(set(out)))


def _expand_reduced(g: Array, ctx: Context) -> Array:
    """Broadcast a reduction's grad back to the input shape (a read-only view)."""
    if not ctx.keepdims:
        shp = list(ctx.in_shape)
        for a in ctx.axes:
            shp[a] = 1
        g = g.reshape(shp)
    return _xp(g).broadcast_to(g, ctx.in_shape)


class Sum(Function):
    @staticmethod
    def forward(ctx: Context, x: Array, axis: Any = None, keepdims: bool = False) -> Array:
        ctx.axes = _norm_axes(axis, x.ndim)
        ctx.keepdims = keepdims
        ctx.in_shape = x.shape
        return x.sum(axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        return _expand_reduced(g, ctx)


class Mean(Function):
    @staticmethod
    def forward(ctx: Context, x: Array, axis: Any = None, keepdims: bool = False) -> Array:
        ctx.axes = _norm_axes(axis, x.ndim)
        ctx.keepdims = keepdims
        ctx.in_shape = x.shape
        ctx.count = math.prod(x.shape[a] for a in ctx.axes)
        return x.mean(axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        return _expand_reduced(g * (1.0 / max(ctx.count, 1)), ctx)

