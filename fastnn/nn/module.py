"""``Module`` (the base of layers and models) and ``Parameter``.

Parameters, buffers and submodules are ordinary attributes (so reading them in
``forward`` costs nothing extra); ``__setattr__`` only records their names, in
assignment order, for ``parameters()``, ``state_dict()`` and friends.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from fastnn._array import array_module
from fastnn.autograd import Tensor

__all__ = ["IncompatibleKeys", "Module", "Parameter"]


class Parameter(Tensor):
    """A leaf Tensor that a Module registers as trainable (``requires_grad=True``)."""

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True, dtype: Any = None) -> None:
        super().__init__(data, requires_grad=requires_grad, dtype=dtype)

    def __repr__(self) -> str:
        return f"Parameter({self.data!r})"


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class Module:
    """Base class: subclasses set parameters/submodules in ``__init__`` and define
    ``forward``; calling the module runs ``forward``.

    ``training`` is True after construction; ``train()``/``eval()`` set it on the
    whole tree (Dropout and BatchNorm2d read it).
    """

    training: bool

    def __init__(self) -> None:
        d = self.__dict__
        d["_param_names"] = {}
        d["_buffer_names"] = {}
        d["_module_names"] = {}
        d["training"] = True

    # ---- registration -----------------------------------------------------

    def _registry(self) -> tuple[dict, dict, dict]:
        d = self.__dict__
        if "_param_names" not in d:
            raise AttributeError(
                f"{type(self).__name__}.__init__ must call super().__init__() before "
                "assigning attributes"
            )
        return d["_param_names"], d["_buffer_names"], d["_module_names"]

    def __setattr__(self, name: str, value: Any) -> None:
        params, buffers, modules = self._registry()
        if isinstance(value, Parameter):
            buffers.pop(name, None)
            modules.pop(name, None)
            params[name] = None
        elif isinstance(value, Module):
            params.pop(name, None)
            buffers.pop(name, None)
            modules[name] = None
        elif name in params:
            if value is not None:
                raise TypeError(
                    f"cannot assign {type(value).__name__} to parameter {name!r} "
                    "(expected a Parameter or None)"
                )
        elif name in modules:
            if value is not None:
                raise TypeError(
                    f"cannot assign {type(value).__name__} to submodule {name!r} "
                    "(expected a Module or None)"
                )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        for reg in self._registry():
            reg.pop(name, None)
        object.__delattr__(self, name)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Add ``param`` (or a None placeholder, e.g. a disabled bias) as ``name``."""
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"register_parameter: {name!r} must be a Parameter or None")
        self._registry()[0][name] = None
        object.__setattr__(self, name, param)

    def register_buffer(self, name: str, array: Any) -> None:
        """Add a non-trainable array (e.g. running stats) saved in ``state_dict``."""
        if array is not None and (not hasattr(array, "shape") or isinstance(array, Tensor)):
            raise TypeError(f"register_buffer: {name!r} must be a NumPy/CuPy array or None")
        params, buffers, modules = self._registry()
        params.pop(name, None)
        modules.pop(name, None)
        buffers[name] = None
        object.__setattr__(self, name, array)

    def add_module(self, name: str, module: Module | None) -> None:
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module: {name!r} must be a Module or None")
        self._registry()[2][name] = None
        object.__setattr__(self, name, module)

    # ---- traversal --------------------------------------------------------

    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name in self._registry()[2]:
            m = self.__dict__.get(name)
            if m is not None:
                yield name, m

    def children(self) -> Iterator[Module]:
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module and every descendant, each once, depth first."""
        seen: set[int] = set()
        stack = [(prefix, self)]
        while stack:
            name, mod = stack.pop()
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            yield name, mod
            kids = [(f"{name}.{n}" if name else n, m) for n, m in mod.named_children()]
            stack.extend(reversed(kids))

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[
        tuple[str, Parameter]
    ]:
        """(dotted name, Parameter) pairs; a shared Parameter is listed once."""
        seen: set[int] = set()
        mods = self.named_modules(prefix) if recurse else iter([(prefix, self)])
        for mname, mod in mods:
            for pname in mod._registry()[0]:
                p = mod.__dict__.get(pname)
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mname}.{pname}" if mname else pname), p

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Any]]:
        mods = self.named_modules(prefix) if recurse else iter([(prefix, self)])
        for mname, mod in mods:
            for bname in mod._registry()[1]:
                b = mod.__dict__.get(bname)
                if b is not None:
                    yield (f"{mname}.{bname}" if mname else bname), b

    def buffers(self, recurse: bool = True) -> Iterator[Any]:
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    # ---- modes and grads --------------------------------------------------

    def train(self, mode: bool = True) -> Module:
        """Set ``training`` on this module and all descendants; returns self."""
        for m in self.modules():
            m.__dict__["training"] = bool(mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters():
            p.zero_grad(set_to_none)

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    # ---- calling ----------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # ---- state ------------------------------------------------------------

    def _state_entries(self) -> OrderedDict[str, tuple[Module, str]]:
        """name -> (owning module, attribute) for every parameter and buffer."""
        out: OrderedDict[str, tuple[Module, str]] = OrderedDict()
        for mname, mod in self.named_modules():
            params, buffers, _ = mod._registry()
            for attr in (*params, *buffers):
                if mod.__dict__.get(attr) is not None:
                    out[f"{mname}.{attr}" if mname else attr] = (mod, attr)
        return out

    def state_dict(self) -> OrderedDict[str, Any]:
        """Ordered name -> array copy of every parameter and buffer (e.g. BatchNorm's
        running stats), ready for ``numpy.savez``. Arrays stay on their device."""
        out: OrderedDict[str, Any] = OrderedDict()
        for key, (mod, attr) in self._state_entries().items():
            v = mod.__dict__[attr]
            out[key] = (v.data if isinstance(v, Tensor) else v).copy()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> (
        IncompatibleKeys
    ):
        """Copy arrays from ``state_dict`` into the parameters and buffers in place
        (so optimizers keep their references). Values are cast to each target's
        dtype and device.

        Raises ValueError for shape mismatches and, when ``strict``, for missing or
        unexpected keys; nothing is modified when it raises.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"load_state_dict: state_dict must be a mapping, got {type(state_dict).__name__}"
            )
        entries = self._state_entries()
        missing = [k for k in entries if k not in state_dict]
        unexpected = [k for k in state_dict if k not in entries]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected}")
            raise ValueError(f"load_state_dict ({type(self).__name__}): " + "; ".join(parts))
        plan = []
        for key, (mod, attr) in entries.items():
            if key not in state_dict:
                continue
            target = mod.__dict__[attr]
            dst = target.data if isinstance(target, Tensor) else target
            src = state_dict[key]
            if isinstance(src, Tensor):
                src = src.data
            shape = tuple(getattr(src, "shape", np.shape(src)))
            if shape != tuple(dst.shape):
                raise ValueError(
                    f"load_state_dict: shape mismatch for {key!r}: checkpoint has {shape}, "
                    f"model has {tuple(dst.shape)}"
                )
            plan.append((dst, src))
        for dst, src in plan:
            xp = array_module(dst)
            if xp is np and not isinstance(src, np.ndarray):
                src = src.get() if hasattr(src, "get") else np.asarray(src)
            dst[...] = xp.asarray(src).astype(dst.dtype, copy=False)
        return IncompatibleKeys(missing, unexpected)

    def to(self, device: str) -> Module:
        """Move parameters and buffers to ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy) in place."""
        if device not in ("cpu", "cuda"):
            raise ValueError(f"to: device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda":
            import cupy

            move = cupy.asarray
        else:
            def move(a: Any) -> np.ndarray:
                return a if isinstance(a, np.ndarray) else a.get()

        for _, (mod, attr) in self._state_entries().items():
            v = mod.__dict__[attr]
            if isinstance(v, Tensor):
                v.data = move(v.data)
                v.grad = None
                v._owned_grad = None
            else:
                object.__setattr__(mod, attr, move(v))
        return self

    # ---- printing ---------------------------------------------------------

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        kids = list(self.named_children())
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not kids:
            return head + ")"
        lines = [head]
        for name, m in kids:
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return "\n".join(lines) + "\n)"
