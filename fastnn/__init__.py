"""fastnn: fast conv2d, matmul and pooling kernels with a thin autograd.

The CPU kernels are C++ (``fastnn._C``), the GPU kernels Numba-CUDA on CuPy
arrays, and ``fastnn.backends.numpy_ref`` is the plain-NumPy reference they are
all tested against. Start with :mod:`fastnn.functional`.
"""

from __future__ import annotations

from fastnn._config import (
    empty_memory_pool,
    get_num_threads,
    memory_pool_stats,
    park_threads,
    set_memory_pool_limit,
    set_num_threads,
    show_config,
)
from fastnn.backends import available_backends, backend

__version__ = "0.1.0"

# Imported on first use, so `import fastnn` stays cheap and the kernels never
# depend on the autograd layer.
_LAZY = {
    "Tensor": ("fastnn.autograd", "Tensor"),
    "Function": ("fastnn.autograd", "Function"),
    "no_grad": ("fastnn.autograd", "no_grad"),
    "enable_grad": ("fastnn.autograd", "enable_grad"),
    "is_grad_enabled": ("fastnn.autograd", "is_grad_enabled"),
    "manual_seed": ("fastnn.nn.init", "manual_seed"),
    "gradcheck": ("fastnn.gradcheck", "gradcheck"),
    "functional": ("fastnn.functional", None),
    "nn": ("fastnn.nn", None),
    "optim": ("fastnn.optim", None),
    "data": ("fastnn.data", None),
    "models": ("fastnn.models", None),
    "retain_freed_memory": ("fastnn._malloc", "retain_freed_memory"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastnn' has no attribute {name!r}")


__all__ = [
    "Function",
    "Tensor",
    "__version__",
    "data",
    "models",
    "enable_grad",
    "is_grad_enabled",
    "manual_seed",
    "functional",
    "gradcheck",
    "nn",
    "no_grad",
    "optim",
    "available_backends",
    "backend",
    "empty_memory_pool",
    "get_num_threads",
    "memory_pool_stats",
    "park_threads",
    "retain_freed_memory",
    "set_memory_pool_limit",
    "set_num_threads",
    "show_config",
]
