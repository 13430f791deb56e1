"""Ops that a backend builds from its own primitives (numpy_ref and cuda).

The cpu backend has fused C++ kernels for conv2d + ReLU + max_pool2d, for
batch_norm2d + ReLU (and + max_pool2d) and linear + ReLU; the other backends compose the separate
ops, the same way, from this one place.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

from fastnn._array import array_module
from fastnn.backends import contract

Pair = tuple[int, int]

#: The window code of a pooled output through which no gradient passes.
NO_GRAD = 255


def window_codes(
    y: Any, indices: Any, conv_w: int, stride: Pair, padding: Pair, dilation: Pair,
    kernel_w: int,
) -> Any:
    """The fused op's ``argmax`` (uint8, y's shape) from ``max_pool2d_with_indices``
    over the relu'd conv output: each pooled output's winning window tap
    ``kh * KW + kw``, or :data:`NO_GRAD` where relu backward stops the gradient
    (``y <= 0``, or NaN). ``indices`` are flat ``h * conv_w + w`` positions."""
    xp = array_module(indices)
    oh = stride[0] * xp.arange(y.shape[2], dtype=indices.dtype)[:, None] - padding[0]
    ow = stride[1] * xp.arange(y.shape[3], dtype=indices.dtype)[None, :] - padding[1]
    kh = (indices // conv_w - oh) // dilation[0]
    kw = (indices % conv_w - ow) // dilation[1]
    codes = (kh * kernel_w + kw).astype("uint8")
    codes[~(y > 0)] = NO_GRAD
    return codes


def fused_conv_relu_pool(ops: ModuleType) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``conv2d_relu_max_pool2d`` and its backward, built from ``ops``' primitives
    (documented by the contract, :class:`fastnn.backends.contract.Backend`)."""

    def conv2d_relu_max_pool2d(
        x: Any, weight: Any, bias: Any | None,
        stride: Pair, padding: Pair, dilation: Pair, groups: int,
        pool_kernel_size: Pair, pool_stride: Pair, pool_padding: Pair, pool_dilation: Pair,
        pool_out_hw: Pair, return_argmax: bool = False,
    ) -> Any:
        r = ops.relu(ops.conv2d(x, weight, bias, stride, padding, dilation, groups))
        pool = (pool_kernel_size, pool_stride, pool_padding, pool_dilation, pool_out_hw)
        if not return_argmax:
            return ops.max_pool2d(r, *pool)
        y, indices = ops.max_pool2d_with_indices(r, *pool)
        return y, window_codes(y, indices, r.shape[3], pool_stride, pool_padding,
                               pool_dilation, pool_kernel_size[1])

    def conv2d_relu_max_pool2d_backward(
        grad_out: Any, x: Any, weight: Any, bias: Any | None,
        stride: Pair, padding: Pair, dilation: Pair, groups: int,
        pool_kernel_size: Pair, pool_stride: Pair, pool_padding: Pair, pool_dilation: Pair,
        need_x: bool, need_w: bool, need_b: bool, argmax: Any | None = None,
    ) -> tuple[Any | None, Any | None, Any | None]:
        # Recompute the relu'd conv output, then pool, relu and conv backward. The
        # forward's argmax would only save the recompute (the cpu kernel uses it);
        # the composed path stays the readable reference, and ignores it.
        r = ops.relu(ops.conv2d(x, weight, bias, stride, padding, dilation, groups))
        g = ops.relu_backward(
            ops.max_pool2d_backward(grad_out, r, pool_kernel_size, pool_stride, pool_padding,
                                    pool_dilation),
            r,
        )
        del r
        gx = gw = gb = None
        if need_x:
            gx = ops.conv2d_backward_input(g, weight, tuple(x.shape[2:]), stride, padding,
                                           dilation, groups)
        if need_w:
            gw = ops.conv2d_backward_weight(g, x, tuple(weight.shape[2:]), stride, padding,
                                            dilation, groups)
        if need_b:
            gb = g.sum(axis=(0, 2, 3), dtype=g.dtype)
        return gx, gw, gb

    for fn in (conv2d_relu_max_pool2d, conv2d_relu_max_pool2d_backward):
        fn.__doc__ = contract.doc(fn.__name__)
        fn.__module__ = ops.__name__
    return conv2d_relu_max_pool2d, conv2d_relu_max_pool2d_backward


