"""relu, softmax cross-entropy and the optimizer steps for the Numba-CUDA backend.

All of these are memory-bound; the kernels are grid-stride loops over flat
arrays with the grid capped at 32 blocks per SM. Scalars (learning rate,
betas, ...) are passed as the array's dtype (``T(lr)``) and branches that
depend only on hyper-parameters (momentum == 0, nesterov, decoupled weight
decay) are compile-time constants of the generated kernel.

``softmax_cross_entropy`` never synchronizes: the mean loss is reduced on the
device into a 1-element array that is returned as a 0-d view. Labels are not
range-checked on the host (that would need a sync); a label outside [0, K)
makes its row's loss and gradient NaN, so the mean loss is NaN.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numba import cuda, float64

from fastnn.backends._cuda.gemm import numba_type
from fastnn.backends._cuda.launch import Runtime, ceil_div, runtime

_THREADS = 256
_ROW_THREADS = 128  # threads per row in the softmax kernel (a power of two)


def _grid1d(n: int, rt: Runtime) -> int:
    return max(1, min(ceil_div(n, _THREADS), 32 * rt.num_sms))


@functools.cache
def _relu_kernel(T: Any) -> Any:
    zero = T(0)

    @cuda.jit(cache=True)
    def kernel(x, y, n):
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            v = x[i]
            # v != v keeps NaN, as np.maximum / torch.relu do.
            y[i] = v if (v > zero or v != v) else zero

    return kernel


@functools.cache
def _relu_bwd_kernel(T: Any) -> Any:
    zero = T(0)

    @cuda.jit(cache=True)
    def kernel(g, y, out, n):
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            out[i] = g[i] if y[i] > zero else zero

    return kernel


@functools.cache
def _softmax_ce_kernels(T: Any) -> tuple[Any, Any]:
    NTH = _ROW_THREADS
    zero = T(0)
    one = T(1)
    neg_inf = T(-math.inf)
    nan = T(math.nan)
    zero64 = float64(0)

    @cuda.jit(cache=True)
    def rows(logits, labels, grad, row_loss, N, K):
        # One block per row (grid-stride over rows): max, sum of exp, then the
        # gradient and the row's loss, with shared-memory tree reductions.
        red = cuda.shared.array(NTH, T)
        tid = cuda.threadIdx.x
        inv_n = T(N)
        for row in range(cuda.blockIdx.x, N, cuda.gridDim.x):
            base = row * K
            m = neg_inf
            for j in range(tid, K, NTH):
                v = logits[base + j]
                if v > m or v != v:
                    m = v
            red[tid] = m
            cuda.syncthreads()
            step = NTH // 2
            while step > 0:
                if tid < step:
                    a = red[tid]
                    b = red[tid + step]
                    if b > a or b != b:
                        red[tid] = b
                cuda.syncthreads()
                step //= 2
            mx = red[0]
            cuda.syncthreads()
            s = zero
            for j in range(tid, K, NTH):
                s += math.exp(logits[base + j] - mx)
            red[tid] = s
            cuda.syncthreads()
            step = NTH // 2
            while step > 0:
                if tid < step:
                    red[tid] += red[tid + step]
                cuda.syncthreads()
                step //= 2
            lse = math.log(red[0])
            cuda.syncthreads()
            label = labels[row]
            ok = label >= 0 and label < K
            for j in range(tid, K, NTH):
                if ok:
                    p = math.exp(logits[base + j] - mx - lse)
                    if j == label:
                        p -= one
                    grad[base + j] = p / inv_n
                else:
                    grad[base + j] = nan
            if tid == 0:
                if ok:
                    row_loss[row] = float64(lse - (logits[base + label] - mx))
                else:
                    row_loss[row] = float64(nan)

    @cuda.jit(cache=True)
    def mean(row_loss, loss, N):
        # A single block sums the per-row losses in float64 (cheap, and the
        # mean of many float32 terms loses digits otherwise).
        red = cuda.shared.array(NTH, float64)
        tid = cuda.threadIdx.x
        s = zero64
        for i in range(tid, N, NTH):
            s += row_loss[i]
        red[tid] = s
        cuda.syncthreads()
        step = NTH // 2
        while step > 0:
            if tid < step:
                red[tid] += red[tid + step]
            cuda.syncthreads()
            step //= 2
        if tid == 0:
            loss[0] = T(red[0] / float64(N))

    return rows, mean


# One element of each optimizer update, shared by these per-array kernels and
# the multi-tensor kernels (multi_tensor.py). Module-level device functions, not
# closures: a captured dispatcher would change Numba's on-disk cache key in every
# process. The flags are constants in every caller, so NVVM folds the branches.
# Optimizer state below the smallest normal (``tiny``) is stored as 0, as on the
# other backends (see fastnn.backends._array_ops.flush_subnormal).
def tiny_of(T: Any) -> Any:
    """The smallest normal number of the Numba float type T, as a NumPy scalar."""
    dt = np.dtype(str(T))
    return dt.type(np.finfo(dt).tiny)


@cuda.jit(device=True)
def flush_subnormal(x, tiny):
    # x - x, not x * 0: an integer literal would promote float32 to float64; NaN
    # (whose compare is false) stays NaN either way.
    return x if abs(x) >= tiny else x - x


@cuda.jit(device=True)
def sgd_update(param, grad, buf, i, lr, momentum, wd, has_wd, has_momentum, nesterov, tiny):
    p = param[i]
    g = grad[i]
    if has_wd:
        g = g + wd * p
    if has_momentum:
        b = momentum * buf[i]
        b = flush_subnormal(b + g, tiny)
        buf[i] = b
        if nesterov:
            g = g + momentum * b
        else:
            g = b
    param[i] = p - lr * g


@cuda.jit(device=True)
def adam_update(param, grad, m, v, i, wd, shrink, beta1, one_m_b1, beta2, one_m_b2,
                step_size, bc2_sqrt, eps, l2, decoupled, tiny):
    p = param[i]
    g = grad[i]
    if decoupled:
        p = p * shrink  # AdamW: p *= 1 - lr*wd before the update
    if l2:
        g = g + wd * p
    mi = beta1 * m[i]
    mi = flush_subnormal(mi + one_m_b1 * g, tiny)
    vi = beta2 * v[i]
    vi = flush_subnormal(vi + one_m_b2 * g * g, tiny)
    m[i] = mi
    v[i] = vi
    denom = math.sqrt(vi) / bc2_sqrt + eps
    param[i] = p - step_size * mi / denom


@functools.cache
def _sgd_kernel(T: Any, HAS_WD: bool, HAS_MOMENTUM: bool, NESTEROV: bool) -> Any:
    TINY = tiny_of(T)

    @cuda.jit(cache=True)
    def kernel(param, grad, buf, n, lr, momentum, wd):
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            sgd_update(param, grad, buf, i, lr, momentum, wd, HAS_WD, HAS_MOMENTUM, NESTEROV,
                       TINY)

    return kernel


@functools.cache
def _adam_kernel(T: Any, L2: bool, DECOUPLED: bool) -> Any:
    TINY = tiny_of(T)

    @cuda.jit(cache=True)
    def kernel(param, grad, m, v, n, wd, shrink, beta1, one_m_b1, beta2, one_m_b2,
               step_size, bc2_sqrt, eps):
        for i in range(cuda.grid(1), n, cuda.gridsize(1)):
            adam_update(param, grad, m, v, i, wd, shrink, beta1, one_m_b1, beta2, one_m_b2,
                        step_size, bc2_sqrt, eps, L2, DECOUPLED, TINY)

    return kernel


def relu(x: Any) -> Any:
    """max(x, 0) elementwise (NaN stays NaN); any shape."""
    rt = runtime()
    y = rt.empty(x.shape, x.dtype)
    if y.size:
        rt.launch(_relu_kernel(numba_type(x.dtype)), (_grid1d(y.size, rt),), _THREADS,
                  x.reshape(-1), y.reshape(-1), y.size)
    return y


def relu_backward(grad_out: Any, y: Any) -> Any:
    """grad_out where y > 0, else 0; same shape as y."""
    rt = runtime()
    out = rt.empty(y.shape, grad_out.dtype)
    if out.size:
        rt.launch(_relu_bwd_kernel(numba_type(grad_out.dtype)), (_grid1d(out.size, rt),),
                  _THREADS, grad_out.reshape(-1), y.reshape(-1), out.reshape(-1), out.size)
    return out


def softmax_cross_entropy(logits: Any, labels: Any) -> tuple[Any, Any]:
    """(mean loss as a 0-d device array, grad_logits (N, K)) for logits (N, K), labels (N,)."""
    rt = runtime()
    n, k = logits.shape
    grad = rt.empty((n, k), logits.dtype)
    loss = rt.empty((1,), logits.dtype)
    if n == 0:
        loss.fill(np.nan)
        return loss.reshape(()), grad
    row_loss = rt.empty((n,), np.float64)
    rows, mean = _softmax_ce_kernels(numba_type(logits.dtype))
    blocks = min(n, 32 * rt.num_sms)
    rt.launch(rows, (blocks,), _ROW_THREADS, logits.reshape(-1), labels.reshape(-1),
              grad.reshape(-1), row_loss, n, k)
    rt.launch(mean, (1,), _ROW_THREADS, row_loss, loss, n)
    return loss.reshape(()), grad


def sgd_step(
    param: Any, grad: Any, momentum_buf: Any, lr: float, momentum: float,
    weight_decay: float, nesterov: bool,
) -> None:
    """In-place torch.optim.SGD step (dampening 0); see :mod:`fastnn.backends`."""
    rt = runtime()
    n = param.size
    has_m = momentum != 0
    if has_m and momentum_buf is None:
        raise ValueError("momentum_buf must be an array when momentum != 0")
    if n == 0:
        return
    T = numba_type(param.dtype)
    kernel = _sgd_kernel(T, weight_decay != 0, has_m, bool(nesterov) and has_m)
    buf = momentum_buf.reshape(-1) if has_m else grad.reshape(-1)  # unused stand-in
    rt.launch(kernel, (_grid1d(n, rt),), _THREADS, param.reshape(-1), grad.reshape(-1),
              buf, n, T(lr), T(momentum), T(weight_decay))


def adam_step(
    param: Any, grad: Any, exp_avg: Any, exp_avg_sq: Any, step: int, lr: float,
    beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
) -> None:
    """In-place torch.optim.Adam / AdamW step; ``step`` is 1-based."""
    rt = runtime()
    n = param.size
    if n == 0:
        return
    T = numba_type(param.dtype)
    has_wd = weight_decay != 0
    kernel = _adam_kernel(T, has_wd and not decoupled, has_wd and bool(decoupled))
    # Bias corrections are host scalars (step is a Python int): no device work.
    step_size = lr / (1 - beta1**step)
    bc2_sqrt = math.sqrt(1 - beta2**step)
    rt.launch(kernel, (_grid1d(n, rt),), _THREADS, param.reshape(-1), grad.reshape(-1),
              exp_avg.reshape(-1), exp_avg_sq.reshape(-1), n, T(weight_decay),
              T(1 - lr * weight_decay), T(beta1), T(1 - beta1), T(beta2), T(1 - beta2),
              T(step_size), T(bc2_sqrt), T(eps))
