"""Type stub of fastnn._C, the C++ CPU kernels (csrc/bindings.cpp).

All arrays are C-contiguous NumPy arrays of one float dtype (float32 or
float64; labels int64), images NCHW, conv weights OIHW. Nothing is converted:
a wrong ndim/shape/dtype/layout raises ValueError or TypeError naming the
argument. Outputs are new arrays; the ``*_step`` optimizer steps work in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Pair = tuple[int, int]

__version__: str
# Why FASTNN_ISA could not be honoured at import (then the best ISA is used), else None.
_isa_warning: str | None
# Why FASTNN_CACHE_SIZES was ignored at import (then the detected sizes are used), else None.
_cache_warning: str | None
# Why FASTNN_MEMORY_POOL_LIMIT was ignored at import (then the default limit holds), else None.
_memory_pool_warning: str | None

def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def park_threads() -> None: ...
def active_isa() -> str:
    """'avx512', 'avx2' or 'baseline'."""
def supported_isas() -> list[str]:
    """ISAs this CPU and OS can run, best first."""
def select_isa(name: str) -> bool:
    """Switch to 'baseline', 'avx2', 'avx512' or 'best'; False (unchanged) if unsupported."""
def cpu_info() -> dict:
    """vendor, family, model, stepping, source ('cpuid'/'sysfs'/'default'), l1d, l2, l3
    (bytes in force; l1d/l2 per core), l3_shared_by, detected (dict), override (str|None)."""
def gemm_blocking(dtype: str = "float32") -> dict[str, int]:
    """The active ISA's gemm blocking: MR, NR (register tile), KC, MC, NC (cache blocks)."""
def set_cache_sizes(spec: str) -> None:
    """Override the cache sizes ('l1d=32K,l2=1M,l3=32M', any subset); '' restores them."""
def memory_pool_stats() -> dict[str, int | bool]:
    """hits, misses, cached_bytes, cached_blocks, in_use_bytes, in_use_blocks, limit, min_bytes,
    enabled."""
def memory_pool_clear() -> None:
    """Return every cached output block to the system."""
def set_memory_pool_limit(bytes: int) -> None:
    """Most bytes of freed outputs kept for reuse; 0 turns the pool off."""

