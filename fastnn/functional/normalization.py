"""BatchNorm over NCHW input, as ``torch.nn.functional.batch_norm``, with its backward;
and BatchNorm fused with the ReLU that follows it (``batch_norm2d_relu``) and with
that ReLU and a max pool (``batch_norm2d_relu_max_pool2d``), whose arguments are
validated by the same code."""

from __future__ import annotations

import numbers
from typing import Any

from fastnn._array import is_array
from fastnn.functional._args import (
    Array,
    Pair,
    _as_float_array,
    _check_bias,
    _check_grad_out,
    _contig,
    _flag,
    _pick_backend,
    _same_dtype,
    _tensor_aware,
    _xp,
)
from fastnn.functional.fused import _argmax_codes, _check_argmax_fits, _fused_pool_geometry
from fastnn.functional.pool import _check_channels


def _real(op: str, name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__} {v!r}")
    return float(v)


def _x4d(op: str, x: Any) -> Array:
    x = _as_float_array(x, op, "x")
    if x.ndim != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    return _contig(x)


def _update_running_stats(
    op: str, running_mean: Array, running_var: Array, mean: Array, var: Array, m: int,
    momentum: float | None, num_batches_tracked: Array | None,
) -> None:
    """running = (1 - momentum) * running + momentum * batch, in place; the variance
    with the unbiased batch variance; momentum None: a cumulative average."""
    if num_batches_tracked is not None:
        num_batches_tracked += 1
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError(f"{op}: momentum=None needs num_batches_tracked")
        mom = 1.0 / float(num_batches_tracked)
    else:
        mom = _real(op, "momentum", momentum)
    running_mean *= 1 - mom
    running_mean += mom * mean
    running_var *= 1 - mom
    running_var += (mom * m / max(m - 1, 1)) * var


def _check_running(op: str, name: str, a: Any, c: int, x: Array) -> None:
    """Running stats are updated in place, so they must already be arrays (any float
    dtype) on x's device: a converted copy would silently drop the update."""
    if a is None:
        return
    if not is_array(a):
        raise TypeError(f"{op}: {name} must be a NumPy or CuPy array, got {type(a).__name__}")
    _check_bias(op, a, c, x, name, same_dtype=False)


def _forward(
    op: str, x: Any, running_mean: Array | None, running_var: Array | None, weight: Any,
    bias: Any, training: bool, momentum: float | None, eps: float,
    num_batches_tracked: Array | None, pool: tuple = (),
) -> tuple[Array, ...]:
    """Validate, run backend op ``op`` (batch_norm2d, batch_norm2d_relu, or
    batch_norm2d_relu_max_pool2d with its checked ``pool`` arguments), update the
    running stats: (y, mean, var) (and the argmax codes when the pool asks)."""
    x = _x4d(op, x)
    c = x.shape[1]
    weight = _check_bias(op, weight, c, x, "weight")
    bias = _check_bias(op, bias, c, x, "bias")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must both be arrays or both None")
    for name, a in (("running_mean", running_mean), ("running_var", running_var)):
        _check_running(op, name, a, c, x)
    eps = _real(op, "eps", eps)
    run = getattr(_pick_backend(op, [x]), op)
    if not training:
        if running_mean is None:
            raise ValueError(f"{op}: running_mean and running_var must be given when not training")
        mean = running_mean.astype(x.dtype, copy=True)
        var = running_var.astype(x.dtype, copy=True)
        return run(x, weight, bias, mean, var, eps, False, *pool)
    m = x.size // max(c, 1)
    if m < 2:
        raise ValueError(
            f"{op}: expected more than 1 value per channel when training, "
            f"got input of shape {tuple(x.shape)}"
        )
    out = run(x, weight, bias, None, None, eps, True, *pool)
    if running_mean is not None:
        _update_running_stats(op, running_mean, running_var, out[1], out[2], m, momentum,
                              num_batches_tracked)
    return out


@_tensor_aware
def batch_norm2d_forward(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Array | None = None,
) -> tuple[Array, Array, Array]:
    """:func:`batch_norm2d` returning ``(y, mean, var)``: the per-channel (C,) statistics
    it normalised with (x's dtype), which :func:`batch_norm2d_backward` takes."""
    return _forward("batch_norm2d", x, running_mean, running_var, weight, bias, training,
                    momentum, eps, num_batches_tracked)


@_tensor_aware
def batch_norm2d_relu_forward(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Array | None = None,
) -> tuple[Array, Array, Array]:
    """:func:`batch_norm2d_relu` returning ``(y, mean, var)``, as
    :func:`batch_norm2d_forward`; :func:`batch_norm2d_relu_backward` takes them."""
    return _forward("batch_norm2d_relu", x, running_mean, running_var, weight, bias, training,
                    momentum, eps, num_batches_tracked)


