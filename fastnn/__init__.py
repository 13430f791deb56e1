"""fastnn: fast conv2d, matmul and pooling kernels with a thin autograd.

The CPU kernels are C++ (``fastnn._C``), the GPU kernels Numba-CUDA on CuPy
arrays, and ``fastnn.backends.numpy_ref`` is the plain-NumPy reference they are
all tested against. Start with :mod:`fastnn.functional`.
"""

from __future__ import annotations

from fastnn._config import get_num_threads, set_num_threads, show_config
from fastnn.backends import available_backends, backend

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "available_backends",
    "backend",
    "get_num_threads",
    "set_num_threads",
    "show_config",
]
