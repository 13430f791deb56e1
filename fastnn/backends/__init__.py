"""Backends: ``numpy`` (the reference oracle), ``cpu`` (C++ kernels) and ``cuda``
(Numba-CUDA kernels on CuPy arrays).

Every backend module exposes the same array-level ops, with the same names,
argument order and defaults. The contract -- which ops, what
``fastnn.functional`` has already validated, each op's shapes, layout and
semantics -- is :class:`fastnn.backends.contract.Backend`, a ``typing.Protocol``
that ``tests/test_backend_contract.py`` checks every backend against.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from collections.abc import Iterator
from types import ModuleType

BACKENDS = ("numpy", "cpu", "cuda")
_MODULES = {"numpy": "numpy_ref", "cpu": "cpu", "cuda": "cuda"}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fastnn_backend", default=None
)


_loaded: dict[str, ModuleType] = {}


def get_backend(name: str) -> ModuleType:
    """Import and return the backend module called ``name``."""
    module = _loaded.get(name)
    if module is not None:
        return module
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    _loaded[name] = module
    return module


def forced_backend() -> str | None:
    """The backend forced by an enclosing ``fastnn.backend(...)`` block, if any."""
    return _forced.get()


@contextlib.contextmanager
def backend(name: str) -> Iterator[ModuleType]:
    """Force every fastnn call inside the block onto backend ``name``.

    >>> with fastnn.backend("numpy"):
    ...     y = fastnn.functional.conv2d(x, w)
    """
    module = get_backend(name)
    token = _forced.set(name)
    try:
        yield module
    finally:
        _forced.reset(token)


def available_backends() -> list[str]:
    """Backends that import and can run here."""
    out = []
    for name in BACKENDS:
        try:
            mod = get_backend(name)
        except Exception:  # noqa: BLE001 - any import failure means unavailable
            continue
        check = getattr(mod, "is_available", None)
        if check is None or check():
            out.append(name)
    return out
