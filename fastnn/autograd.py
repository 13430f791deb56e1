"""A thin reverse-mode autograd over NumPy/CuPy arrays.

:class:`Tensor` wraps one array (``.data``, NumPy or CuPy, any layout) and, when
it takes part in a differentiable computation, the graph node that made it.
Each op is a :class:`Function` whose ``forward`` runs on raw arrays through
:mod:`fastnn.functional` (which picks the numpy/cpu/cuda backend) or plain array
methods that NumPy and CuPy share, so this module knows nothing of backends.

Gradients are raw arrays too: after ``loss.backward()`` every leaf that requires
grad holds ``leaf.grad``, an array of the leaf's shape and dtype, C-contiguous.

Importing this module registers the Tensor-level ops in
``fastnn.functional._TENSOR_HANDLERS``, so ``F.conv2d(tensor, weight_tensor)``
records a graph node like ``Tensor.__matmul__`` does.

Rules for :class:`Function` authors (they keep backward allocation-free where it
can be): ``backward`` must not modify ``grad_out`` in place (it may be shared by
several inputs), may return views of it, and returns one gradient (or None) per
positional input of ``apply``.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from fastnn import functional as F

__all__ = [
    "Context",
    "Function",
    "Tensor",
    "batch_norm2d",
    "enable_grad",
    "is_grad_enabled",
    "no_grad",
    "tensor",
]

Array = Any  # numpy.ndarray or cupy.ndarray


# --------------------------------------------------------------------------
# array helpers
# --------------------------------------------------------------------------


def _xp(a: Array) -> ModuleType:
    """numpy or cupy, whichever owns ``a`` (cupy is only imported if already loaded)."""
    if type(a) is np.ndarray:
        return np
    if type(a).__module__.startswith("cupy"):
        return sys.modules["cupy"]
    return np


def _is_array(a: Any) -> bool:
    return type(a) is np.ndarray or type(a).__module__.startswith("cupy")


def _as_array(a: Any) -> Array:
    """NumPy scalars (what 0-d reductions return) become 0-d arrays; arrays pass."""
    if isinstance(a, np.generic):
        return np.asarray(a)
    return a


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


def _base(a: Array) -> Array:
    while a.base is not None:
        a = a.base
    return a


# --------------------------------------------------------------------------
# grad mode
# --------------------------------------------------------------------------

# A one-element list so the hot path reads it without a global statement.
_GRAD_ENABLED = [True]


def is_grad_enabled() -> bool:
    """Whether ops currently record the graph."""
    return _GRAD_ENABLED[0]


class _GradMode:
    """Context manager / decorator that sets grad recording to ``_mode``."""

    _mode = True

    def __enter__(self) -> None:
        self._prev = _GRAD_ENABLED[0]
        _GRAD_ENABLED[0] = self._mode

    def __exit__(self, *exc: object) -> None:
        _GRAD_ENABLED[0] = self._prev

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        import functools

        mode = self._mode

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            prev = _GRAD_ENABLED[0]
            _GRAD_ENABLED[0] = mode
            try:
                return fn(*args, **kwargs)
            finally:
                _GRAD_ENABLED[0] = prev

        return wrapper


class no_grad(_GradMode):  # noqa: N801 - torch's name
    """``with fastnn.no_grad():`` (or ``@no_grad()``) runs ops without recording."""

    _mode = False


class enable_grad(_GradMode):  # noqa: N801 - torch's name
    """Turn recording back on inside a :class:`no_grad` block."""

    _mode = True


# --------------------------------------------------------------------------
# Tensor
# --------------------------------------------------------------------------


class Tensor:
    """An array plus the graph node that produced it.

    ``Tensor(data, requires_grad=False, dtype=None)``: ``data`` is a NumPy or
    CuPy array (wrapped without a copy), another Tensor (its array is shared),
    or anything ``numpy.asarray`` accepts (lists, scalars; NumPy's dtype rules,
    so a list of floats becomes float64 unless ``dtype`` says otherwise).

    ``.grad`` is a raw array (not a Tensor) once a backward pass reached this
    leaf. Ops: ``+ - * / ** @`` (broadcasting like NumPy), unary ``-``,
    indexing, ``reshape``/``flatten``/``transpose``/``.T``, ``sum``/``mean``,
    ``relu``/``sigmoid``/``tanh``/``exp``/``log``/``abs``/``log_softmax``.
    """

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "_owned_grad", "__weakref__")

    # fastnn.functional recognises Tensors by this flag (it never imports us).
    _fastnn_tensor = True
    # NumPy defers `ndarray + Tensor` to Tensor.__radd__ instead of broadcasting
    # over an object array; the priority does the same for CuPy's operators.
    __array_ufunc__ = None
    __array_priority__ = 1000

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None) -> None:
        if isinstance(data, Tensor):
            data = data.data
        if not _is_array(data):
            try:
                data = np.asarray(data, dtype=dtype)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"Tensor: data could not be converted to an array: {exc}") from exc
        elif dtype is not None and data.dtype != np.dtype(dtype):
            data = data.astype(dtype)
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(
                f"Tensor: only floating-point tensors can require grad, got dtype {data.dtype}"
            )
        self.data = data
        self.grad: Array | None = None
        self.requires_grad = bool(requires_grad)
        self._ctx: Context | None = None
        self._owned_grad: Array | None = None

    @classmethod
    def _make(cls, data: Array, ctx: Context | None) -> Tensor:
        """Fast constructor for op outputs (no conversion or checks)."""
        t = object.__new__(Tensor)
        t.data = data
        t.grad = None
        t.requires_grad = ctx is not None
        t._ctx = ctx
        t._owned_grad = None
        return t

    # ---- properties -------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def is_leaf(self) -> bool:
        """True unless this Tensor was made by a recorded op."""
        return self._ctx is None

    @property
    def grad_fn(self) -> Context | None:
        """The graph node that produced this Tensor (None for leaves)."""
        return self._ctx

    @property
    def device(self) -> str:
        return "cpu" if _xp(self.data) is np else "cuda"

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        extra = ", requires_grad=True" if self.requires_grad else ""
        if self._ctx is not None:
            extra = f", grad_fn={self._ctx.fn.__name__}"
        return f"Tensor({self.data!r}{extra})"

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.numpy()
        return a if dtype is None else a.astype(dtype, copy=False)

    # ---- conversion -------------------------------------------------------

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (shared, not copied, when already on the host)."""
        d = self.data
        return d if _xp(d) is np else d.get()

    def item(self) -> float | int:
        """The single element as a Python number."""
        if self.data.size != 1:
            raise ValueError(f"item: tensor has {self.data.size} elements, expected 1")
        return self.data.reshape(()).item()

    def detach(self) -> Tensor:
        """A new leaf sharing this Tensor's data, cut from the graph."""
        return Tensor._make(self.data, None)

    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        """Set ``requires_grad`` on a leaf in place; returns self."""
        if self._ctx is not None and not requires_grad:
            raise RuntimeError("requires_grad_: only leaves can stop requiring grad; use detach()")
        if requires_grad and self.data.dtype.kind != "f":
            raise TypeError(f"requires_grad_: dtype {self.data.dtype} is not floating point")
        self.requires_grad = bool(requires_grad)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero in place) the accumulated gradient."""
        if set_to_none or self.grad is None:
            self.grad = None
            self._owned_grad = None
        elif self.grad is self._owned_grad:
            self.grad[...] = 0
        else:
            self.grad = _xp(self.data).zeros_like(self.data)
            self._owned_grad = self.grad

    # ---- backward ---------------------------------------------------------

    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf needing it.

        ``grad`` (the upstream gradient, self's shape) defaults to 1 for a
        single-element Tensor. The graph's saved arrays are freed afterwards
        unless ``retain_graph``.
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward: this Tensor does not require grad (no input required grad, "
                "or it was computed under no_grad)"
            )
        xp = _xp(self.data)
        user_seed = grad is not None
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward: grad can be omitted only for single-element outputs, "
                    f"got shape {self.shape}"
                )
            grad = xp.ones(self.data.shape, dtype=self.data.dtype)
        else:
            if isinstance(grad, Tensor):
                grad = grad.data
            if not _is_array(grad):
                grad = xp.asarray(grad, dtype=self.data.dtype)
            if tuple(grad.shape) != self.shape:
                raise ValueError(
                    f"backward: grad has shape {tuple(grad.shape)}, expected {self.shape}"
                )
        _run_backward(self, grad, retain_graph, user_seed)

    # ---- operators --------------------------------------------------------

    def __add__(self, other: Any) -> Tensor:
        return Add.apply(self, other)

    def __radd__(self, other: Any) -> Tensor:
        return Add.apply(other, self)

    def __sub__(self, other: Any) -> Tensor:
        return Sub.apply(self, other)

    def __rsub__(self, other: Any) -> Tensor:
        return Sub.apply(other, self)

    def __mul__(self, other: Any) -> Tensor:
        return Mul.apply(self, other)

    def __rmul__(self, other: Any) -> Tensor:
        return Mul.apply(other, self)

    def __truediv__(self, other: Any) -> Tensor:
        return Div.apply(self, other)

    def __rtruediv__(self, other: Any) -> Tensor:
        return Div.apply(other, self)

    def __neg__(self) -> Tensor:
        return Neg.apply(self)

    def __pow__(self, exponent: float) -> Tensor:
        return Pow.apply(self, exponent=exponent)

    def __matmul__(self, other: Any) -> Tensor:
        return MatMul.apply(self, other)

    def __rmatmul__(self, other: Any) -> Tensor:
        return MatMul.apply(other, self)

    def __getitem__(self, index: Any) -> Tensor:
        if isinstance(index, Tensor):
            index = index.data
        elif isinstance(index, tuple):
            index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
        return GetItem.apply(self, index=index)

    # ---- methods ----------------------------------------------------------

    def reshape(self, *shape: Any) -> Tensor:
        """Reshape (one -1 allowed); accepts ``reshape(a, b)`` or ``reshape((a, b))``."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return Reshape.apply(self, shape=shape)

    view = reshape

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> Tensor:
        """Merge dims ``start_dim..end_dim`` (inclusive) into one."""
        nd = self.data.ndim
        if nd == 0:
            return Reshape.apply(self, shape=(1,))
        s = start_dim + nd if start_dim < 0 else start_dim
        e = end_dim + nd if end_dim < 0 else end_dim
        if not 0 <= s <= e < nd:
            raise ValueError(f"flatten: bad dims start_dim={start_dim}, end_dim={end_dim} "
                             f"for a {nd}-D tensor")
        shp = self.data.shape
        return Reshape.apply(self, shape=(*shp[:s], -1, *shp[e + 1:]))

    def transpose(self, *axes: int) -> Tensor:
        """Permute axes like ``numpy.transpose`` (no axes: reverse them)."""
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return Transpose.apply(self, axes=axes or None)

    @property
    def T(self) -> Tensor:  # noqa: N802 - NumPy's name
        return Transpose.apply(self, axes=None)

    def sum(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        return Sum.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        return Mean.apply(self, axis=axis, keepdims=keepdims)

    def relu(self) -> Tensor:
        return ReLU.apply(self)

    def sigmoid(self) -> Tensor:
        return Sigmoid.apply(self)

    def tanh(self) -> Tensor:
        return Tanh.apply(self)

    def exp(self) -> Tensor:
        return Exp.apply(self)

    def log(self) -> Tensor:
        return Log.apply(self)

    def abs(self) -> Tensor:
        return Abs.apply(self)

    def log_softmax(self, dim: int = -1) -> Tensor:
        return LogSoftmax.apply(self, dim=dim)

    def matmul(self, other: Any) -> Tensor:
        return MatMul.apply(self, other)

    def argmax(self, axis: int | None = None) -> Tensor:
        """Indices of the maxima (not differentiable)."""
        return Tensor._make(_as_array(self.data.argmax(axis=axis)), None)


def tensor(data: Any, requires_grad: bool = False, dtype: Any = None) -> Tensor:
    """``Tensor(data, requires_grad, dtype)``, torch-style spelling."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


# --------------------------------------------------------------------------
# Function and the backward engine
# --------------------------------------------------------------------------


class Context:
    """Per-call state of a :class:`Function`, and the graph node of its output.

    ``save_for_backward(*arrays)`` stores what backward needs (read back as
    ``saved_tensors``); other attributes may be set freely. ``needs_input_grad``
    has one bool per positional input of ``apply``.
    """

    __slots__ = ("fn", "parents", "needs_input_grad", "saved_tensors", "out_shape", "__dict__")

    def save_for_backward(self, *arrays: Any) -> None:
        self.saved_tensors = arrays

    def __repr__(self) -> str:
        return f"<{self.fn.__name__} node>"


class Function:
    """Base class of differentiable ops.

    Subclasses define ``forward(ctx, *args, **kwargs) -> array`` on raw arrays
    (Tensor positional arguments arrive as their ``.data``; keyword arguments are
    never differentiated) and ``backward(ctx, grad_out) -> tuple`` with one
    gradient array (or None) per positional argument. Call them via ``apply``.
    """

    @staticmethod
    def forward(ctx: Context, *args: Any, **kwargs: Any) -> Array:
        raise NotImplementedError

    @staticmethod
    def backward(ctx: Context, grad_out: Array) -> Any:
        raise NotImplementedError

    @classmethod
    def apply(cls, *args: Any, **kwargs: Any) -> Tensor:
        ctx = Context()
        ctx.fn = cls
        recording = _GRAD_ENABLED[0]
        raw = []
        parents = []
        needs = []
        any_need = False
        for a in args:
            if isinstance(a, Tensor):
                raw.append(a.data)
                if recording and a.requires_grad:
                    # Link to the producing node, not the Tensor, so intermediate
                    # activations can be freed unless a Function saved them.
                    parents.append(a if a._ctx is None else a._ctx)
                    needs.append(True)
                    any_need = True
                    continue
            else:
                raw.append(a)
            parents.append(None)
            needs.append(False)
        ctx.needs_input_grad = tuple(needs)
        ctx.saved_tensors = ()
        out = _as_array(cls.forward(ctx, *raw, **kwargs))
        if not any_need:
            return Tensor._make(out, None)
        ctx.parents = parents
        ctx.out_shape = out.shape
        return Tensor._make(out, ctx)


def _toposort(root: Context) -> list[Context]:
    """Nodes reachable from ``root``, each before every node it depends on.

    Iterative post-order DFS, so deep graphs do not hit the recursion limit.
    """
    order: list[Context] = []
    visited = {id(root)}
    stack = [(root, iter(root.parents))]
    while stack:
        node, it = stack[-1]
        for p in it:
            if p is not None and type(p) is Context and id(p) not in visited:
                if p.parents is None:
                    raise RuntimeError(
                        f"backward: the graph through {p.fn.__name__} was already freed; "
                        "pass retain_graph=True to the first backward to go through it twice"
                    )
                visited.add(id(p))
                stack.append((p, iter(p.parents)))
                break
        else:
            stack.pop()
            order.append(node)
    order.reverse()
    return order


def _accumulate_leaf(t: Tensor, g: Array, handed_out: set[int]) -> None:
    """Add ``g`` into ``t.grad``, copying only when ``g`` may alias another grad."""
    if tuple(g.shape) != t.data.shape:
        raise RuntimeError(
            f"backward: gradient shape {tuple(g.shape)} does not match leaf shape {t.shape}"
        )
    if g.dtype != t.data.dtype:
        g = g.astype(t.data.dtype)  # a fresh array, so nothing else aliases it
    else:
        base = _base(g)
        # A view of an array already given to another leaf (e.g. both inputs of an
        # add), a broadcast view or a read-only view is copied so that .grad is
        # always a private, writable, contiguous array the optimizer can use.
        if (
            id(base) in handed_out
            or not g.flags.c_contiguous
            or not getattr(g.flags, "writeable", True)
        ):
            g = g.copy()
        else:
            handed_out.add(id(base))
    cur = t.grad
    if cur is None:
        t.grad = g
        t._owned_grad = None  # may be referenced elsewhere: never add into it in place
    elif cur is t._owned_grad:
        cur += g
    else:
        t.grad = t._owned_grad = _as_array(cur + g)


def _run_backward(root: Tensor, seed: Array, retain_graph: bool, user_seed: bool) -> None:
    handed_out: set[int] = set()
    if user_seed:
        handed_out.add(id(_base(seed)))
    if root._ctx is None:
        _accumulate_leaf(root, seed, handed_out)
        return
    if root._ctx.parents is None:
        raise RuntimeError(
            "backward: the graph was already freed by an earlier backward; pass "
            "retain_graph=True to the first call to backward twice"
        )
    order = _toposort(root._ctx)
    grads: dict[int, Array] = {id(root._ctx): seed}
    owned: set[int] = set()  # accumulation buffers this engine allocated
    for node in order:
        g = grads.pop(id(node), None)
        parents = node.parents
        if g is not None:
            res = node.fn.backward(node, g)
            del g
            if not isinstance(res, tuple):
                res = (res,)
            for p, gi in zip(parents, res):
                if p is None or gi is None:
                    continue
                gi = _as_array(gi)
                if type(p) is not Context:  # a leaf Tensor
                    _accumulate_leaf(p, gi, handed_out)
                    continue
                if gi.shape != p.out_shape:
                    raise RuntimeError(
                        f"backward: {node.fn.__name__} returned a gradient of shape "
                        f"{tuple(gi.shape)} for an input of shape {tuple(p.out_shape)}"
                    )
                k = id(p)
                cur = grads.get(k)
                if cur is None:
                    grads[k] = gi
                elif k in owned:
                    cur += gi
                else:
                    grads[k] = _as_array(cur + gi)
                    owned.add(k)
        if not retain_graph:
            node.parents = None
            node.saved_tensors = ()
            node.__dict__.clear()


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


# --------------------------------------------------------------------------
# fastnn.functional ops
# --------------------------------------------------------------------------


class MatMul(Function):
    @staticmethod
    def forward(ctx: Context, a: Array, b: Array) -> Array:
        ctx.save_for_backward(a, b)
        return F.matmul(a, b)

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        a, b = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        if na and nb:
            return F.matmul_backward(g, a, b)
        if na and a.ndim == 2 and b.ndim == 2:
            # Only d/da = g @ b^T is needed (b is a constant): skip the other product.
            return F.linear(g, b), None
        ga, gb = F.matmul_backward(g, a, b)
        return (ga if na else None), (gb if nb else None)


class Linear(Function):
    @staticmethod
    def forward(ctx: Context, x: Array, weight: Array, bias: Array | None) -> Array:
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        x, w = ctx.saved_tensors
        return F.linear_backward(g, x, w, output_mask=ctx.needs_input_grad)


class Conv2d(Function):
    @staticmethod
    def forward(
        ctx: Context, x: Array, weight: Array, bias: Array | None, stride: Any = 1,
        padding: Any = 0, dilation: Any = 1, groups: int = 1,
    ) -> Array:
        ctx.save_for_backward(x, weight)
        ctx.geom = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        x, w = ctx.saved_tensors
        # output_mask skips e.g. grad_x of the first layer, whose input is data.
        return F.conv2d_backward(g, x, w, *ctx.geom, output_mask=ctx.needs_input_grad)


class MaxPool2d(Function):
    @staticmethod
    def forward(
        ctx: Context, x: Array, kernel_size: Any, stride: Any = None, padding: Any = 0,
        dilation: Any = 1, ceil_mode: bool = False,
    ) -> Array:
        ctx.save_for_backward(x)
        ctx.args = (kernel_size, stride, padding, dilation, ceil_mode)
        return F.max_pool2d(x, *ctx.args)

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        return F.max_pool2d_backward(g, ctx.saved_tensors[0], *ctx.args)


class Conv2dReLUMaxPool2d(Function):
    """max_pool2d(relu(conv2d(x))) as one node: nothing conv-output-sized is kept for
    backward (only x, weight and bias; the backward recomputes the conv)."""

    @staticmethod
    def forward(
        ctx: Context, x: Array, weight: Array, bias: Array | None, stride: Any = 1,
        padding: Any = 0, dilation: Any = 1, groups: int = 1, pool_kernel_size: Any = 2,
        pool_stride: Any = None, pool_padding: Any = 0, pool_dilation: Any = 1,
        pool_ceil_mode: bool = False,
    ) -> Array:
        ctx.save_for_backward(x, weight, bias)
        ctx.args = (stride, padding, dilation, groups, pool_kernel_size, pool_stride,
                    pool_padding, pool_dilation, pool_ceil_mode)
        return F.conv2d_relu_max_pool2d(x, weight, bias, *ctx.args)

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        x, w, b = ctx.saved_tensors
        return F.conv2d_relu_max_pool2d_backward(g, x, w, b, *ctx.args,
                                                 output_mask=ctx.needs_input_grad)


class AvgPool2d(Function):
    @staticmethod
    def forward(
        ctx: Context, x: Array, kernel_size: Any, stride: Any = None, padding: Any = 0,
        ceil_mode: bool = False, count_include_pad: bool = True,
        divisor_override: int | None = None,
    ) -> Array:
        ctx.save_for_backward(x)
        ctx.args = (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        return F.avg_pool2d(x, *ctx.args)

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        return F.avg_pool2d_backward(g, ctx.saved_tensors[0], *ctx.args)


class ReLU(Function):
    @staticmethod
    def forward(ctx: Context, x: Array) -> Array:
        y = F.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        return F.relu_backward(g, ctx.saved_tensors[0])


class Sigmoid(Function):
    @staticmethod
    def forward(ctx: Context, x: Array) -> Array:
        y = F.sigmoid(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        (y,) = ctx.saved_tensors
        return g * (y * (1 - y))


class Tanh(Function):
    @staticmethod
    def forward(ctx: Context, x: Array) -> Array:
        y = F.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class LogSoftmax(Function):
    @staticmethod
    def forward(ctx: Context, x: Array, dim: int = -1) -> Array:
        y = F.log_softmax(x, dim)
        ctx.save_for_backward(y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        (y,) = ctx.saved_tensors
        xp = _xp(y)
        return g - xp.exp(y) * g.sum(axis=ctx.dim, keepdims=True)


class CrossEntropy(Function):
    """Mean softmax cross-entropy; the fused kernel gives the logits' grad for free."""

    @staticmethod
    def forward(ctx: Context, logits: Array, labels: Array) -> Array:
        loss, grad = F.softmax_cross_entropy(logits, labels)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        (grad,) = ctx.saved_tensors
        return grad * g, None


class MSELoss(Function):
    @staticmethod
    def forward(ctx: Context, a: Array, b: Array) -> Array:
        ctx.save_for_backward(a, b)
        return F.mse_loss(a, b)

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        a, b = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        ga = (a - b) * (g * (2.0 / max(a.size, 1)))
        return (ga if na else None, -ga if nb else None)


_DROP_ALL = object()  # Dropout's mask when p == 1


class Dropout(Function):
    """Inverted dropout; draws its mask exactly like ``fastnn.functional.dropout``."""

    @staticmethod
    def forward(
        ctx: Context, x: Array, p: float = 0.5, training: bool = True,
        rng: np.random.Generator | None = None,
    ) -> Array:
        if not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"dropout: p must be a probability in [0, 1], got {p!r}")
        xp = _xp(x)
        if not training or p == 0:
            ctx.scale = None
            return x
        if p == 1:
            ctx.scale = _DROP_ALL
            return xp.zeros_like(x)
        if xp is np:
            keep = (rng or np.random.default_rng()).random(x.shape) >= p
        else:
            keep = xp.random.random(x.shape) >= p
        # Same values as functional's keep * dtype(1/(1-p)), kept in x's dtype on CuPy too.
        scale = keep.astype(x.dtype)
        scale *= x.dtype.type(1.0 / (1.0 - p))
        ctx.scale = scale
        return x * scale

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        s = ctx.scale
        if s is None:
            return g
        if s is _DROP_ALL:
            return _xp(g).zeros_like(g)
        return g * s


