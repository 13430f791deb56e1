"""torch.nn.functional-style API over fastnn's backends.

Layouts follow PyTorch: activations are NCHW (or unbatched CHW), conv weights
OIHW, ``linear`` weights (out_features, in_features). ``kernel_size``,
``stride``, ``padding`` and ``dilation`` are an int or a tuple/list of one or
two ints, accepted and rejected exactly as torch does (:mod:`fastnn.geometry`).
Inputs may be NumPy arrays (C++ "cpu" backend), CuPy arrays ("cuda" backend),
Python lists, or non-contiguous views; results are new C-contiguous arrays of
the input's float dtype.

Every argument is validated here, before any native code runs: bad input raises
``ValueError`` or ``TypeError`` naming the argument. Backends then receive
C-contiguous arrays of one dtype and plain int pairs (see
:mod:`fastnn.backends`).

If any argument is a ``fastnn.Tensor``, the call is forwarded to the autograd
layer, which registers its handlers in ``_TENSOR_HANDLERS``; this module never
imports autograd.
"""

from __future__ import annotations

from fastnn.functional._args import _TENSOR_HANDLERS  # noqa: F401 - autograd registers here
from fastnn.functional.activations import (
    cross_entropy,
    dropout,
    log_softmax,
    mse_loss,
    relu,
    relu_backward,
    sigmoid,
    softmax_cross_entropy,
    tanh,
)
from fastnn.functional.conv import conv2d, conv2d_backward
from fastnn.functional.fused import conv2d_relu_max_pool2d, conv2d_relu_max_pool2d_backward
from fastnn.functional.linalg import linear, linear_backward, matmul, matmul_backward
from fastnn.functional.optim_steps import adam_step, sgd_step
from fastnn.functional.pool import avg_pool2d, avg_pool2d_backward, max_pool2d, max_pool2d_backward

__all__ = [
    "adam_step",
    "avg_pool2d",
    "avg_pool2d_backward",
    "conv2d",
    "conv2d_backward",
    "conv2d_relu_max_pool2d",
    "conv2d_relu_max_pool2d_backward",
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
