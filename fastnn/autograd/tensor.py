"""Tensor and grad mode: an array plus the graph node that produced it.

:class:`Tensor` wraps one array (``.data``, NumPy or CuPy, any layout). Its
operators and methods are thin calls of the :class:`~fastnn.autograd.engine.Function`
subclasses in :mod:`.algebra` and :mod:`.functions`; ``backward`` runs the
engine. Gradients are raw arrays: after ``loss.backward()`` every leaf that
requires grad holds ``leaf.grad``, an array of its shape and dtype, C-contiguous.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fastnn._array import array_module as _xp
from fastnn._array import is_array as _is_array

Array = Any  # numpy.ndarray or cupy.ndarray


def _as_array(a: Any) -> Array:
    """NumPy scalars (what 0-d reductions return) become 0-d arrays; arrays pass."""
    if isinstance(a, np.generic):
        return np.asarray(a)
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

    __slots__ = (
        "data", "grad", "requires_grad", "_ctx", "_owned_grad", "_post_hooks", "__weakref__"
    )

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
        self._ctx: Any = None
        self._owned_grad: Array | None = None
        self._post_hooks: dict[int, Callable[[Tensor], None]] | None = None

    @classmethod
    def _make(cls, data: Array, ctx: Any) -> Tensor:
        """Fast constructor for op outputs (no conversion or checks)."""
        t = object.__new__(Tensor)
        t.data = data
        t.grad = None
        t.requires_grad = ctx is not None
        t._ctx = ctx
        t._owned_grad = None
        t._post_hooks = None
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
    def grad_fn(self) -> Any:
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

    def register_post_accumulate_grad_hook(self, hook: Callable[[Tensor], None]) -> _HookHandle:
        """Call ``hook(self)`` in every backward pass once this leaf's ``.grad`` is final
        (after its last contribution from that pass), as torch's hook of that name.
        Unlike torch's, it also runs when the leaf is in the graph but no gradient
        reached it (``.grad`` may then be None), so a caller hears once per pass
        from every leaf of the graph.

        Hooks of a leaf run in registration order; ``handle.remove()`` unregisters.
        Data-parallel training uses it to start reducing gradients while backward
        still runs (:mod:`fastnn.distributed`).
        """
        if self._ctx is not None:
            raise RuntimeError("register_post_accumulate_grad_hook: only leaf Tensors have one")
        if not callable(hook):
            raise TypeError(
                f"register_post_accumulate_grad_hook: hook must be callable, got {hook!r}"
            )
        if self._post_hooks is None:
            self._post_hooks = {}
        handle = _HookHandle(self._post_hooks)
        self._post_hooks[handle.id] = hook
        return handle

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
        run_backward(self, grad, retain_graph, user_seed)

    # ---- operators --------------------------------------------------------

    def __add__(self, other: Any) -> Tensor:
        return _alg.Add.apply(self, other)

    def __radd__(self, other: Any) -> Tensor:
        return _alg.Add.apply(other, self)

    def __sub__(self, other: Any) -> Tensor:
        return _alg.Sub.apply(self, other)

    def __rsub__(self, other: Any) -> Tensor:
        return _alg.Sub.apply(other, self)

    def __mul__(self, other: Any) -> Tensor:
        return _alg.Mul.apply(self, other)

    def __rmul__(self, other: Any) -> Tensor:
        return _alg.Mul.apply(other, self)

    def __truediv__(self, other: Any) -> Tensor:
        return _alg.Div.apply(self, other)

    def __rtruediv__(self, other: Any) -> Tensor:
        return _alg.Div.apply(other, self)

    def __neg__(self) -> Tensor:
        return _alg.Neg.apply(self)

    def __pow__(self, exponent: float) -> Tensor:
        return _alg.Pow.apply(self, exponent=exponent)

    def __matmul__(self, other: Any) -> Tensor:
        return _fn.MatMul.apply(self, other)

    def __rmatmul__(self, other: Any) -> Tensor:
        return _fn.MatMul.apply(other, self)

    def __getitem__(self, index: Any) -> Tensor:
        if isinstance(index, Tensor):
            index = index.data
        elif isinstance(index, tuple):
            index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
        return _alg.GetItem.apply(self, index=index)

    # ---- methods ----------------------------------------------------------

    def reshape(self, *shape: Any) -> Tensor:
        """Reshape (one -1 allowed); accepts ``reshape(a, b)`` or ``reshape((a, b))``."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _alg.Reshape.apply(self, shape=shape)

    view = reshape

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> Tensor:
        """Merge dims ``start_dim..end_dim`` (inclusive) into one."""
        nd = self.data.ndim
        if nd == 0:
            return _alg.Reshape.apply(self, shape=(1,))
        s = start_dim + nd if start_dim < 0 else start_dim
        e = end_dim + nd if end_dim < 0 else end_dim
        if not 0 <= s <= e < nd:
            raise ValueError(f"flatten: bad dims start_dim={start_dim}, end_dim={end_dim} "
                             f"for a {nd}-D tensor")
        shp = self.data.shape
        return _alg.Reshape.apply(self, shape=(*shp[:s], -1, *shp[e + 1:]))

    def transpose(self, *axes: int) -> Tensor:
        """Permute axes like ``numpy.transpose`` (no axes: reverse them)."""
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return _alg.Transpose.apply(self, axes=axes or None)

    @property
    def T(self) -> Tensor:  # noqa: N802 - NumPy's name
        return _alg.Transpose.apply(self, axes=None)

    def sum(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        return _alg.Sum.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        return _alg.Mean.apply(self, axis=axis, keepdims=keepdims)

    def relu(self) -> Tensor:
        return _fn.ReLU.apply(self)

    def sigmoid(self) -> Tensor:
        return _fn.Sigmoid.apply(self)

    def tanh(self) -> Tensor:
        return _fn.Tanh.apply(self)

    def exp(self) -> Tensor:
        return _alg.Exp.apply(self)

    def log(self) -> Tensor:
        return _alg.Log.apply(self)

    def abs(self) -> Tensor:
        return _alg.Abs.apply(self)

    def log_softmax(self, dim: int = -1) -> Tensor:
        return _fn.LogSoftmax.apply(self, dim=dim)

    def matmul(self, other: Any) -> Tensor:
        return _fn.MatMul.apply(self, other)

    def argmax(self, axis: int | None = None) -> Tensor:
        """Indices of the maxima (not differentiable)."""
        return Tensor._make(_as_array(self.data.argmax(axis=axis)), None)


class _HookHandle:
    """What :meth:`Tensor.register_post_accumulate_grad_hook` returns."""

    _next = [0]

    def __init__(self, hooks: dict[int, Any]) -> None:
        self._hooks = hooks
        self.id = self._next[0]
        self._next[0] += 1

    def remove(self) -> None:
        self._hooks.pop(self.id, None)


def tensor(data: Any, requires_grad: bool = False, dtype: Any = None) -> Tensor:
    """``Tensor(data, requires_grad, dtype)``, torch-style spelling."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


# The engine and the ops subclass Function, whose apply builds Tensors: bound
# here, after the class exists, to break the import cycle.
from fastnn.autograd import algebra as _alg  # noqa: E402
from fastnn.autograd import functions as _fn  # noqa: E402
from fastnn.autograd.engine import run_backward  # noqa: E402