class BatchNorm2dTrain(Function):
    """Batch-statistics BatchNorm over (N, H, W) per channel of NCHW ``x``.

    ``mean``/``var`` (biased) must be the batch statistics of ``x``: they are
    passed in so the caller can update running stats without recomputing them,
    and backward differentiates through them.
    """

    @staticmethod
    def forward(
        ctx: Context, x: Array, weight: Array | None, bias: Array | None,
        mean: Array, var: Array, eps: float,
    ) -> Array:
        c = x.shape[1]
        invstd = (1.0 / _xp(x).sqrt(var + eps)).astype(x.dtype, copy=False)
        mean = mean.astype(x.dtype, copy=False)
        # y = x * a + shift per channel: two passes over x instead of four; backward
        # rebuilds xhat from x rather than keeping a second activation-sized array.
        a = invstd if weight is None else invstd * weight
        shift = -mean * a if bias is None else bias - mean * a
        y = x * a.reshape(1, c, 1, 1)
        y += shift.reshape(1, c, 1, 1)
        ctx.save_for_backward(x, mean, invstd, weight)
        return y

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        x, mean, invstd, w = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        c = g.shape[1]
        axes = (0, 2, 3)
        xhat = x - mean.reshape(1, c, 1, 1)
        xhat *= invstd.reshape(1, c, 1, 1)
        gb = g.sum(axis=axes)
        gw = (g * xhat).sum(axis=axes)
        gx = None
        if nx:
            m = g.size // max(c, 1)
            # With dxhat = g * w: sum(dxhat) = w * gb and sum(dxhat * xhat) = w * gw, so
            # gx = invstd / m * (m * dxhat - sum(dxhat) - xhat * sum(dxhat * xhat))
            # = (w * invstd / m) * (m * g - gb - xhat * gw), built in place.
            k = invstd / m if w is None else invstd * w / m
            gx = g * m
            gx -= gb.reshape(1, c, 1, 1)
            xhat *= gw.reshape(1, c, 1, 1)
            gx -= xhat
            gx *= k.reshape(1, c, 1, 1)
        return gx, gw if nw else None, gb if nb else None, None, None, None