@_tensor_aware
def batch_norm2d_relu(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Array | None = None,
) -> Array:
    """``relu(batch_norm2d(x, ...))`` in one pass (the same arguments, running-stat
    updates and values bit for bit as the two calls); the backward recomputes the
    ReLU mask from ``x``, so the pre-ReLU output is never stored."""
    return batch_norm2d_relu_forward(x, running_mean, running_var, weight, bias, training,
                                     momentum, eps, num_batches_tracked)[0]


@_tensor_aware
def batch_norm2d(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Array | None = None,
) -> Array:
    """BatchNorm over NCHW ``x`` per channel, as ``torch.nn.functional.batch_norm``.

    ``training``: normalise with the batch mean and biased variance over (N, H, W)
    and, if running stats are given, update them in place:
    ``running = (1 - momentum) * running + momentum * batch`` with the unbiased
    batch variance (``momentum=None``: cumulative average, which needs
    ``num_batches_tracked``, incremented in place). Else normalise with the
    running stats (which must be given). ``weight``/``bias`` (C,) are optional.
    """
    return batch_norm2d_forward(x, running_mean, running_var, weight, bias, training, momentum,
                                eps, num_batches_tracked)[0]


def _backward(
    op: str, grad_out: Any, x: Any, weight: Any, bias: Any, mean: Any, var: Any, eps: float,
    training: bool, output_mask: tuple[bool, bool, bool], pool: Any = None,
) -> tuple[Array | None, Array | None, Array | None]:
    """Validate and run backend op ``op`` (batch_norm2d_backward, or
    batch_norm2d_relu_backward and batch_norm2d_relu_max_pool2d_backward, which
    also take ``bias``; the latter its ``pool`` arguments: kernel_size, stride,
    padding, dilation, ceil_mode and the forward's argmax or None)."""
    x = _x4d(op, x)
    c = x.shape[1]
    grad_out = _as_float_array(grad_out, op, "grad_out")
    _same_dtype(op, x, "x", grad_out, "grad_out")
    tail: tuple = ()
    if pool is not None:
        k, s, p, d, out_shape = _pool_geometry(op, x, *pool[:5])
        _check_grad_out(op, grad_out, out_shape)
        argmax = pool[5]
        if argmax is not None:
            argmax = _argmax_codes(op, argmax, x, False, out_shape)
        tail = (k, s, p, d)
    else:
        _check_grad_out(op, grad_out, x.shape)
    weight = _check_bias(op, weight, c, x, "weight")
    bias = _check_bias(op, bias, c, x, "bias")
    mean = _check_bias(op, mean, c, x, "mean")
    var = _check_bias(op, var, c, x, "var")
    if mean is None or var is None:
        raise TypeError(f"{op}: mean and var must be arrays (from the forward)")
    need_x, need_w, need_b = (bool(v) for v in output_mask)
    need_w = need_w and weight is not None
    if not (need_x or need_w or need_b):
        return None, None, None
    if pool is not None and 0 in grad_out.shape:
        # An empty pooled output passes no gradient: BatchNorm's backward of zeros.
        g = _xp(x).zeros(x.shape, dtype=x.dtype)
        return _backward("batch_norm2d_relu_backward", g, x, weight, bias, mean, var, eps,
                         training, output_mask)
    run = getattr(_pick_backend(op, [grad_out, x]), op)
    head = (_contig(grad_out), x, weight)
    if op != "batch_norm2d_backward":  # the relu mask is recomputed with the bias
        head += (bias,)
    eps, training = _real(op, "eps", eps), bool(training)
    if pool is not None:
        return run(*head, mean, var, eps, training, *tail, need_x, need_w, need_b, argmax)
    return run(*head, mean, var, eps, training, need_x, need_w, need_b)


