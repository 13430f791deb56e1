"""The C++ CPU backend: the native kernels of :mod:`fastnn._C`, exported as they are.

The ops are the :class:`fastnn.backends.contract.Backend` ops (shapes, layout,
semantics documented there), bound in ``csrc/bindings.cpp`` with the contract's
parameter names. No Python wrapper sits in between: ``fastnn._C`` checks every
argument again (ndim, shape, dtype, contiguity) and raises ValueError/TypeError
naming it; it never copies or converts. Every op returns a new array; the
optimizer steps update their arrays in place.

The kernels are multithreaded with fastnn's own pool (see
:func:`fastnn.set_num_threads`) and compiled for several ISAs; the best one the
CPU supports is used unless ``FASTNN_ISA=baseline|avx2|avx512`` asks for
another. Importing this module raises ImportError when the extension is not
built (``tools/dev_build.sh`` or ``pip install .``).
"""

from __future__ import annotations

import warnings

from fastnn import _C

# No native kernels for these (memory-bound and off the hot path): the CPU runs
# the NumPy code that numpy_ref and cuda share.
from fastnn.backends._array_ops import (
    dropout_masked,
    log_softmax,
    log_softmax_backward,
    mse_loss,
    mse_loss_backward,
    sigmoid,
    sigmoid_backward,
    tanh,
    tanh_backward,
)

__all__ = [
    "adam_step",
    "adam_step_multi",
    "avg_pool2d",
    "avg_pool2d_backward",
    "batch_norm2d",
    "batch_norm2d_backward",
    "batch_norm2d_relu",
    "batch_norm2d_relu_backward",
    "batch_norm2d_relu_max_pool2d",
    "batch_norm2d_relu_max_pool2d_backward",
    "conv2d",
    "conv2d_backward_input",
    "conv2d_backward_weight",
    "conv2d_relu_max_pool2d",
    "conv2d_relu_max_pool2d_backward",
    "dropout_masked",
    "is_available",
    "linear_relu",
    "linear_relu_backward",
    "log_softmax",
    "log_softmax_backward",
    "lookup_u8",
    "matmul",
    "max_pool2d",
    "max_pool2d_backward",
    "max_pool2d_with_indices",
    "mse_loss",
    "mse_loss_backward",
    "relu",
    "relu_backward",
    "sgd_step",
    "sgd_step_multi",
    "sigmoid",
    "sigmoid_backward",
    "softmax_cross_entropy",
    "tanh",
    "tanh_backward",
]

# FASTNN_ISA asked for an ISA this CPU cannot run (or an unknown name): the
# extension fell back to the best available one and left the reason here.
if _C._isa_warning is not None:
    warnings.warn(_C._isa_warning, RuntimeWarning, stacklevel=2)
# Likewise a malformed FASTNN_CACHE_SIZES (ignored: the detected sizes are used)
# or FASTNN_MEMORY_POOL_LIMIT (ignored: the default limit holds).
for _warning in (_C._cache_warning, _C._memory_pool_warning):
    if _warning is not None:
        warnings.warn(_warning, RuntimeWarning, stacklevel=2)


def is_available() -> bool:
    """True: importing this module already required the built extension."""
    return True


# The bindings take the contract's arguments as they are (pairs as any
# 2-sequence of ints, flags as bools) and return what it asks for (the fused
# backward a tuple), so a Python wrapper would only add a call frame.
conv2d = _C.conv2d
conv2d_backward_input = _C.conv2d_backward_input
conv2d_backward_weight = _C.conv2d_backward_weight
matmul = _C.matmul
max_pool2d = _C.max_pool2d
max_pool2d_backward = _C.max_pool2d_backward
max_pool2d_with_indices = _C.max_pool2d_with_indices
avg_pool2d = _C.avg_pool2d
avg_pool2d_backward = _C.avg_pool2d_backward
conv2d_relu_max_pool2d = _C.conv2d_relu_max_pool2d
conv2d_relu_max_pool2d_backward = _C.conv2d_relu_max_pool2d_backward
linear_relu = _C.linear_relu
linear_relu_backward = _C.linear_relu_backward
relu = _C.relu
relu_backward = _C.relu_backward
softmax_cross_entropy = _C.softmax_cross_entropy
lookup_u8 = _C.lookup_u8
sgd_step = _C.sgd_step
adam_step = _C.adam_step
sgd_step_multi = _C.sgd_step_multi
adam_step_multi = _C.adam_step_multi
batch_norm2d = _C.batch_norm2d
batch_norm2d_backward = _C.batch_norm2d_backward
batch_norm2d_relu = _C.batch_norm2d_relu
batch_norm2d_relu_backward = _C.batch_norm2d_relu_backward
batch_norm2d_relu_max_pool2d = _C.batch_norm2d_relu_max_pool2d
batch_norm2d_relu_max_pool2d_backward = _C.batch_norm2d_relu_max_pool2d_backward