def batch_norm2d(
    x: Any,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Array | None = None,
) -> Tensor:
    """BatchNorm over NCHW ``x`` per channel, as ``torch.nn.functional.batch_norm``.

    Training (or no running stats): normalise with the batch mean and biased
    variance over (N, H, W) and, if running stats are given, update them in
    place: ``running = (1 - momentum) * running + momentum * batch`` with the
    unbiased batch variance (``momentum=None``: cumulative average, which needs
    ``num_batches_tracked``). Eval: normalise with the running stats.
    """
    if not isinstance(x, Tensor):
        x = Tensor(x)
    if x.ndim != 4:
        raise ValueError(f"batch_norm2d: x must be 4-D (N, C, H, W), got shape {x.shape}")
    c = x.shape[1]
    for name, a in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if a is not None and tuple(a.shape) != (c,):
            raise ValueError(f"batch_norm2d: {name} must have shape ({c},), got {tuple(a.shape)}")
    if training or running_mean is None:
        xd = x.data
        m = xd.size // max(c, 1)
        if m < 2 and training:
            raise ValueError(
                f"batch_norm2d: expected more than 1 value per channel when training, "
                f"got input of shape {x.shape}"
            )
        mean = xd.mean(axis=(0, 2, 3))
        var = xd.var(axis=(0, 2, 3))
        if training and running_mean is not None:
            if num_batches_tracked is not None:
                num_batches_tracked += 1
            if momentum is None:
                if num_batches_tracked is None:
                    raise ValueError("batch_norm2d: momentum=None needs num_batches_tracked")
                mom = 1.0 / float(num_batches_tracked)
            else:
                mom = float(momentum)
            running_mean *= 1 - mom
            running_mean += mom * mean
            running_var *= 1 - mom
            running_var += (mom * m / max(m - 1, 1)) * var
        return BatchNorm2dTrain.apply(x, weight, bias, mean=mean, var=var, eps=eps)
    xp = _xp(running_var)
    invstd = 1.0 / xp.sqrt(running_var + eps)
    # Eval is an affine map per channel; build it from Tensor ops (Tensor operands
    # on the left, so CuPy never sees a Tensor) so weight and bias still get grads.
    scale = invstd if weight is None else weight * invstd
    shift = scale * (-running_mean)
    if bias is not None:
        shift = bias + shift
    return x * scale.reshape(1, c, 1, 1) + shift.reshape(1, c, 1, 1)


