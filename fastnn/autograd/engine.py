"""Function, Context and the reverse-mode engine.

Rules for :class:`Function` authors (they keep backward allocation-free where it
can be): ``backward`` must not modify ``grad_out`` in place (it may be shared by
several inputs), may return views of it, and returns one gradient (or None) per
positional input of ``apply``.

A Function that sets ``op = "<name>"`` (and ``inputs``, the names of that
``fastnn.functional`` op's differentiable arguments) is the autograd node of
``fastnn.functional.<name>``: defining the class registers it, so
``F.<name>(tensor, ...)`` records the node, whatever mix of positional and
keyword arguments the call uses.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

from fastnn import functional as F
from fastnn.autograd.tensor import _GRAD_ENABLED, Array, Tensor, _as_array


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
    ``forward`` may also return a tuple ``(out, *extras)``: ``apply`` then returns
    ``(Tensor(out), *extras)``, the extras (e.g. pooling indices) as plain arrays.

    ``op``/``inputs``: see the module docstring.
    """

    op: ClassVar[str | None] = None
    inputs: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("op") is not None:
            F.register_tensor_handler(cls.op, _handler(cls))

    @staticmethod
    def forward(ctx: Context, *args: Any, **kwargs: Any) -> Array:
        raise NotImplementedError

    @staticmethod
    def backward(ctx: Context, grad_out: Array) -> Any:
        raise NotImplementedError

    @classmethod
    def apply(cls, *args: Any, **kwargs: Any) -> Any:
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
        out = cls.forward(ctx, *raw, **kwargs)
        extras = None
        if type(out) is tuple:
            out, extras = out[0], out[1:]
        out = _as_array(out)
        if any_need:
            ctx.parents = parents
            ctx.out_shape = out.shape
            t = Tensor._make(out, ctx)
        else:
            t = Tensor._make(out, None)
        return t if extras is None else (t, *extras)


def _handler(cls: type[Function]) -> Callable[..., Any]:
    """``F.<cls.op>``'s Tensor handler: the call's ``cls.inputs`` become apply's
    positional (differentiable) arguments, all other arguments its keywords."""
    op, inputs = cls.op, cls.inputs
    sig = inspect.signature(getattr(F, op))  # follows functools.wraps to the real one
    names = tuple(sig.parameters)
    unknown = [n for n in inputs if n not in names]
    if unknown:
        raise TypeError(f"{cls.__name__}: inputs {unknown} are not parameters of F.{op}")
    # Inputs first in F's signature (all but batch_norm2d): a call passing exactly
    # the inputs, positionally, goes straight to apply. Otherwise an input left out
    # is passed as None, so backward always sees one needs_input_grad per input.
    fast = names[:len(inputs)] == inputs
    n_in = len(inputs)
    apply = cls.apply

    def handler(*args: Any, **kwargs: Any) -> Any:
        if fast and not kwargs and len(args) == n_in:
            return apply(*args)
        try:
            arguments = sig.bind(*args, **kwargs).arguments
        except TypeError as exc:
            raise TypeError(f"{op}: {exc}") from None
        return apply(*[arguments.pop(n, None) for n in inputs], **arguments)

    handler.__name__ = handler.__qualname__ = f"{op}_tensor_handler"
    return handler


def _base(a: Array) -> Array:
    while a.base is not None:
        a = a.base
    return a


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


def _run_post_hooks(leaf: Tensor) -> None:
    for hook in list(leaf._post_hooks.values()):
        hook(leaf)


def _hooked_leaf_uses(order: list[Context]) -> dict[int, int]:
    """For each leaf with post-accumulate hooks: how many graph edges reach it, so
    its hooks run after the last one (a leaf used twice gets two contributions)."""
    uses: dict[int, int] = {}
    for node in order:
        for p in node.parents:
            if p is not None and type(p) is not Context and p._post_hooks:
                uses[id(p)] = uses.get(id(p), 0) + 1
    return uses


def _count_down(parents: list[Any], uses: dict[int, int]) -> None:
    """One node's edges are done: run the hooks of leaves that got their last one
    (also when no gradient flowed along it, so a hook runs once per pass)."""
    for p in parents:
        k = id(p)
        if k in uses:
            uses[k] -= 1
            if uses[k] == 0:
                del uses[k]
                _run_post_hooks(p)


def run_backward(root: Tensor, seed: Array, retain_graph: bool, user_seed: bool) -> None:
    handed_out: set[int] = set()
    if user_seed:
        handed_out.add(id(_base(seed)))
    if root._ctx is None:
        _accumulate_leaf(root, seed, handed_out)
        if root._post_hooks:
            _run_post_hooks(root)
        return
    if root._ctx.parents is None:
        raise RuntimeError(
            "backward: the graph was already freed by an earlier backward; pass "
            "retain_graph=True to the first call to backward twice"
        )
    order = _toposort(root._ctx)
    uses = _hooked_leaf_uses(order)
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
        if uses:
            _count_down(parents, uses)
        if not retain_graph:
            node.parents = None
            node.saved_tensors = ()
            node.__dict__.clear()
