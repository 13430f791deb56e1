"""Multi-tensor Adam/AdamW and SGD: one launch over a flat parameter buffer.

:mod:`fastnn.optim.flat` lays a parameter group's parameters, gradients and
optimizer state out as views into flat buffers; these kernels update a whole
group in one grid-stride launch.

Nothing per step crosses from the host, so the launch can be captured in a
CUDA graph and replayed: the hyper-parameters live in a small float64 device
array ``hyper`` (rewritten by the host only when they change, e.g. by an lr
schedule), and Adam's step count lives on the device (``counter[0]``): each
launch computes its bias corrections from ``counter[0] + 1``, and the last
block to finish (an atomic ticket in ``counter[1]``) stores the new count.
The element-wise arithmetic is the per-parameter kernels' of
:mod:`fastnn.backends._cuda.elementwise`, in the same order.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numba
from numba import cuda, float64

from fastnn.backends._cuda.elementwise import adam_update, sgd_update, tiny_of
from fastnn.backends._cuda.launch import BoundLaunch, ceil_div, runtime

_THREADS = 64 if numba.config.ENABLE_CUDASIM else 256  # fewer Python threads when simulated

#: Layout of ``hyper`` for each optimizer.
ADAM_HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay")
SGD_HYPER = ("lr", "momentum", "weight_decay")


@functools.cache
def _adam_kernel(T: Any, L2: bool, DECOUPLED: bool) -> Any:
    TINY = tiny_of(T)

    @cuda.jit(cache=True)
    def kernel(param, grad, m, v, n, hyper, counter):
        t = counter[0] + 1
        lr = hyper[0]
        b1 = hyper[1]
        b2 = hyper[2]
        step_size = T(lr / (float64(1) - b1 ** t))
        bc2_sqrt = T(math.sqrt(float64(1) - b2 ** t))
        beta1 = T(b1)
        beta2 = T(b2)
        one_m_b1 = T(float64(1) - b1)
        one_m_b2 = T(float64(1) - b2)
        eps = T(hyper[3])
        wd = T(hyper[4])
        shrink = T(float64(1) - lr * hyper[4])
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            adam_update(param, grad, m, v, i, wd, shrink, beta1, one_m_b1, beta2, one_m_b2,
                        step_size, bc2_sqrt, eps, L2, DECOUPLED, TINY)
        # Every block has read counter[0] before it takes a ticket; the last
        # ticket stores the new count and resets the ticket for the next launch.
        cuda.syncthreads()
        if cuda.threadIdx.x == 0:
            cuda.threadfence()
            ticket = cuda.atomic.add(counter, 1, 1)
            if ticket == cuda.gridDim.x - 1:
                counter[0] = t
                counter[1] = 0

    return kernel


@functools.cache
def _sgd_kernel(T: Any, HAS_WD: bool, HAS_MOMENTUM: bool, NESTEROV: bool) -> Any:
    TINY = tiny_of(T)

    @cuda.jit(cache=True)
    def kernel(param, grad, buf, n, hyper):
        lr = T(hyper[0])
        momentum = T(hyper[1])
        wd = T(hyper[2])
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            sgd_update(param, grad, buf, i, lr, momentum, wd, HAS_WD, HAS_MOMENTUM, NESTEROV,
                       TINY)

    return kernel


def _grid(n: int) -> int:
    rt = runtime()
    return max(1, min(ceil_div(n, _THREADS), 32 * rt.num_sms))


def adam_launch(param: Any, grad: Any, exp_avg: Any, exp_avg_sq: Any, hyper: Any,
                counter: Any, l2: bool, decoupled: bool) -> BoundLaunch:
    """The bound launch of one Adam/AdamW step over flat 1-D buffers of one dtype."""
    from fastnn.backends._cuda.gemm import numba_type

    rt = runtime()
    n = param.size
    kernel = _adam_kernel(numba_type(param.dtype), bool(l2), bool(decoupled))
    return rt.bind(kernel, (_grid(n),), _THREADS, param, grad, exp_avg, exp_avg_sq, n,
                   hyper, counter)


def sgd_launch(param: Any, grad: Any, momentum_buf: Any, hyper: Any, has_wd: bool,
               has_momentum: bool, nesterov: bool) -> BoundLaunch:
    """The bound launch of one SGD step over flat 1-D buffers of one dtype
    (``momentum_buf`` is any array of the dtype when momentum is 0: never read)."""
    from fastnn.backends._cuda.gemm import numba_type

    rt = runtime()
    n = param.size
    kernel = _sgd_kernel(numba_type(param.dtype), bool(has_wd), bool(has_momentum),
                         bool(nesterov) and bool(has_momentum))
    return rt.bind(kernel, (_grid(n),), _THREADS, param, grad, momentum_buf, n, hyper)