# --------------------------------------------------------------------------
# functional handlers
# --------------------------------------------------------------------------


def _conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return Conv2d.apply(x, weight, bias, stride=stride, padding=padding, dilation=dilation,
                        groups=groups)


def _conv2d_relu_max_pool2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                            pool_kernel_size=2, pool_stride=None, pool_padding=0,
                            pool_dilation=1, pool_ceil_mode=False):
    return Conv2dReLUMaxPool2d.apply(
        x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
        pool_kernel_size=pool_kernel_size, pool_stride=pool_stride, pool_padding=pool_padding,
        pool_dilation=pool_dilation, pool_ceil_mode=pool_ceil_mode,
    )


def _linear(x, weight, bias=None):
    return Linear.apply(x, weight, bias)


def _matmul(a, b):
    return MatMul.apply(a, b)


def _max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    return MaxPool2d.apply(x, kernel_size=kernel_size, stride=stride, padding=padding,
                           dilation=dilation, ceil_mode=ceil_mode)


def _avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                divisor_override=None):
    return AvgPool2d.apply(x, kernel_size=kernel_size, stride=stride, padding=padding,
                           ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                           divisor_override=divisor_override)


def _relu(x):
    return ReLU.apply(x)


def _sigmoid(x):
    return Sigmoid.apply(x)


def _tanh(x):
    return Tanh.apply(x)


def _log_softmax(x, dim=-1):
    return LogSoftmax.apply(x, dim=dim)


def _cross_entropy(logits, labels):
    if isinstance(labels, Tensor):
        labels = labels.data
    return CrossEntropy.apply(logits, labels)


def _mse_loss(input, target):  # noqa: A002 - torch's name
    return MSELoss.apply(input, target)


def _dropout(x, p=0.5, training=True, rng=None):
    return Dropout.apply(x, p=p, training=training, rng=rng)


_HANDLERS: dict[str, Callable[..., Tensor]] = {
    "conv2d": _conv2d,
    "conv2d_relu_max_pool2d": _conv2d_relu_max_pool2d,
    "linear": _linear,
    "matmul": _matmul,
    "max_pool2d": _max_pool2d,
    "avg_pool2d": _avg_pool2d,
    "relu": _relu,
    "sigmoid": _sigmoid,
    "tanh": _tanh,
    "log_softmax": _log_softmax,
    "cross_entropy": _cross_entropy,
    "mse_loss": _mse_loss,
    "dropout": _dropout,
}
F._TENSOR_HANDLERS.update(_HANDLERS)

