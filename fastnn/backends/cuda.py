"""The ``cuda`` backend: Numba-CUDA kernels on CuPy arrays.

The ops of :class:`fastnn.backends.contract.Backend` (shapes, layout and
semantics documented there), built from the table ``_OPS`` below: each op
checks that its array arguments live where the kernels run, then calls the
kernel launcher of the same name in :mod:`fastnn.backends._cuda`. Inputs are
CuPy arrays and results are new CuPy arrays allocated from CuPy's memory pool;
every kernel is launched on CuPy's current stream and no op copies data to the
host or waits for the device, so a whole training step (forward, backward,
optimizer) queues asynchronously.
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

import importlib
import sys
from typing import Any, Callable

from fastnn.backends import _composed, contract


def _rt() -> Any:
    from fastnn.backends._cuda.launch import runtime

    return runtime()


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
# The ops
# --------------------------------------------------------------------------- #

#: op -> (module of fastnn.backends._cuda (or a dotted module path) whose function
#: of the same name launches its kernels, the array arguments to check for device
#: placement). The launchers take the contract's arguments in the contract's order.
_ARRAY_OPS = "fastnn.backends._array_ops"
_OPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "conv2d": ("conv", ("x", "weight", "bias")),
    "conv2d_backward_input": ("conv", ("grad_out", "weight")),
    "conv2d_backward_weight": ("conv", ("grad_out", "x")),
    "matmul": ("gemm", ("a", "b")),
    "max_pool2d": ("pool", ("x",)),
    "max_pool2d_backward": ("pool", ("grad_out", "x")),
    "max_pool2d_with_indices": ("pool", ("x",)),
    "avg_pool2d": ("pool", ("x",)),
    "avg_pool2d_backward": ("pool", ("grad_out",)),
    "relu": ("elementwise", ("x",)),
    "relu_backward": ("elementwise", ("grad_out", "y")),
    "softmax_cross_entropy": ("elementwise", ("logits", "labels")),
    "sgd_step": ("elementwise", ("param", "grad", "momentum_buf")),
    "adam_step": ("elementwise", ("param", "grad", "exp_avg", "exp_avg_sq")),
    # CuPy array expressions shared with numpy_ref (NumPy under the simulator).
    "sigmoid": (_ARRAY_OPS, ("x",)),
    "sigmoid_backward": (_ARRAY_OPS, ("grad_out", "y")),
    "tanh": (_ARRAY_OPS, ("x",)),
    "tanh_backward": (_ARRAY_OPS, ("grad_out", "y")),
    "log_softmax": (_ARRAY_OPS, ("x",)),
    "log_softmax_backward": (_ARRAY_OPS, ("grad_out", "y")),
    "mse_loss": (_ARRAY_OPS, ("input", "target")),
    "mse_loss_backward": (_ARRAY_OPS, ("grad_out", "input", "target")),
    "dropout_masked": (_ARRAY_OPS, ("x", "mask")),
    "lookup_u8": (_ARRAY_OPS, ("images", "rows", "table")),
    "batch_norm2d": (_ARRAY_OPS, ("x", "weight", "bias", "mean", "var")),
    "batch_norm2d_backward": (_ARRAY_OPS, ("grad_out", "x", "weight", "mean", "var")),
}


def launcher_module(module: str) -> str:
    """The importable path of an ``_OPS`` row's module."""
    return module if "." in module else f"fastnn.backends._cuda.{module}"


def _make_op(name: str, module: str, arrays: tuple[str, ...]) -> Callable[..., Any]:
    """Op ``name`` with the contract's signature and docstring, launching lazily."""
    sig = contract.signature(name)
    params = list(sig.parameters)
    checks = [(params.index(a), a) for a in arrays]  # ValueError here: a typo in _OPS
    launcher: Callable[..., Any] | None = None

    def op(*args: Any, **kwargs: Any) -> Any:
        nonlocal launcher
        if kwargs or len(args) != len(params):
            # Keywords or defaults: rare (fastnn.functional passes every argument
            # positionally), so only they pay for binding.
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            args = bound.args
        rt = _rt()  # RuntimeError saying why when no GPU or simulator is usable
        for i, arg_name in checks:
            rt.check(args[i], arg_name)
        if launcher is None:  # the _cuda modules import Numba: only on first use
            launcher = getattr(importlib.import_module(launcher_module(module)), name)
        return launcher(*args)

    op.__name__ = op.__qualname__ = name
    op.__module__ = __name__
    op.__doc__ = contract.doc(name)
    op.__signature__ = sig  # type: ignore[attr-defined]
    return op


globals().update({name: _make_op(name, *row) for name, row in _OPS.items()})

# Composed from the ops above, as numpy_ref does (see _composed).
conv2d_relu_max_pool2d, conv2d_relu_max_pool2d_backward = _composed.fused_conv_relu_pool(
    sys.modules[__name__]
)
batch_norm2d_relu, batch_norm2d_relu_backward = _composed.fused_bn_relu(sys.modules[__name__])
batch_norm2d_relu_max_pool2d, batch_norm2d_relu_max_pool2d_backward = (
    _composed.fused_bn_relu_pool(sys.modules[__name__])
)
linear_relu, linear_relu_backward = _composed.fused_linear_relu(sys.modules[__name__])
# (The optimizers' fast path on this backend is one multi-tensor launch per group
# over flat buffers, fastnn.optim.flat; these serve the per-parameter fallback.)
sgd_step_multi, adam_step_multi = _composed.multi_steps(sys.modules[__name__])

__all__ = sorted([
    *_OPS, "batch_norm2d_relu", "batch_norm2d_relu_backward", "batch_norm2d_relu_max_pool2d",
    "batch_norm2d_relu_max_pool2d_backward", "conv2d_relu_max_pool2d",
    "conv2d_relu_max_pool2d_backward", "device_info", "is_available", "linear_relu",
    "linear_relu_backward", "sgd_step_multi", "adam_step_multi",
])
