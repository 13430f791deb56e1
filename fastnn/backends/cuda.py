"""The ``cuda`` backend: Numba-CUDA kernels on CuPy arrays.

Same ops, names and argument order as :mod:`fastnn.backends.numpy_ref` (the
contract is in :mod:`fastnn.backends`); the kernels live in
:mod:`fastnn.backends._cuda`. Inputs are CuPy arrays and results are new CuPy
arrays allocated from CuPy's memory pool; every kernel is launched on CuPy's
current stream and no op copies data to the host or waits for the device, so
a whole training step (forward, backward, optimizer) queues asynchronously.
``softmax_cross_entropy`` returns its loss as a 0-d device array for that
reason.

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` in the environment
before Numba is first imported) the same kernels run on the CPU and the ops
take and return NumPy arrays; that is how the kernels are tested without a GPU.

This module imports anywhere: CuPy and Numba are only imported on first use.
:func:`is_available` says whether a GPU (or the simulator) can be used; an op
called without one raises ``RuntimeError`` saying why.

JIT and caching
---------------
Each kernel is compiled by Numba on first use for its dtype and compile-time
configuration (GEMM tile and transposes, filter size of the direct conv, ...)
and cached on disk (``cache=True``, under ``__pycache__`` or
``NUMBA_CACHE_DIR``), so only the first call in the first process pays the
compile (NVVM + ptxas: expect on the order of a second per kernel variant; a
training step uses about a dozen variants), and later processes load the
cached binaries. These numbers have not been measured on a GPU yet:
``benchmarks/bench_gpu.py`` measures first-call latency with an empty and with
a warm cache on the real device. Under the simulator nothing is compiled, so
timings there mean nothing.

Limitations: one GPU (the CuPy device current at first use); float32 and
float64 only; labels are not range-checked (see ``softmax_cross_entropy``).
"""

from __future__ import annotations

import sys
from typing import Any

from fastnn.backends import _composed

Pair = tuple[int, int]

__all__ = [
    "adam_step",
    "avg_pool2d",
    "avg_pool2d_backward",
    "conv2d",
    "conv2d_backward_input",
    "conv2d_backward_weight",
    "conv2d_relu_max_pool2d",
    "conv2d_relu_max_pool2d_backward",
    "device_info",
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


def _rt() -> Any:
    from fastnn.backends._cuda.launch import runtime

    return runtime()


def _checked(**arrays: Any) -> Any:
    """The runtime, after checking that every array lives where the kernels run."""
    rt = _rt()
    for name, a in arrays.items():
        rt.check(a, name)
    return rt


def is_available() -> bool:
    """True when a CUDA GPU with CuPy and Numba, or Numba's CUDA simulator, is usable."""
    try:
        from fastnn.backends._cuda.launch import runtime_or_none
    except ImportError:
        return False
    return runtime_or_none()[0] is not None


def device_info() -> dict:
    """GPU, driver, CUDA runtime, CuPy and Numba versions for ``fastnn.show_config()``.

    Never raises: when the backend is unavailable the ``cuda`` entry says why.
    """
    from fastnn.backends._cuda.launch import runtime_or_none

    info: dict = {}
    try:
        import numba

        info["numba"] = numba.__version__
        try:
            import numba_cuda  # the NVIDIA-maintained CUDA target, when installed

            info["numba_cuda"] = getattr(numba_cuda, "__version__", "installed")
        except ImportError:
            info["numba_cuda"] = "not installed (numba's built-in CUDA target)"
    except ImportError:
        info["numba"] = "not installed"
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except ImportError:
        info["cupy"] = "not installed"
    rt, reason = runtime_or_none()
    if rt is None:
        info["cuda"] = f"unavailable ({reason})"
        return info
    if rt.sim:
        info["cuda"] = "Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1): kernels run on the CPU"
        return info
    try:
        import cupy

        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)

        def version(v: int) -> str:
            return f"{v // 1000}.{(v % 1000) // 10}"

        info["cuda"] = "available"
        info["gpu"] = f"{name} (device {dev.id}, sm_{props['major']}{props['minor']}, " \
                      f"{rt.num_sms} SMs, {props['totalGlobalMem'] / 2**30:.0f} GiB)"
        info["cuda_driver"] = version(cupy.cuda.runtime.driverGetVersion())
        info["cuda_runtime"] = version(cupy.cuda.runtime.runtimeGetVersion())
    except Exception as exc:  # noqa: BLE001 - report, never fail show_config
        info["cuda"] = f"available, but querying the device failed ({exc})"
    return info


