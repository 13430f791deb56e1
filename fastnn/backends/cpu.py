"""The C++ CPU backend: thin wrappers over the native kernels in :mod:`fastnn._C`.

Same ops, names and argument order as :mod:`fastnn.backends.numpy_ref` (the
contract is documented in :mod:`fastnn.backends`). Arrays are C-contiguous
NumPy float32/float64, images NCHW, conv weights OIHW. ``fastnn._C`` checks
every argument again (ndim, shape, dtype, contiguity) and raises
ValueError/TypeError naming it; it never copies or converts. Every op returns a
new array; the optimizer steps update their arrays in place.

The kernels are multithreaded with fastnn's own pool (see
:func:`fastnn.set_num_threads`) and compiled for several ISAs; the best one the
CPU supports is used unless ``FASTNN_ISA=baseline|avx2|avx512`` asks for
another. Importing this module raises ImportError when the extension is not
built (``tools/dev_build.sh`` or ``pip install .``).
"""

from __future__ import annotations

import warnings

import numpy as np

from fastnn import _C

Pair = tuple[int, int]

__all__ = [
    "adam_step",
    "avg_pool2d",
    "avg_pool2d_backward",
    "bias_add_",
    "conv2d",
    "conv2d_backward_input",
    "conv2d_backward_weight",
    "conv2d_relu_max_pool2d",
    "conv2d_relu_max_pool2d_backward",
    "is_available",
    "matmul",
    "max_pool2d",
    "max_pool2d_backward",
    "max_pool2d_with_indices",
    "relu",
    "relu_backward",
    "sgd_step",
    "softmax_cross_entropy",
]

# FASTNN_ISA asked for an ISA this CPU cannot run (or an unknown name): the
# extension fell back to the best available one and left the reason here.
if _C._isa_warning is not None:
    warnings.warn(_C._isa_warning, RuntimeWarning, stacklevel=2)


def is_available() -> bool:
    """True: importing this module already required the built extension."""
    return True