def conv2d(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> np.ndarray:
    """x (N,C,H,W), weight (O,C/groups,KH,KW), bias (O,) or None -> y (N,O,OH,OW)."""
def conv2d_backward_input(
    grad_out: np.ndarray, weight: np.ndarray, input_hw: Pair,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> np.ndarray:
    """grad_out (N,O,OH,OW), weight (O,C/groups,KH,KW) -> grad_x (N,C,H,W)."""
def conv2d_backward_weight(
    grad_out: np.ndarray, x: np.ndarray, kernel_hw: Pair,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> np.ndarray:
    """grad_out (N,O,OH,OW), x (N,C,H,W) -> grad_w (O,C/groups,KH,KW)."""
def matmul(
    a: np.ndarray, b: np.ndarray, transpose_a: bool = False, transpose_b: bool = False
) -> np.ndarray:
    """op(a) @ op(b); 2-D (M,K)@(K,N) or 3-D (B,M,K)@(B,K,N); a stored (K,M) with
    transpose_a, b stored (N,K) with transpose_b."""
def max_pool2d(
    x: np.ndarray, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair,
    out_hw: Pair,
) -> np.ndarray:
    """x (N,C,H,W) -> y (N,C,OH,OW); out_hw from fastnn.geometry (ceil_mode applied)."""
def max_pool2d_backward(
    grad_out: np.ndarray, x: np.ndarray, kernel_size: Pair, stride: Pair,
    padding: Pair, dilation: Pair,
) -> np.ndarray:
    """grad_out (N,C,OH,OW), x (N,C,H,W) -> grad_x (N,C,H,W); first maximum (last NaN) wins."""
def max_pool2d_with_indices(
    x: np.ndarray, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair,
    out_hw: Pair,
) -> tuple[np.ndarray, np.ndarray]:
    """x (N,C,H,W) -> (y, indices), both (N,C,OH,OW); int64 flat h*W+w indices of each
    window's first maximum (last NaN) in its input plane, as torch's."""
def conv2d_relu_max_pool2d(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
    pool_kernel_size: Pair, pool_stride: Pair, pool_padding: Pair, pool_dilation: Pair,
    pool_out_hw: Pair, return_argmax: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """max_pool2d(relu(conv2d(x, weight, bias))) -> (N,O,POH,POW), bit-identical to the
    three ops; the conv output is never materialised. return_argmax: (y, argmax uint8
    (N,O,POH,POW): the winning window tap kh*KW+kw, 255 where no gradient passes)."""
def conv2d_relu_max_pool2d_backward(
    grad_out: np.ndarray, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
    pool_kernel_size: Pair, pool_stride: Pair, pool_padding: Pair, pool_dilation: Pair,
    need_x: bool, need_w: bool, need_b: bool, argmax: np.ndarray | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(grad_x, grad_w, grad_b) of conv2d_relu_max_pool2d, None where not needed; routed
    by the forward's argmax when given, else by recomputing the conv."""
def linear_relu(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """relu(x @ weight.T + bias): x (M,K), weight (N,K) -> (M,N); bias and ReLU in the
    gemm's epilogue, bit-identical to the separate ops."""
def linear_relu_backward(
    grad_out: np.ndarray, x: np.ndarray, weight: np.ndarray, y: np.ndarray,
    need_x: bool = True, need_w: bool = True, need_b: bool = True,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(grad_x, grad_w, grad_b) of linear_relu from grad_out (M,N) and its output y."""
def avg_pool2d(
    x: np.ndarray, kernel_size: Pair, stride: Pair, padding: Pair, out_hw: Pair,
    count_include_pad: bool, divisor_override: int | None,
) -> np.ndarray:
    """x (N,C,H,W) -> y (N,C,OH,OW)."""
def avg_pool2d_backward(
    grad_out: np.ndarray, input_hw: Pair, kernel_size: Pair, stride: Pair, padding: Pair,
    count_include_pad: bool, divisor_override: int | None,
) -> np.ndarray:
    """grad_out (N,C,OH,OW) -> grad_x (N,C,H,W)."""
def relu(x: np.ndarray) -> np.ndarray: ...
def relu_backward(grad_out: np.ndarray, y: np.ndarray) -> np.ndarray: ...
def softmax_cross_entropy(
    logits: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """logits (N,K), labels int64 (N,) -> (0-d mean loss, grad (N,K))."""
def sgd_step(
    param: np.ndarray, grad: np.ndarray, momentum_buf: np.ndarray | None,
    lr: float, momentum: float, weight_decay: float, nesterov: bool,
) -> None: ...
def adam_step(
    param: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
    step: int, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, decoupled: bool,
) -> None: ...
def sgd_step_multi(
    params: Sequence[np.ndarray], grads: Sequence[np.ndarray],
    momentum_bufs: Sequence[np.ndarray | None] | None, lr: float, momentum: float,
    weight_decay: float, nesterov: bool,
) -> None:
    """sgd_step on each entry; every entry checked before any update."""
def adam_step_multi(
    params: Sequence[np.ndarray], grads: Sequence[np.ndarray],
    exp_avgs: Sequence[np.ndarray], exp_avg_sqs: Sequence[np.ndarray], steps: Sequence[int],
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
) -> None:
    """adam_step on each entry at its own 1-based step; every entry checked before any
    update."""
def lookup_u8(
    images: np.ndarray, rows: np.ndarray | None, table: np.ndarray,
) -> np.ndarray:
    """images uint8 (n, ...), rows int64 (B,) in [0, n) or None (every row), table (256,)
    float -> out (B, ...) of table's dtype, out[b] = table[images[rows[b]]]."""
def batch_norm2d(
    x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None,
    mean: np.ndarray | None, var: np.ndarray | None, eps: float, training: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (N,C,H,W), weight/bias (C,) or None -> (y, mean, var). training: mean/var must be
    None and the batch mean and biased variance over (N,H,W) (>= 2 values) are computed;
    else the given (C,) stats are used (and returned as copies)."""
def batch_norm2d_backward(
    grad_out: np.ndarray, x: np.ndarray, weight: np.ndarray | None, mean: np.ndarray,
    var: np.ndarray, eps: float, training: bool, need_x: bool, need_w: bool, need_b: bool,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(grad_x, grad_weight, grad_bias) of batch_norm2d, None where not needed."""
def batch_norm2d_relu(
    x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None,
    mean: np.ndarray | None, var: np.ndarray | None, eps: float, training: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """batch_norm2d with the ReLU that follows fused: (max(y, 0), mean, var)."""
def batch_norm2d_relu_backward(
    grad_out: np.ndarray, x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None,
    mean: np.ndarray, var: np.ndarray, eps: float, training: bool, need_x: bool, need_w: bool,
    need_b: bool,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(grad_x, grad_weight, grad_bias) of batch_norm2d_relu, None where not needed."""
def batch_norm2d_relu_max_pool2d(
    x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None,
    mean: np.ndarray | None, var: np.ndarray | None, eps: float, training: bool,
    pool_kernel_size: Pair, pool_stride: Pair, pool_padding: Pair, pool_dilation: Pair,
    pool_out_hw: Pair, return_argmax: bool = False,
) -> tuple[np.ndarray, ...]:
    """max_pool2d(batch_norm2d_relu(x)) -> (y (N,C,POH,POW), mean, var[, argmax]),
    bit-identical to the two ops; the (N,C,H,W) BatchNorm output is never written.
    argmax: uint8 window codes as conv2d_relu_max_pool2d's."""
def batch_norm2d_relu_max_pool2d_backward(
    grad_out: np.ndarray, x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None,
    mean: np.ndarray, var: np.ndarray, eps: float, training: bool,
    pool_kernel_size: Pair, pool_stride: Pair, pool_padding: Pair, pool_dilation: Pair,
    need_x: bool, need_w: bool, need_b: bool, argmax: np.ndarray | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(grad_x, grad_weight, grad_bias) of batch_norm2d_relu_max_pool2d, None where not
    needed; routed by the forward's argmax when given, else by the pool's backward on the
    BatchNorm output recomputed from x."""
