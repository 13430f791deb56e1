"""torch.nn.functional-style API over fastnn's backends.

Layouts follow PyTorch: activations are NCHW (or unbatched CHW), conv weights
OIHW, ``linear`` weights (out_features, in_features). ``kernel_size``,
``stride``, ``padding`` and ``dilation`` are an int or a tuple/list of one or
two ints, accepted and rejected exactly as torch does (:mod:`fastnn.geometry`).
Inputs may be NumPy arrays (C++ "cpu" backend), CuPy arrays ("cuda" backend),
Python lists, or non-contiguous views; results are new C-contiguous arrays of
the input's float dtype. Other DLPack producers (torch tensors, JAX arrays) are
viewed without a copy (host memory as NumPy, CUDA memory as CuPy) and results
come back as the first such argument's kind: torch in, torch out. A torch
tensor that requires grad is a TypeError (no torch autograd is recorded here;
``fastnn.torch`` has the differentiable ops).

Every argument is validated here, before any native code runs: bad input raises
``ValueError`` or ``TypeError`` naming the argument. Backends then receive
C-contiguous arrays of one dtype and plain int pairs (see
:mod:`fastnn.backends`).

Each differentiable op ``op`` has ``op_backward`` (gradients from the forward's
inputs or output); ops whose backward needs more than that have
``op_forward`` returning it too (``dropout_forward``: the mask,
``batch_norm2d_forward``, ``batch_norm2d_relu_forward`` and
``batch_norm2d_relu_max_pool2d_forward``: the statistics).

If any argument is a ``fastnn.Tensor``, the call is forwarded to the autograd
layer, which registers its handlers with :func:`register_tensor_handler`; this
module never imports autograd.
"""

from __future__ import annotations

from fastnn.functional._args import (
    _TENSOR_HANDLERS,  # noqa: F401 - the registry, for tests
    register_tensor_handler,
)
from fastnn.functional.activations import (
    log_softmax,
    log_softmax_backward,
    relu,
    relu_backward,
    sigmoid,
    sigmoid_backward,
    tanh,
    tanh_backward,
)
from fastnn.functional.conv import conv2d, conv2d_backward
from fastnn.functional.dropout import dropout, dropout_backward, dropout_forward, dropout_mask
from fastnn.functional.fused import conv2d_relu_max_pool2d, conv2d_relu_max_pool2d_backward
from fastnn.functional.linalg import (
    linear,
    linear_backward,
    linear_relu,
    linear_relu_backward,
    matmul,
    matmul_backward,
)
from fastnn.functional.losses import (
    cross_entropy,
    mse_loss,
    mse_loss_backward,
    softmax_cross_entropy,
)
from fastnn.functional.normalization import (
    batch_norm2d,
    batch_norm2d_backward,
    batch_norm2d_forward,
    batch_norm2d_relu,
    batch_norm2d_relu_backward,
    batch_norm2d_relu_forward,
    batch_norm2d_relu_max_pool2d,
    batch_norm2d_relu_max_pool2d_backward,
    batch_norm2d_relu_max_pool2d_forward,
)
from fastnn.functional.optim_steps import adam_step, adam_step_multi, sgd_step, sgd_step_multi
from fastnn.functional.pool import avg_pool2d, avg_pool2d_backward, max_pool2d, max_pool2d_backward

__all__ = [
    "adam_step",
    "adam_step_multi",
    "avg_pool2d",
    "avg_pool2d_backward",
    "batch_norm2d",
    "batch_norm2d_backward",
    "batch_norm2d_forward",
    "batch_norm2d_relu",
    "batch_norm2d_relu_backward",
    "batch_norm2d_relu_forward",
    "batch_norm2d_relu_max_pool2d",
    "batch_norm2d_relu_max_pool2d_backward",
    "batch_norm2d_relu_max_pool2d_forward",
    "conv2d",
    "conv2d_backward",
    "conv2d_relu_max_pool2d",
    "conv2d_relu_max_pool2d_backward",
    "cross_entropy",
    "dropout",
    "dropout_backward",
    "dropout_forward",
    "dropout_mask",
    "linear",
    "linear_backward",
    "linear_relu",
    "linear_relu_backward",
    "log_softmax",
    "log_softmax_backward",
    "matmul",
    "matmul_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "mse_loss",
    "mse_loss_backward",
    "register_tensor_handler",
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