def conv2d(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> np.ndarray:
    """x (N,C,H,W), weight (O,C/groups,KH,KW), bias (O,) or None -> y (N,O,OH,OW)."""
    return _C.conv2d(x, weight, bias, stride, padding, dilation, groups)


def conv2d_backward_input(
    grad_out: np.ndarray, weight: np.ndarray, input_hw: Pair,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> np.ndarray:
    """grad_out (N,O,OH,OW), weight (O,C/groups,KH,KW) -> grad_x (N,C,H,W)."""
    return _C.conv2d_backward_input(grad_out, weight, input_hw, stride, padding, dilation, groups)


def conv2d_backward_weight(
    grad_out: np.ndarray, x: np.ndarray, kernel_hw: Pair,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> np.ndarray:
    """grad_out (N,O,OH,OW), x (N,C,H,W) -> grad_w (O,C/groups,KH,KW)."""
    return _C.conv2d_backward_weight(grad_out, x, kernel_hw, stride, padding, dilation, groups)


def matmul(
    a: np.ndarray, b: np.ndarray, transpose_a: bool = False, transpose_b: bool = False
) -> np.ndarray:
    """op(a) @ op(b), 2-D (M,K)@(K,N) or batched 3-D; a stored (K,M) with transpose_a,
    b stored (N,K) with transpose_b."""
    return _C.matmul(a, b, transpose_a, transpose_b)


def max_pool2d(
    x: np.ndarray, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair,
    out_hw: Pair,
) -> np.ndarray:
    """x (N,C,H,W) -> y (N,C,OH,OW), (OH, OW) = out_hw (ceil_mode applied). NaN propagates."""
    return _C.max_pool2d(x, kernel_size, stride, padding, dilation, out_hw)


def max_pool2d_backward(
    grad_out: np.ndarray, x: np.ndarray, kernel_size: Pair, stride: Pair,
    padding: Pair, dilation: Pair,
) -> np.ndarray:
    """grad_out (N,C,OH,OW), x (N,C,H,W) -> grad_x; the first maximum (last NaN) wins."""
    return _C.max_pool2d_backward(grad_out, x, kernel_size, stride, padding, dilation)


def max_pool2d_with_indices(
    x: np.ndarray, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair,
    out_hw: Pair,
) -> tuple[np.ndarray, np.ndarray]:
    """x (N,C,H,W) -> (y, int64 indices), both (N,C,OH,OW): flat h*W+w index in each
    input plane of each window's first maximum (last NaN), as torch's."""
    return _C.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, out_hw)


def avg_pool2d(
    x: np.ndarray, kernel_size: Pair, stride: Pair, padding: Pair, out_hw: Pair,
    count_include_pad: bool, divisor_override: int | None,
) -> np.ndarray:
    """x (N,C,H,W) -> y (N,C,OH,OW) with torch's divisor rules."""
    return _C.avg_pool2d(
        x, kernel_size, stride, padding, out_hw, count_include_pad, divisor_override
    )


def avg_pool2d_backward(
    grad_out: np.ndarray, input_hw: Pair, kernel_size: Pair, stride: Pair, padding: Pair,
    count_include_pad: bool, divisor_override: int | None,
) -> np.ndarray:
    """grad_out (N,C,OH,OW) -> grad_x (N,C,H,W)."""
    return _C.avg_pool2d_backward(
        grad_out, input_hw, kernel_size, stride, padding, count_include_pad, divisor_override
    )


def relu(x: np.ndarray) -> np.ndarray:
    """max(x, 0) elementwise; NaN stays NaN."""
    return _C.relu(x)


def relu_backward(grad_out: np.ndarray, y: np.ndarray) -> np.ndarray:
    """grad_out where the relu output y > 0, else 0."""
    return _C.relu_backward(grad_out, y)


def bias_add_(y: np.ndarray, bias: np.ndarray) -> None:
    """In place: y (N, C, ...) += bias (C,) along axis 1 (not part of the backend contract)."""
    _C.bias_add_(y, bias)


def softmax_cross_entropy(
    logits: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """logits (N,K), labels int64 (N,) -> (mean loss as a 0-d array, (softmax - onehot) / N)."""
    return _C.softmax_cross_entropy(logits, labels)


def sgd_step(
    param: np.ndarray, grad: np.ndarray, momentum_buf: np.ndarray | None,
    lr: float, momentum: float, weight_decay: float, nesterov: bool,
) -> None:
    """One in-place torch.optim.SGD step (dampening 0)."""
    _C.sgd_step(param, grad, momentum_buf, lr, momentum, weight_decay, nesterov)


def adam_step(
    param: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
    step: int, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, decoupled: bool,
) -> None:
    """One in-place torch.optim.Adam (decoupled=False) / AdamW (decoupled=True) step."""
    _C.adam_step(
        param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, decoupled
    )


def conv2d_relu_max_pool2d(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
    pool_kernel_size: Pair, pool_stride: Pair, pool_padding: Pair, pool_dilation: Pair,
    pool_out_hw: Pair,
) -> np.ndarray:
    """max_pool2d(relu(conv2d(x))) -> (N,O,POH,POW), bit-identical to the three ops; the
    (N,O,OH,OW) conv output is never materialised (each thread keeps one image's in cache)."""
    return _C.conv2d_relu_max_pool2d(
        x, weight, bias, stride, padding, dilation, groups,
        pool_kernel_size, pool_stride, pool_padding, pool_dilation, pool_out_hw,
    )


def conv2d_relu_max_pool2d_backward(
    grad_out: np.ndarray, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
    pool_kernel_size: Pair, pool_stride: Pair, pool_padding: Pair, pool_dilation: Pair,
    need_x: bool, need_w: bool, need_b: bool,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(grad_x, grad_w, grad_b) of :func:`conv2d_relu_max_pool2d` from grad_out
    (N,O,POH,POW); None where not needed. Recomputes the conv output image by image."""
    return tuple(_C.conv2d_relu_max_pool2d_backward(
        grad_out, x, weight, bias, stride, padding, dilation, groups,
        pool_kernel_size, pool_stride, pool_padding, pool_dilation,
        bool(need_x), bool(need_w), bool(need_b),
    ))
