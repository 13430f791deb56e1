"""One thin Function per ``fastnn.functional`` op.

Each forward calls ``F.<op>`` (or ``F.<op>_forward`` when backward needs more
than the inputs and output) and each backward calls ``F.<op>_backward``: the
math and the backend choice live in :mod:`fastnn.functional`. Setting ``op``
registers the class as that op's Tensor handler (see :mod:`.engine`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastnn import functional as F
from fastnn.autograd.engine import Context, Function
from fastnn.autograd.tensor import Array, Tensor

__all__ = [
    "AvgPool2d",
    "BatchNorm2d",
    "BatchNorm2dReLU",
    "BatchNorm2dReLUMaxPool2d",
    "Conv2d",
    "Conv2dReLUMaxPool2d",
    "CrossEntropy",
    "Dropout",
    "Linear",
    "LinearReLU",
    "LogSoftmax",
    "MSELoss",
    "MatMul",
    "MaxPool2d",
    "ReLU",
    "Sigmoid",
    "Tanh",
    "batch_norm2d",
]


# --------------------------------------------------------------------------
# linear algebra and convolution
# --------------------------------------------------------------------------


class MatMul(Function):
    op, inputs = "matmul", ("a", "b")

    @staticmethod
    def forward(ctx: Context, a: Array, b: Array) -> Array:
        ctx.save_for_backward(a, b)
        return F.matmul(a, b)

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        a, b = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        if na and nb:
            return F.matmul_backward(g, a, b)
        if na and a.ndim == 2 and b.ndim == 2:
            # Only d/da = g @ b^T is needed (b is a constant): skip the other product.
            return F.linear(g, b), None
        ga, gb = F.matmul_backward(g, a, b)
        return (ga if na else None), (gb if nb else None)


class Linear(Function):
    op, inputs = "linear", ("x", "weight", "bias")

    @staticmethod
    def forward(ctx: Context, x: Array, weight: Array, bias: Array | None = None) -> Array:
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        x, w = ctx.saved_tensors
        return F.linear_backward(g, x, w, output_mask=ctx.needs_input_grad)


class LinearReLU(Function):
    """relu(linear(x)) as one node: keeps x, weight and the output y (the ReLU
    mask), not the pre-activation."""

    op, inputs = "linear_relu", ("x", "weight", "bias")

    @staticmethod
    def forward(ctx: Context, x: Array, weight: Array, bias: Array | None = None) -> Array:
        y = F.linear_relu(x, weight, bias)
        ctx.save_for_backward(x, weight, y)
        return y

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        x, w, y = ctx.saved_tensors
        return F.linear_relu_backward(g, x, w, y, output_mask=ctx.needs_input_grad)


class Conv2d(Function):
    op, inputs = "conv2d", ("x", "weight", "bias")

    @staticmethod
    def forward(
        ctx: Context, x: Array, weight: Array, bias: Array | None = None, stride: Any = 1,
        padding: Any = 0, dilation: Any = 1, groups: int = 1,
    ) -> Array:
        ctx.save_for_backward(x, weight)
        ctx.geom = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        x, w = ctx.saved_tensors
        # output_mask skips e.g. grad_x of the first layer, whose input is data.
        return F.conv2d_backward(g, x, w, *ctx.geom, output_mask=ctx.needs_input_grad)


class Conv2dReLUMaxPool2d(Function):
    """max_pool2d(relu(conv2d(x))) as one node: nothing conv-output-sized is kept for
    backward (x, weight, bias and the pool's argmax codes, one byte per output)."""

    op, inputs = "conv2d_relu_max_pool2d", ("x", "weight", "bias")

    @staticmethod
    def forward(
        ctx: Context, x: Array, weight: Array, bias: Array | None = None, stride: Any = 1,
        padding: Any = 0, dilation: Any = 1, groups: int = 1, pool_kernel_size: Any = 2,
        pool_stride: Any = None, pool_padding: Any = 0, pool_dilation: Any = 1,
        pool_ceil_mode: bool = False,
    ) -> Array:
        ctx.save_for_backward(x, weight, bias)
        ctx.args = (stride, padding, dilation, groups, pool_kernel_size, pool_stride,
                    pool_padding, pool_dilation, pool_ceil_mode)
        # No codes for inference (no backward) or a window of more than 255 taps
        # (no one-byte codes): the backward then recomputes the routing.
        ctx.argmax = None
        if not (any(ctx.needs_input_grad) and F.fused.argmax_fits(pool_kernel_size)):
            return F.conv2d_relu_max_pool2d(x, weight, bias, *ctx.args)
        y, ctx.argmax = F.conv2d_relu_max_pool2d(x, weight, bias, *ctx.args, return_argmax=True)
        return y

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        x, w, b = ctx.saved_tensors
        return F.conv2d_relu_max_pool2d_backward(g, x, w, b, *ctx.args,
                                                 output_mask=ctx.needs_input_grad,
                                                 argmax=ctx.argmax)


# --------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------


class MaxPool2d(Function):
    """With ``return_indices=True``, apply returns ``(Tensor, indices)``, the
    indices a plain int64 array (not differentiable)."""

    op, inputs = "max_pool2d", ("x",)

    @staticmethod
    def forward(
        ctx: Context, x: Array, kernel_size: Any, stride: Any = None, padding: Any = 0,
        dilation: Any = 1, ceil_mode: bool = False, return_indices: bool = False,
    ) -> Any:
        ctx.save_for_backward(x)
        ctx.args = (kernel_size, stride, padding, dilation, ceil_mode)
        if return_indices:
            return F.max_pool2d(x, *ctx.args, return_indices=True)  # (out, indices)
        return F.max_pool2d(x, *ctx.args)

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        return F.max_pool2d_backward(g, ctx.saved_tensors[0], *ctx.args)


class AvgPool2d(Function):
    op, inputs = "avg_pool2d", ("x",)

    @staticmethod
    def forward(
        ctx: Context, x: Array, kernel_size: Any, stride: Any = None, padding: Any = 0,
        ceil_mode: bool = False, count_include_pad: bool = True,
        divisor_override: int | None = None,
    ) -> Array:
        ctx.save_for_backward(x)
        ctx.args = (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        return F.avg_pool2d(x, *ctx.args)

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        return F.avg_pool2d_backward(g, ctx.saved_tensors[0], *ctx.args)


# --------------------------------------------------------------------------
# activations (backward from the saved output)
# --------------------------------------------------------------------------


class _Activation(Function):
    """y = F.<op>(x), keeping y: F.<op>_backward(grad, y) needs only the output."""

    inputs = ("x",)

    @staticmethod
    def forward(ctx: Context, x: Array) -> Array:
        y = getattr(F, ctx.fn.op)(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        return getattr(F, ctx.fn.op + "_backward")(g, ctx.saved_tensors[0])


class ReLU(_Activation):
    op = "relu"


class Sigmoid(_Activation):
    op = "sigmoid"


class Tanh(_Activation):
    op = "tanh"


class LogSoftmax(Function):
    op, inputs = "log_softmax", ("x",)

    @staticmethod
    def forward(ctx: Context, x: Array, dim: int = -1) -> Array:
        y = F.log_softmax(x, dim)
        ctx.save_for_backward(y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        return F.log_softmax_backward(g, ctx.saved_tensors[0], ctx.dim)


# --------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------


class CrossEntropy(Function):
    """Mean softmax cross-entropy; the fused kernel gives the logits' grad for free."""

    op, inputs = "cross_entropy", ("logits", "labels")

    @staticmethod
    def forward(ctx: Context, logits: Array, labels: Array) -> Array:
        loss, grad = F.softmax_cross_entropy(logits, labels)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        # The chain rule's scalar product; the gradient itself came from the kernel.
        return ctx.saved_tensors[0] * g, None


class MSELoss(Function):
    op, inputs = "mse_loss", ("input", "target")

    @staticmethod
    def forward(ctx: Context, input: Array, target: Array) -> Array:  # noqa: A002
        ctx.save_for_backward(input, target)
        return F.mse_loss(input, target)

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        a, b = ctx.saved_tensors
        return F.mse_loss_backward(g, a, b, output_mask=ctx.needs_input_grad)


# --------------------------------------------------------------------------
# dropout and BatchNorm (their forward returns what backward needs)
# --------------------------------------------------------------------------


class Dropout(Function):
    """Inverted dropout; the mask comes from ``F.dropout_mask``, as for plain arrays."""

    op, inputs = "dropout", ("x",)

    @staticmethod
    def forward(
        ctx: Context, x: Array, p: float = 0.5, training: bool = True,
        rng: np.random.Generator | None = None,
    ) -> Array:
        y, ctx.mask = F.dropout_forward(x, p, training, rng)
        return y

    @staticmethod
    def backward(ctx: Context, g: Array) -> Array:
        return F.dropout_backward(g, ctx.mask)


class BatchNorm2d(Function):
    """``F.batch_norm2d``; running stats are updated in place by the forward."""

    op, inputs = "batch_norm2d", ("x", "weight", "bias")
    #: True in BatchNorm2dReLU: the forward and backward run the fused ReLU ops.
    relu = False

    @staticmethod
    def forward(
        ctx: Context, x: Array, weight: Array | None = None, bias: Array | None = None,
        running_mean: Array | None = None, running_var: Array | None = None,
        training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5,
        num_batches_tracked: Array | None = None,
    ) -> Array:
        fwd = F.batch_norm2d_relu_forward if ctx.fn.relu else F.batch_norm2d_forward
        y, mean, var = fwd(x, running_mean, running_var, weight, bias, training, momentum, eps,
                           num_batches_tracked)
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.args = (eps, training)
        return y

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        x, w, b, mean, var = ctx.saved_tensors
        if ctx.fn.relu:
            return F.batch_norm2d_relu_backward(g, x, w, b, mean, var, *ctx.args,
                                                output_mask=ctx.needs_input_grad)
        return F.batch_norm2d_backward(g, x, w, mean, var, *ctx.args,
                                       output_mask=ctx.needs_input_grad)


class BatchNorm2dReLU(BatchNorm2d):
    """``F.batch_norm2d_relu``: BatchNorm2d and the ReLU after it as one node."""

    op, relu = "batch_norm2d_relu", True


class BatchNorm2dReLUMaxPool2d(Function):
    """``F.batch_norm2d_relu_max_pool2d``: BatchNorm2d, ReLU and MaxPool2d as one node;
    backward keeps x, the statistics and the pool's argmax codes (one byte per
    pooled output), nothing of the BatchNorm output's size."""

    op, inputs = "batch_norm2d_relu_max_pool2d", ("x", "weight", "bias")

    @staticmethod
    def forward(
        ctx: Context, x: Array, weight: Array | None = None, bias: Array | None = None,
        running_mean: Array | None = None, running_var: Array | None = None,
        training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5,
        num_batches_tracked: Array | None = None, pool_kernel_size: Any = 2,
        pool_stride: Any = None, pool_padding: Any = 0, pool_dilation: Any = 1,
        pool_ceil_mode: bool = False,
    ) -> Array:
        pool = (pool_kernel_size, pool_stride, pool_padding, pool_dilation, pool_ceil_mode)
        # As Conv2dReLUMaxPool2d: codes only where a backward will use them.
        codes = any(ctx.needs_input_grad) and F.fused.argmax_fits(pool_kernel_size)
        out = F.batch_norm2d_relu_max_pool2d_forward(
            x, running_mean, running_var, weight, bias, training, momentum, eps,
            num_batches_tracked, *pool, return_argmax=codes)
        ctx.save_for_backward(x, weight, bias, out[1], out[2])
        ctx.args = (eps, training, *pool)
        ctx.argmax = out[3] if codes else None
        return out[0]

    @staticmethod
    def backward(ctx: Context, g: Array) -> tuple:
        x, w, b, mean, var = ctx.saved_tensors
        return F.batch_norm2d_relu_max_pool2d_backward(
            g, x, w, b, mean, var, *ctx.args, output_mask=ctx.needs_input_grad,
            argmax=ctx.argmax)


def batch_norm2d(
    x: Any,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Array | None = None,
) -> Tensor:
    """``F.batch_norm2d`` on a Tensor (``x`` is wrapped if it is an array); without
    running stats the batch statistics are used even when ``training`` is False."""
    if not isinstance(x, Tensor):
        x = Tensor(x)
    return BatchNorm2d.apply(
        x, weight, bias, running_mean=running_mean, running_var=running_var,
        training=training or running_mean is None, momentum=momentum, eps=eps,
        num_batches_tracked=num_batches_tracked,
    )