def fused_bn_relu(ops: ModuleType) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``batch_norm2d_relu`` and its backward, built from ``ops``' primitives."""

    def batch_norm2d_relu(
        x: Any, weight: Any | None, bias: Any | None, mean: Any | None, var: Any | None,
        eps: float, training: bool,
    ) -> tuple[Any, Any, Any]:
        y, mean, var = ops.batch_norm2d(x, weight, bias, mean, var, eps, training)
        return ops.relu(y), mean, var

    def batch_norm2d_relu_backward(
        grad_out: Any, x: Any, weight: Any | None, bias: Any | None, mean: Any, var: Any,
        eps: float, training: bool, need_x: bool, need_w: bool, need_b: bool,
    ) -> tuple[Any | None, Any | None, Any | None]:
        # Recompute the BatchNorm output with the forward's statistics (the eval
        # form applies them exactly as the training forward did) for the relu mask.
        y = ops.batch_norm2d(x, weight, bias, mean, var, eps, False)[0]
        g = ops.relu_backward(grad_out, y)
        del y
        return ops.batch_norm2d_backward(g, x, weight, mean, var, eps, training, need_x, need_w,
                                         need_b)

    for fn in (batch_norm2d_relu, batch_norm2d_relu_backward):
        fn.__doc__ = contract.doc(fn.__name__)
        fn.__module__ = ops.__name__
    return batch_norm2d_relu, batch_norm2d_relu_backward


