"""fastnn's kernels as PyTorch custom ops: ``torch.ops.fastnn.<name>``.

Every forward op has a backward op (so a compiled graph's backward is as opaque
to the tracer as its forward), a fake (meta) implementation for shapes under
``torch.compile``/FakeTensor, and ``register_autograd`` linking the two.

The real implementations hand the tensors to ``fastnn.functional`` as zero-copy
arrays: CPU tensors as NumPy views (``tensor.numpy()``), CUDA tensors as CuPy
arrays through DLPack; results come back the same way, so nothing is copied on
either side. The fakes run torch's own shape rules on the fake tensors: fastnn
accepts and rejects exactly torch's geometry (``tests/test_geometry.py``), and
torch's rules also work for symbolic (dynamic) shapes, which
:mod:`fastnn.geometry`'s int-only checks do not.

Masked gradients (``output_mask`` False) come back as empty tensors: custom ops
cannot return None.

Each real implementation first ends the spin-wait of torch's idle OpenMP workers
(:mod:`fastnn.torch._openmp`), which would otherwise take a core from fastnn's
thread pool for up to ~15 ms after any torch parallel op.
"""

# No `from __future__ import annotations`: torch.library infers each op's schema
# from the real annotation objects.
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

import fastnn.functional as F
from fastnn._config import park_threads
from fastnn.torch._openmp import releasing

_tf = torch.nn.functional

__all__ = [
    "avg_pool2d", "avg_pool2d_backward", "conv2d", "conv2d_backward", "cross_entropy",
    "cross_entropy_backward",
    "conv2d_relu_max_pool2d", "conv2d_relu_max_pool2d_backward", "linear",
    "linear_backward", "linear_relu", "linear_relu_backward", "matmul", "matmul_backward",
    "max_pool2d", "max_pool2d_backward", "max_pool2d_with_indices",
]

# --------------------------------------------------------------------------
# tensors <-> arrays, without copies
# --------------------------------------------------------------------------


def _arr(t: Optional[Tensor]) -> Any:
    """A NumPy (CPU) or CuPy (CUDA) array sharing ``t``'s memory."""
    if t is None:
        return None
    t = t.detach()  # inside an op autograd is already handled; detach is a view
    if t.device.type == "cpu":
        return t.numpy()
    if t.device.type == "cuda":
        import cupy

        return cupy.from_dlpack(t)
    raise TypeError(f"fastnn ops run on CPU and CUDA tensors, got device {t.device}")


def _ten(a: Any) -> Tensor:
    """A tensor sharing the NumPy/CuPy result array's memory."""
    return torch.from_numpy(a) if type(a).__module__ == "numpy" else torch.from_dlpack(a)


def _grads(like: Sequence[Tensor], grads: Sequence[Any]) -> tuple[Tensor, ...]:
    """Masked (None) gradients as empty tensors of ``like``'s dtype and device."""
    return tuple(
        _ten(g) if g is not None else ref.new_empty(0) for ref, g in zip(like, grads)
    )


def _fake_grads(
    shapes: Sequence[Sequence[int]], mask: Sequence[bool], ref: Tensor
) -> tuple[Tensor, ...]:
    return tuple(ref.new_empty(s if m else (0,)) for s, m in zip(shapes, mask))


def _want(ctx: Any, *which: int) -> list[bool]:
    return [bool(ctx.needs_input_grad[i]) for i in which]


def _park_after_first_layer(output_mask: Sequence[bool]) -> None:
    # A backward op that computes no input gradient is the graph's first layer:
    # backward ends with it, and the user's optimizer (often torch's, threaded)
    # runs next. fastnn's workers sleep now instead of polling on its cores.
    if not output_mask[0]:
        park_threads()


# --------------------------------------------------------------------------
# conv2d
# --------------------------------------------------------------------------


@torch.library.custom_op("fastnn::conv2d", mutates_args=())
@releasing
def conv2d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], groups: int,
) -> Tensor:
    """``torch.nn.functional.conv2d`` on fastnn's kernels (padding as ints)."""
    return _ten(F.conv2d(_arr(x), _arr(weight), _arr(bias), stride, padding, dilation, groups))


@conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    return _tf.conv2d(x, weight, bias, stride, padding, dilation, groups)