# --------------------------------------------------------------------------- #
# conv2d
# --------------------------------------------------------------------------- #


def conv2d(
    x: Any, weight: Any, bias: Any, stride: Pair, padding: Pair, dilation: Pair, groups: int
) -> Any:
    """x (N, C, H, W), weight (O, C/groups, KH, KW), bias (O,) or None -> y (N, O, OH, OW)."""
    _checked(x=x, weight=weight, bias=bias)
    from fastnn.backends._cuda import conv

    return conv.conv2d(x, weight, bias, stride, padding, dilation, groups)


def conv2d_backward_input(
    grad_out: Any, weight: Any, input_hw: Pair, stride: Pair, padding: Pair,
    dilation: Pair, groups: int,
) -> Any:
    """grad_out (N, O, OH, OW), weight (O, C/groups, KH, KW) -> grad_x (N, C, H, W)."""
    _checked(grad_out=grad_out, weight=weight)
    from fastnn.backends._cuda import conv

    return conv.conv2d_backward_input(
        grad_out, weight, input_hw, stride, padding, dilation, groups
    )


def conv2d_backward_weight(
    grad_out: Any, x: Any, kernel_hw: Pair, stride: Pair, padding: Pair,
    dilation: Pair, groups: int,
) -> Any:
    """grad_out (N, O, OH, OW), x (N, C, H, W) -> grad_w (O, C/groups, KH, KW)."""
    _checked(grad_out=grad_out, x=x)
    from fastnn.backends._cuda import conv

    return conv.conv2d_backward_weight(
        grad_out, x, kernel_hw, stride, padding, dilation, groups
    )


# --------------------------------------------------------------------------- #
# matmul
# --------------------------------------------------------------------------- #


def matmul(a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
    """op(a) @ op(b): 2-D (M,K)@(K,N) or batched 3-D (B,M,K)@(B,K,N).

    With transpose_a ``a`` is stored (K, M) (or (B, K, M)); with transpose_b
    ``b`` is stored (N, K). K = 0 gives zeros.
    """
    rt = _checked(a=a, b=b)
    from fastnn.backends._cuda.gemm import gemm

    if a.ndim != b.ndim or a.ndim not in (2, 3):
        raise ValueError(f"matmul: a and b must both be 2-D or 3-D, got {a.ndim}-D and {b.ndim}-D")
    batch = a.shape[0] if a.ndim == 3 else 1
    m = a.shape[-1] if transpose_a else a.shape[-2]
    k = a.shape[-2] if transpose_a else a.shape[-1]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    out = rt.empty((batch, m, n) if a.ndim == 3 else (m, n), a.dtype)
    gemm(a.reshape(-1), b.reshape(-1), out.reshape(-1), m, n, k,
         trans_a=transpose_a, trans_b=transpose_b, batch=batch,
         a_strides=(m * k, 0, 0), b_strides=(k * n, 0, 0))
    return out


# --------------------------------------------------------------------------- #
# pooling
# --------------------------------------------------------------------------- #


def max_pool2d(
    x: Any, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair, out_hw: Pair
) -> Any:
    """x (N, C, H, W) -> y (N, C, OH, OW); out_hw already applies ceil_mode."""
    _checked(x=x)
    from fastnn.backends._cuda import pool

    return pool.max_pool2d(x, kernel_size, stride, padding, dilation, out_hw)


def max_pool2d_backward(
    grad_out: Any, x: Any, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair
) -> Any:
    """grad_out (N, C, OH, OW), x (N, C, H, W) -> grad_x; ties go to the first maximum,
    NaNs to the last NaN (torch's rule)."""
    _checked(grad_out=grad_out, x=x)
    from fastnn.backends._cuda import pool

    return pool.max_pool2d_backward(grad_out, x, kernel_size, stride, padding, dilation)


def max_pool2d_with_indices(
    x: Any, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair, out_hw: Pair
) -> tuple[Any, Any]:
    """x (N, C, H, W) -> (y, int64 indices), both (N, C, OH, OW): flat h*W+w index in
    each input plane of each window's first maximum (last NaN), as torch's."""
    _checked(x=x)
    from fastnn.backends._cuda import pool

    return pool.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, out_hw)