def fused_bn_relu_pool(ops: ModuleType) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``batch_norm2d_relu_max_pool2d`` and its backward, built from ``ops``'
    ``batch_norm2d_relu`` (this module's, on numpy_ref and cuda) and pooling ops."""

    def batch_norm2d_relu_max_pool2d(
        x: Any, weight: Any | None, bias: Any | None, mean: Any | None, var: Any | None,
        eps: float, training: bool,
        pool_kernel_size: Pair, pool_stride: Pair, pool_padding: Pair, pool_dilation: Pair,
        pool_out_hw: Pair, return_argmax: bool = False,
    ) -> tuple[Any, ...]:
        r, mean, var = ops.batch_norm2d_relu(x, weight, bias, mean, var, eps, training)
        pool = (pool_kernel_size, pool_stride, pool_padding, pool_dilation, pool_out_hw)
        if not return_argmax:
            return ops.max_pool2d(r, *pool), mean, var
        y, indices = ops.max_pool2d_with_indices(r, *pool)
        return y, mean, var, window_codes(y, indices, r.shape[3], pool_stride, pool_padding,
                                          pool_dilation, pool_kernel_size[1])

    def batch_norm2d_relu_max_pool2d_backward(
        grad_out: Any, x: Any, weight: Any | None, bias: Any | None, mean: Any, var: Any,
        eps: float, training: bool,
        pool_kernel_size: Pair, pool_stride: Pair, pool_padding: Pair, pool_dilation: Pair,
        need_x: bool, need_w: bool, need_b: bool, argmax: Any | None = None,
    ) -> tuple[Any | None, Any | None, Any | None]:
        # The BatchNorm output recomputed with the forward's statistics, as in
        # batch_norm2d_relu_backward; the argmax would only save that (see
        # fused_conv_relu_pool), so this readable reference ignores it.
        r = ops.batch_norm2d_relu(x, weight, bias, mean, var, eps, False)[0]
        g = ops.max_pool2d_backward(grad_out, r, pool_kernel_size, pool_stride, pool_padding,
                                    pool_dilation)
        del r
        return ops.batch_norm2d_relu_backward(g, x, weight, bias, mean, var, eps, training,
                                              need_x, need_w, need_b)

    for fn in (batch_norm2d_relu_max_pool2d, batch_norm2d_relu_max_pool2d_backward):
        fn.__doc__ = contract.doc(fn.__name__)
        fn.__module__ = ops.__name__
    return batch_norm2d_relu_max_pool2d, batch_norm2d_relu_max_pool2d_backward


def fused_linear_relu(ops: ModuleType) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``linear_relu`` and its backward, built from ``ops``' matmul and relu ops."""

    def linear_relu(x: Any, weight: Any, bias: Any | None) -> Any:
        y = ops.matmul(x, weight, False, True)
        if bias is not None:
            y += bias
        return ops.relu(y)

    def linear_relu_backward(
        grad_out: Any, x: Any, weight: Any, y: Any,
        need_x: bool = True, need_w: bool = True, need_b: bool = True,
    ) -> tuple[Any | None, Any | None, Any | None]:
        g = ops.relu_backward(grad_out, y)
        gx = ops.matmul(g, weight, False, False) if need_x else None
        gw = ops.matmul(g, x, True, False) if need_w else None
        gb = g.sum(axis=0, dtype=g.dtype) if need_b else None
        return gx, gw, gb

    for fn in (linear_relu, linear_relu_backward):
        fn.__doc__ = contract.doc(fn.__name__)
        fn.__module__ = ops.__name__
    return linear_relu, linear_relu_backward


def multi_steps(ops: ModuleType) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``sgd_step_multi`` and ``adam_step_multi`` of a backend whose ``sgd_step`` and
    ``adam_step`` are ``ops``'s: every entry checked first, as the cpu binding
    checks it (:func:`~fastnn.backends._array_ops.check_step_arrays`, in the same
    order, so the same input raises the same exception type), then one call per
    entry."""
    from fastnn.backends._array_ops import check_step_arrays

    def sgd_step_multi(params: Any, grads: Any, momentum_bufs: Any, lr: float,
                       momentum: float, weight_decay: float, nesterov: bool) -> None:
        bufs = momentum_bufs if momentum_bufs is not None else [None] * len(params)
        for i, p in enumerate(params):
            if bufs[i] is None and momentum != 0:
                raise ValueError(f"sgd_step_multi: momentum_bufs[{i}] is required when "
                                 "momentum != 0")
            check_step_arrays("sgd_step_multi", i, p, (("grad", grads[i], False),
                                                       ("momentum_buf", bufs[i], True)), True)
        for i, p in enumerate(params):
            if p.size:
                ops.sgd_step(p, grads[i], bufs[i], lr, momentum, weight_decay, nesterov)

    def adam_step_multi(params: Any, grads: Any, exp_avgs: Any, exp_avg_sqs: Any, steps: Any,
                        lr: float, beta1: float, beta2: float, eps: float,
                        weight_decay: float, decoupled: bool) -> None:
        for i, p in enumerate(params):
            for name, a in (("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])):
                if a is None:
                    raise TypeError(f"adam_step_multi: {name}[{i}] must be an array, got None")
            check_step_arrays("adam_step_multi", i, p, (("grad", grads[i], False),
                                                        ("exp_avg", exp_avgs[i], True),
                                                        ("exp_avg_sq", exp_avg_sqs[i], True)),
                              True)
        for i, p in enumerate(params):
            if p.size:
                ops.adam_step(p, grads[i], exp_avgs[i], exp_avg_sqs[i], steps[i], lr, beta1,
                              beta2, eps, weight_decay, decoupled)

    for fn in (sgd_step_multi, adam_step_multi):
        fn.__doc__ = contract.doc(fn.__name__)
    return sgd_step_multi, adam_step_multi