@torch.library.custom_op("fastnn::conv2d_backward", mutates_args=())
@releasing
def conv2d_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], groups: int, output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)``; a masked-off entry is an empty tensor."""
    grads = F.conv2d_backward(_arr(grad_out), _arr(x), _arr(weight), stride, padding,
                              dilation, groups, output_mask=tuple(output_mask))
    _park_after_first_layer(output_mask)
    return _grads((x, weight, weight), grads)


@conv2d_backward.register_fake
def _(grad_out, x, weight, stride, padding, dilation, groups, output_mask):
    return _fake_grads((x.shape, weight.shape, weight.shape[:1]), output_mask, x)


def _conv_setup(ctx, inputs, output):
    x, weight, bias = inputs[:3]
    ctx.save_for_backward(x, weight, bias)
    ctx.args = inputs[3:]


def _conv_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    mask = [*_want(ctx, 0, 1), bias is not None and ctx.needs_input_grad[2]]
    gx, gw, gb = torch.ops.fastnn.conv2d_backward(grad, x, weight, *ctx.args, mask)
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
            None, None, None, None)


conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)

# --------------------------------------------------------------------------
# fused conv2d + ReLU + max_pool2d
# --------------------------------------------------------------------------


@torch.library.custom_op("fastnn::conv2d_relu_max_pool2d", mutates_args=())
@releasing
def conv2d_relu_max_pool2d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], groups: int,
    pool_kernel_size: Sequence[int], pool_stride: Sequence[int], pool_padding: Sequence[int],
    pool_dilation: Sequence[int], pool_ceil_mode: bool,
) -> Tensor:
    """``max_pool2d(relu(conv2d(x, ...)), pool_...)`` in one pass over the input."""
    return _ten(F.conv2d_relu_max_pool2d(
        _arr(x), _arr(weight), _arr(bias), stride, padding, dilation, groups,
        pool_kernel_size, pool_stride, pool_padding, pool_dilation, pool_ceil_mode,
    ))


@conv2d_relu_max_pool2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, pk, ps, pp, pd, pc):
    y = _tf.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _tf.max_pool2d(y, pk, ps, pp, pd, pc)


@torch.library.custom_op("fastnn::conv2d_relu_max_pool2d_backward", mutates_args=())
@releasing
def conv2d_relu_max_pool2d_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], groups: int,
    pool_kernel_size: Sequence[int], pool_stride: Sequence[int], pool_padding: Sequence[int],
    pool_dilation: Sequence[int], pool_ceil_mode: bool, output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the fused op (the forward is recomputed, hence ``bias``)."""
    grads = F.conv2d_relu_max_pool2d_backward(
        _arr(grad_out), _arr(x), _arr(weight), _arr(bias), stride, padding, dilation, groups,
        pool_kernel_size, pool_stride, pool_padding, pool_dilation, pool_ceil_mode,
        output_mask=tuple(output_mask),
    )
    _park_after_first_layer(output_mask)
    return _grads((x, weight, weight), grads)


@conv2d_relu_max_pool2d_backward.register_fake
def _(grad_out, x, weight, bias, stride, padding, dilation, groups, pk, ps, pp, pd, pc,
      output_mask):
    return _fake_grads((x.shape, weight.shape, weight.shape[:1]), output_mask, x)


def _fused_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    mask = [*_want(ctx, 0, 1), bias is not None and ctx.needs_input_grad[2]]
    gx, gw, gb = torch.ops.fastnn.conv2d_relu_max_pool2d_backward(
        grad, x, weight, bias, *ctx.args, mask)
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
            *([None] * 9))


conv2d_relu_max_pool2d.register_autograd(_fused_backward, setup_context=_conv_setup)

# --------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------


@torch.library.custom_op("fastnn::max_pool2d", mutates_args=())
@releasing
def max_pool2d(
    x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], ceil_mode: bool,
) -> Tensor:
    """``torch.nn.functional.max_pool2d`` (an empty ``stride`` means ``kernel_size``)."""
    return _ten(F.max_pool2d(_arr(x), kernel_size, stride, padding, dilation, ceil_mode))


@max_pool2d.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode):
    return _tf.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


@torch.library.custom_op("fastnn::max_pool2d_with_indices", mutates_args=())
@releasing
def max_pool2d_with_indices(
    x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], ceil_mode: bool,
) -> tuple[Tensor, Tensor]:
    """``(y, indices)``; the int64 indices equal torch's (first maximum, last NaN)."""
    y, idx = F.max_pool2d(_arr(x), kernel_size, stride, padding, dilation, ceil_mode,
                          return_indices=True)
    return _ten(y), _ten(idx)