def avg_pool2d(
    x: Any, kernel_size: Pair, stride: Pair, padding: Pair, out_hw: Pair,
    count_include_pad: bool, divisor_override: int | None,
) -> Any:
    """x (N, C, H, W) -> y (N, C, OH, OW) with torch's divisor rules."""
    _checked(x=x)
    from fastnn.backends._cuda import pool

    return pool.avg_pool2d(
        x, kernel_size, stride, padding, out_hw, count_include_pad, divisor_override
    )


def avg_pool2d_backward(
    grad_out: Any, input_hw: Pair, kernel_size: Pair, stride: Pair, padding: Pair,
    count_include_pad: bool, divisor_override: int | None,
) -> Any:
    """grad_out (N, C, OH, OW) -> grad_x (N, C, H, W), (H, W) = input_hw."""
    _checked(grad_out=grad_out)
    from fastnn.backends._cuda import pool

    return pool.avg_pool2d_backward(
        grad_out, input_hw, kernel_size, stride, padding, count_include_pad, divisor_override
    )


# --------------------------------------------------------------------------- #
# activations, loss, optimizers
# --------------------------------------------------------------------------- #


def relu(x: Any) -> Any:
    """max(x, 0) elementwise; NaN stays NaN."""
    _checked(x=x)
    from fastnn.backends._cuda import elementwise

    return elementwise.relu(x)


def relu_backward(grad_out: Any, y: Any) -> Any:
    """grad_out where the relu output y > 0, else 0."""
    _checked(grad_out=grad_out, y=y)
    from fastnn.backends._cuda import elementwise

    return elementwise.relu_backward(grad_out, y)


def softmax_cross_entropy(logits: Any, labels: Any) -> tuple[Any, Any]:
    """logits (N, K), labels int64 (N,) -> (mean loss, 0-d on the device; grad (N, K)).

    No host sync: labels are not range-checked here; an out-of-range label
    makes the loss (and its row of the gradient) NaN.
    """
    _checked(logits=logits, labels=labels)
    from fastnn.backends._cuda import elementwise

    return elementwise.softmax_cross_entropy(logits, labels)


def sgd_step(
    param: Any, grad: Any, momentum_buf: Any, lr: float, momentum: float,
    weight_decay: float, nesterov: bool,
) -> None:
    """In-place torch.optim.SGD step (dampening 0); momentum_buf may be None if momentum == 0."""
    _checked(param=param, grad=grad, momentum_buf=momentum_buf)
    from fastnn.backends._cuda import elementwise

    elementwise.sgd_step(param, grad, momentum_buf, lr, momentum, weight_decay, nesterov)


def adam_step(
    param: Any, grad: Any, exp_avg: Any, exp_avg_sq: Any, step: int, lr: float,
    beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
) -> None:
    """In-place torch.optim.Adam (decoupled=False) / AdamW (decoupled=True) step."""
    _checked(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    from fastnn.backends._cuda import elementwise

    elementwise.adam_step(
        param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, decoupled
    )


# --------------------------------------------------------------------------
# fused conv2d + ReLU + max_pool2d (composed from the ops above)
# --------------------------------------------------------------------------


# Composed from the ops above, as numpy_ref and cuda share it (see _composed).
conv2d_relu_max_pool2d, conv2d_relu_max_pool2d_backward = _composed.fused_conv_relu_pool(
    sys.modules[__name__]
)
