"""Backends: ``numpy`` (the reference oracle), ``cpu`` (C++ kernels) and ``cuda``
(Numba-CUDA kernels on CuPy arrays).

Every backend module exposes the same array-level ops, with the same names and
argument order. ``fastnn.functional`` validates and normalises the arguments
first, so a backend may assume:

* arrays are C-contiguous, of one float dtype (float32 or float64), 4-D NCHW for
  images and OIHW for conv weights;
* ``stride``, ``padding``, ``dilation``, ``kernel_size``, ``input_hw``,
  ``kernel_hw`` and ``out_hw`` are pairs of Python ints, padding is symmetric;
* the geometry is one that :mod:`fastnn.geometry` (torch's rules) accepted and
  ``out_hw`` is the size it computed: a backend never re-derives that policy;
* shapes are consistent (channels, groups, grad_out shape) and N may be 0.

Each op returns a new C-contiguous array of the input's dtype (the in-place
optimizer steps return None).

Ops
---
conv2d(x, weight, bias, stride, padding, dilation, groups) -> y
    x (N,C,H,W), weight (O,C//groups,KH,KW), bias (O,) or None -> y (N,O,OH,OW)
conv2d_backward_input(grad_out, weight, input_hw, stride, padding, dilation, groups)
    -> grad_x (N,C,H,W)
conv2d_backward_weight(grad_out, x, kernel_hw, stride, padding, dilation, groups)
    -> grad_w (O,C//groups,KH,KW)
matmul(a, b, transpose_a=False, transpose_b=False) -> c
    op(a) @ op(b); 2-D (M,K)@(K,N) or batched 3-D (B,M,K)@(B,K,N). With
    transpose_a, ``a`` is stored (K,M) (or (B,K,M)); with transpose_b, ``b`` is
    stored (N,K). Both operands have the same ndim.
max_pool2d(x, kernel_size, stride, padding, dilation, out_hw) -> y
    out_hw already applies ceil_mode; windows are clipped to the input, padded
    cells never win. NaN propagates.
max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, out_hw)
    -> (y, indices)
    indices int64 (N,C,OH,OW): flat h*W+w index into each input plane of the
    window's winner: scanning in row-major window order, a real cell wins when
    it is greater than the running max or is NaN (the first maximum, or the
    last NaN: torch's rule). A window with no real cell gives -inf and the
    index of its first tap at or after the plane's top-left corner (torch's).
max_pool2d_backward(grad_out, x, kernel_size, stride, padding, dilation) -> grad_x
    Recomputes each window's winner (as max_pool2d_with_indices) and routes
    its gradient there.
avg_pool2d(x, kernel_size, stride, padding, out_hw, count_include_pad,
           divisor_override) -> y
    divisor_override is an int or None. With count_include_pad the divisor counts
    padded cells but not cells past the padded input (torch's ceil_mode rule).
avg_pool2d_backward(grad_out, input_hw, kernel_size, stride, padding,
                    count_include_pad, divisor_override) -> grad_x
conv2d_relu_max_pool2d(x, weight, bias, stride, padding, dilation, groups,
                       pool_kernel_size, pool_stride, pool_padding, pool_dilation,
                       pool_out_hw) -> y
    max_pool2d(relu(conv2d(...))) without materialising the conv output
    (fused in C++; numpy_ref and cuda compose the separate ops).
conv2d_relu_max_pool2d_backward(grad_out, x, weight, bias, <same conv/pool args>,
                                need_x, need_w, need_b) -> (gx|None, gw|None, gb|None)
relu(x) -> y
relu_backward(grad_out, y) -> grad_x            (grad where y > 0, else 0)
softmax_cross_entropy(logits, labels) -> (loss, grad_logits)
    logits (N,K), labels int64 (N,); loss is the batch mean as a 0-d array on
    the same device (no host sync); grad_logits = (softmax - onehot) / N.
sgd_step(param, grad, momentum_buf, lr, momentum, weight_decay, nesterov) -> None
    In place, torch.optim.SGD semantics with dampening 0: g = grad + wd*param;
    buf = momentum*buf + g (buf starts at zeros, which matches torch's first
    step); g = g + momentum*buf if nesterov else buf; param -= lr*g.
    momentum_buf may be None when momentum == 0.
adam_step(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps,
          weight_decay, decoupled) -> None
    In place, torch.optim.Adam (decoupled=False, L2) / AdamW (decoupled=True).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from collections.abc import Iterator
from types import ModuleType

BACKENDS = ("numpy", "cpu", "cuda")
_MODULES = {"numpy": "numpy_ref", "cpu": "cpu", "cuda": "cuda"}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fastnn_backend", default=None
)


_loaded: dict[str, ModuleType] = {}


def get_backend(name: str) -> ModuleType:
    """Import and return the backend module called ``name``."""
    module = _loaded.get(name)
    if module is not None:
        return module
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    _loaded[name] = module
    return module


def forced_backend() -> str | None:
    """The backend forced by an enclosing ``fastnn.backend(...)`` block, if any."""
    return _forced.get()


@contextlib.contextmanager
def backend(name: str) -> Iterator[ModuleType]:
    """Force every fastnn call inside the block onto backend ``name``.

    >>> with fastnn.backend("numpy"):
    ...     y = fastnn.functional.conv2d(x, w)
    """
    module = get_backend(name)
    token = _forced.set(name)
    try:
        yield module
    finally:
        _forced.reset(token)


def available_backends() -> list[str]:
    """Backends that import and can run here."""
    out = []
    for name in BACKENDS:
        try:
            mod = get_backend(name)
        except Exception:  # noqa: BLE001 - any import failure means unavailable
            continue
        check = getattr(mod, "is_available", None)
        if check is None or check():
            out.append(name)
    return out
