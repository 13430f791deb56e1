"""A thin reverse-mode autograd over NumPy/CuPy arrays.

* :mod:`.tensor`: :class:`Tensor` (an array plus the graph node that made it)
  and grad mode (:class:`no_grad`, :class:`enable_grad`, :func:`is_grad_enabled`);
* :mod:`.engine`: :class:`Function`, :class:`Context` and the backward pass;
* :mod:`.algebra`: tensor algebra primitives (``+ - * / ** @``, indexing,
  reshape, sum, ...);
* :mod:`.functions`: one Function per :mod:`fastnn.functional` op, whose math
  lives there; defining them registers them, so ``F.conv2d(tensor, w)``
  records a graph node like ``Tensor.__matmul__`` does.

Autograd knows nothing of backends: every op runs through
:mod:`fastnn.functional` or array methods NumPy and CuPy share.
"""

from __future__ import annotations

# tensor first: the other modules import from it, and it binds them at its end.
from fastnn.autograd.tensor import Tensor, enable_grad, is_grad_enabled, no_grad, tensor  # isort: split

from fastnn import functional as F  # noqa: F401 - ``ag.F``, as before the split
from fastnn.autograd.algebra import (
    Abs,
    Add,
    Div,
    Exp,
    GetItem,
    Log,
    Mean,
    Mul,
    Neg,
    Pow,
    Reshape,
    Sub,
    Sum,
    Transpose,
)
from fastnn.autograd.engine import Context, Function
from fastnn.autograd.functions import (
    AvgPool2d,
    BatchNorm2d,
    BatchNorm2dReLU,
    BatchNorm2dReLUMaxPool2d,
    Conv2d,
    Conv2dReLUMaxPool2d,
    CrossEntropy,
    Dropout,
    Linear,
    LinearReLU,
    LogSoftmax,
    MatMul,
    MaxPool2d,
    MSELoss,
    ReLU,
    Sigmoid,
    Tanh,
    batch_norm2d,
)

__all__ = [
    "Abs",
    "Add",
    "AvgPool2d",
    "BatchNorm2d",
    "BatchNorm2dReLU",
    "BatchNorm2dReLUMaxPool2d",
    "Context",
    "Conv2d",
    "Conv2dReLUMaxPool2d",
    "CrossEntropy",
    "Div",
    "Dropout",
    "Exp",
    "Function",
    "GetItem",
    "Linear",
    "LinearReLU",
    "Log",
    "LogSoftmax",
    "MSELoss",
    "MatMul",
    "MaxPool2d",
    "Mean",
    "Mul",
    "Neg",
    "Pow",
    "ReLU",
    "Reshape",
    "Sigmoid",
    "Sub",
    "Sum",
    "Tanh",
    "Tensor",
    "Transpose",
    "batch_norm2d",
    "enable_grad",
    "is_grad_enabled",
    "no_grad",
    "tensor",
]