@max_pool2d_with_indices.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode):
    return _tf.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode,
                          return_indices=True)


@torch.library.custom_op("fastnn::max_pool2d_backward", mutates_args=())
@releasing
def max_pool2d_backward(
    grad_out: Tensor, x: Tensor, kernel_size: Sequence[int], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], ceil_mode: bool,
) -> Tensor:
    """Gradient of max_pool2d w.r.t. x (windows re-evaluated on x)."""
    return _ten(F.max_pool2d_backward(_arr(grad_out), _arr(x), kernel_size, stride, padding,
                                      dilation, ceil_mode))


@max_pool2d_backward.register_fake
def _(grad_out, x, kernel_size, stride, padding, dilation, ceil_mode):
    return torch.empty_like(x)


def _save_x(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.args = inputs[1:]


def _max_pool_backward(ctx, grad, *unused_grad_indices):
    (x,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 6
    return (torch.ops.fastnn.max_pool2d_backward(grad, x, *ctx.args), *([None] * 5))


max_pool2d.register_autograd(_max_pool_backward, setup_context=_save_x)


def _save_x_mark_indices(ctx, inputs, output):
    _save_x(ctx, inputs, output)
    ctx.mark_non_differentiable(output[1])


max_pool2d_with_indices.register_autograd(_max_pool_backward,
                                          setup_context=_save_x_mark_indices)


@torch.library.custom_op("fastnn::avg_pool2d", mutates_args=())
@releasing
def avg_pool2d(
    x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
    ceil_mode: bool, count_include_pad: bool, divisor_override: Optional[int],
) -> Tensor:
    """``torch.nn.functional.avg_pool2d`` (an empty ``stride`` means ``kernel_size``)."""
    return _ten(F.avg_pool2d(_arr(x), kernel_size, stride, padding, ceil_mode,
                             count_include_pad, divisor_override))


@avg_pool2d.register_fake
def _(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return _tf.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                          divisor_override)


@torch.library.custom_op("fastnn::avg_pool2d_backward", mutates_args=())
@releasing
def avg_pool2d_backward(
    grad_out: Tensor, x: Tensor, kernel_size: Sequence[int], stride: Sequence[int],
    padding: Sequence[int], ceil_mode: bool, count_include_pad: bool,
    divisor_override: Optional[int],
) -> Tensor:
    """Gradient of avg_pool2d w.r.t. x."""
    return _ten(F.avg_pool2d_backward(_arr(grad_out), _arr(x), kernel_size, stride, padding,
                                      ceil_mode, count_include_pad, divisor_override))


@avg_pool2d_backward.register_fake
def _(grad_out, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
      divisor_override):
    return torch.empty_like(x)


def _avg_pool_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    return (torch.ops.fastnn.avg_pool2d_backward(grad, x, *ctx.args), *([None] * 6))


avg_pool2d.register_autograd(_avg_pool_backward, setup_context=_save_x)

# --------------------------------------------------------------------------
# linear and matmul
# --------------------------------------------------------------------------


@torch.library.custom_op("fastnn::linear", mutates_args=())
@releasing
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ weight.T + bias``, as ``torch.nn.functional.linear``."""
    return _ten(F.linear(_arr(x), _arr(weight), _arr(bias)))


@linear.register_fake
def _(x, weight, bias):
    return _tf.linear(x, weight, bias)


@torch.library.custom_op("fastnn::linear_backward", mutates_args=())
@releasing
def linear_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, output_mask: Sequence[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)``; a masked-off entry is an empty tensor."""
    grads = F.linear_backward(_arr(grad_out), _arr(x), _arr(weight),
                              output_mask=tuple(output_mask))
    _park_after_first_layer(output_mask)
    return _grads((x, weight, weight), grads)


@linear_backward.register_fake
def _(grad_out, x, weight, output_mask):
    return _fake_grads((x.shape, weight.shape, weight.shape[:1]), output_mask, x)


def _linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    mask = [*_want(ctx, 0, 1), ctx.has_bias and ctx.needs_input_grad[2]]
    gx, gw, gb = torch.ops.fastnn.linear_backward(grad, x, weight, mask)
    return gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None


linear.register_autograd(_linear_backward, setup_context=_linear_setup)


@torch.library.custom_op("fastnn::linear_relu", mutates_args=())
@releasing
def linear_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``relu(x @ weight.T + bias)``: a Linear and the ReLU after it as one op, so a
    compiled graph keeps no elementwise kernel of its own between fastnn's ops."""
    return _ten(F.linear_relu(_arr(x), _arr(weight), _arr(bias)))


@linear_relu.register_fake
def _(x, weight, bias):
    return torch.relu(_tf.linear(x, weight, bias))


@torch.library.custom_op("fastnn::linear_relu_backward", mutates_args=())
@releasing
def linear_relu_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, y: Tensor, output_mask: Sequence[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)`` of :func:`linear_relu` from its output ``y``:
    fastnn's fused backward (the ReLU mask applied in the pass that sums grad_bias)."""
    grads = F.linear_relu_backward(_arr(grad_out), _arr(x), _arr(weight), _arr(y),
                                   output_mask=tuple(output_mask))
    _park_after_first_layer(output_mask)
    return _grads((x, weight, weight), grads)


@linear_relu_backward.register_fake
def _(grad_out, x, weight, y, output_mask):
    return _fake_grads((x.shape, weight.shape, weight.shape[:1]), output_mask, x)


def _linear_relu_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.has_bias = bias is not None


def _linear_relu_backward(ctx, grad):
    x, weight, y = ctx.saved_tensors
    mask = [*_want(ctx, 0, 1), ctx.has_bias and ctx.needs_input_grad[2]]
    gx, gw, gb = torch.ops.fastnn.linear_relu_backward(grad, x, weight, y, mask)
    return gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None


linear_relu.register_autograd(_linear_relu_backward, setup_context=_linear_relu_setup)


@torch.library.custom_op("fastnn::matmul", mutates_args=())
@releasing
def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 2-D or batched 3-D operands (a batch of 1 broadcasts)."""
    return _ten(F.matmul(_arr(a), _arr(b)))


@matmul.register_fake
def _(a, b):
    return torch.matmul(a, b)


@torch.library.custom_op("fastnn::matmul_backward", mutates_args=())
@releasing
def matmul_backward(grad_out: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(grad_a, grad_b)`` of :func:`matmul`."""
    return _grads((a, b), F.matmul_backward(_arr(grad_out), _arr(a), _arr(b)))


@matmul_backward.register_fake
def _(grad_out, a, b):
    return torch.empty_like(a), torch.empty_like(b)


def _matmul_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _matmul_backward(ctx, grad):
    a, b = ctx.saved_tensors
    ga, gb = torch.ops.fastnn.matmul_backward(grad, a, b)
    return (ga if ctx.needs_input_grad[0] else None, gb if ctx.needs_input_grad[1] else None)


matmul.register_autograd(_matmul_backward, setup_context=_matmul_setup)


# --------------------------------------------------------------------------
# cross-entropy (softmax and NLL in one pass; the gradient comes with the loss)
# --------------------------------------------------------------------------


@torch.library.custom_op("fastnn::cross_entropy", mutates_args=())
@releasing
def cross_entropy(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:  # noqa: A002
    """``(mean loss, d loss / d input)`` for (N, C) logits and (N,) int64 class
    indices in [0, C): torch's ``cross_entropy`` with its defaults. The gradient is
    computed in the same pass and kept for the backward (not differentiable)."""
    loss, grad = F.softmax_cross_entropy(_arr(input), _arr(target))
    return _ten(loss), _ten(grad)


@cross_entropy.register_fake
def _(input, target):  # noqa: A002
    return input.new_empty(()), torch.empty_like(input)


@torch.library.custom_op("fastnn::cross_entropy_backward", mutates_args=())
@releasing
def cross_entropy_backward(grad_out: Tensor, grad_input: Tensor) -> Tensor:
    """The saved ``grad_input`` scaled by the loss's (0-d) gradient."""
    return _ten(_arr(grad_input) * _arr(grad_out))


@cross_entropy_backward.register_fake
def _(grad_out, grad_input):
    return torch.empty_like(grad_input)


def _cross_entropy_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _cross_entropy_backward(ctx, grad_loss, unused_grad_grad):
    (grad_input,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    return torch.ops.fastnn.cross_entropy_backward(grad_loss, grad_input), None


cross_entropy.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)