@_tensor_aware
def batch_norm2d_backward(
    grad_out: Array,
    x: Array,
    weight: Array | None,
    mean: Array,
    var: Array,
    eps: float = 1e-5,
    training: bool = True,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients ``(grad_x, grad_weight, grad_bias)`` of :func:`batch_norm2d` (None where
    ``output_mask`` says not needed, and grad_weight when ``weight`` is None).

    ``mean``/``var`` are the statistics :func:`batch_norm2d_forward` returned and
    ``training`` the mode it ran in (with batch statistics, grad_x includes their
    dependence on x).
    """
    return _backward("batch_norm2d_backward", grad_out, x, weight, None, mean, var, eps,
                     training, output_mask)


@_tensor_aware
def batch_norm2d_relu_backward(
    grad_out: Array,
    x: Array,
    weight: Array | None,
    bias: Array | None,
    mean: Array,
    var: Array,
    eps: float = 1e-5,
    training: bool = True,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients ``(grad_x, grad_weight, grad_bias)`` of :func:`batch_norm2d_relu`, as
    :func:`batch_norm2d_backward` of ``grad_out`` masked where the forward's output
    is not > 0. ``x``, ``weight``, ``bias`` are the forward's (the mask is
    recomputed from them), ``mean``/``var`` what :func:`batch_norm2d_relu_forward`
    returned."""
    return _backward("batch_norm2d_relu_backward", grad_out, x, weight, bias, mean, var, eps,
                     training, output_mask)


# --------------------------------------------------------------------------
# fused BatchNorm + ReLU + max_pool2d
# --------------------------------------------------------------------------


def _pool_geometry(
    op: str, x: Array, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
    ceil_mode: Any,
) -> tuple[Pair, Pair, Pair, Pair, tuple[int, int, int, int]]:
    """max_pool2d's checks (channels, then geometry) for the pool over x."""
    _check_channels(op, x)
    return _fused_pool_geometry(op, tuple(x.shape), kernel_size, stride, padding, dilation,
                                ceil_mode, what="BatchNorm output")


@_tensor_aware
def batch_norm2d_relu_max_pool2d_forward(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Array | None = None,
    pool_kernel_size: Pair = 2,
    pool_stride: Pair | None = None,
    pool_padding: Pair = 0,
    pool_dilation: Pair = 1,
    pool_ceil_mode: bool = False,
    return_argmax: bool = False,
) -> tuple[Array, ...]:
    """:func:`batch_norm2d_relu_max_pool2d` returning ``(y, mean, var)``, as
    :func:`batch_norm2d_forward` does, and with ``return_argmax`` the pool's window
    codes as a fourth entry (uint8, y's shape, as
    :func:`~fastnn.functional.conv2d_relu_max_pool2d` returns them), which
    :func:`batch_norm2d_relu_max_pool2d_backward` takes as ``argmax``."""
    op = "batch_norm2d_relu_max_pool2d"
    return_argmax = _flag(return_argmax, op, "return_argmax")
    x = _x4d(op, x)
    k, s, p, d, out_shape = _pool_geometry(op, x, pool_kernel_size, pool_stride, pool_padding,
                                           pool_dilation, pool_ceil_mode)
    if return_argmax:
        _check_argmax_fits(op, k)
    if 0 in out_shape:
        # No pooled output: the statistics (and running-stat updates) still apply.
        _, mean, var = _forward("batch_norm2d_relu", x, running_mean, running_var, weight, bias,
                                training, momentum, eps, num_batches_tracked)
        xp = _xp(x)
        y = xp.empty(out_shape, dtype=x.dtype)
        return (y, mean, var, xp.empty(out_shape, dtype=xp.uint8)) if return_argmax else (
            y, mean, var)
    return _forward(op, x, running_mean, running_var, weight, bias, training, momentum, eps,
                    num_batches_tracked, (k, s, p, d, out_shape[2:], return_argmax))


@_tensor_aware
def batch_norm2d_relu_max_pool2d(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Array | None = None,
    pool_kernel_size: Pair = 2,
    pool_stride: Pair | None = None,
    pool_padding: Pair = 0,
    pool_dilation: Pair = 1,
    pool_ceil_mode: bool = False,
) -> Array:
    """``max_pool2d(relu(batch_norm2d(x, ...)), pool_kernel_size, ...)`` in one op.

    The BatchNorm arguments, statistics and running-stat updates are
    :func:`batch_norm2d`'s; the pool's are :func:`max_pool2d`'s, prefixed
    ``pool_``. The result equals the three separate ops bit for bit. On the cpu
    backend the (N, C, H, W) BatchNorm output is never written: each plane is
    normalised and pooled in cache, and the backward routes the pooled gradient
    by one byte per output; the other backends compose the separate ops.
    """
    return batch_norm2d_relu_max_pool2d_forward(
        x, running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked, pool_kernel_size, pool_stride, pool_padding, pool_dilation,
        pool_ceil_mode)[0]


@_tensor_aware
def batch_norm2d_relu_max_pool2d_backward(
    grad_out: Array,
    x: Array,
    weight: Array | None,
    bias: Array | None,
    mean: Array,
    var: Array,
    eps: float = 1e-5,
    training: bool = True,
    pool_kernel_size: Pair = 2,
    pool_stride: Pair | None = None,
    pool_padding: Pair = 0,
    pool_dilation: Pair = 1,
    pool_ceil_mode: bool = False,
    *,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
    argmax: Array | None = None,
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients ``(grad_x, grad_weight, grad_bias)`` of
    :func:`batch_norm2d_relu_max_pool2d` from ``grad_out`` (the pooled output's
    shape): :func:`batch_norm2d_relu_backward` of :func:`max_pool2d_backward`'s
    gradient. ``x``, ``weight``, ``bias`` are the forward's, ``mean``/``var``
    what :func:`batch_norm2d_relu_max_pool2d_forward` returned, ``argmax`` its
    codes (``return_argmax=True``; the cpu backend routes by them, else it
    recomputes them). None where ``output_mask`` says not needed."""
    return _backward("batch_norm2d_relu_max_pool2d_backward", grad_out, x, weight, bias, mean,
                     var, eps, training, output_mask,
                     (pool_kernel_size, pool_stride, pool_padding, pool_dilation,
                      pool_ceil_mode, argmax))
