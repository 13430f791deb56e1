"""Ops that a backend builds from its own primitives (numpy_ref and cuda).

The cpu backend has fused C++ kernels for conv2d + ReLU + max_pool2d and for
linear + ReLU; the other backends compose the separate ops, the same way,
from this one place.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

from fastnn.backends import contract

Pair = tuple[int, int]


def fused_conv_relu_pool(ops: ModuleType) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``conv2d_relu_max_pool2d`` and its backward, built from ``ops``' primitives
    (documented by the contract, :class:`fastnn.backends.contract.Backend`)."""

    def conv2d_relu_max_pool2d(
        x: Any, weight: Any, bias: Any | None,
        stride: Pair, padding: Pair, dilation: Pair, groups: int,
        pool_kernel_size: Pair, pool_stride: Pair, pool_padding: Pair, pool_dilation: Pair,
        pool_out_hw: Pair,
    ) -> Any:
        r = ops.relu(ops.conv2d(x, weight, bias, stride, padding, dilation, groups))
        return ops.max_pool2d(
            r, pool_kernel_size, pool_stride, pool_padding, pool_dilation, pool_out_hw
        )

    def conv2d_relu_max_pool2d_backward(
        grad_out: Any, x: Any, weight: Any, bias: Any | None,
        stride: Pair, padding: Pair, dilation: Pair, groups: int,
        pool_kernel_size: Pair, pool_stride: Pair, pool_padding: Pair, pool_dilation: Pair,
        need_x: bool, need_w: bool, need_b: bool,
    ) -> tuple[Any | None, Any | None, Any | None]:
        # Recompute the relu'd conv output, then pool, relu and conv backward.
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
