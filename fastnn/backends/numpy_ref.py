"""The NumPy reference backend: the oracle every other backend is tested against.

Plain, vectorized NumPy with torch.nn.functional semantics. Clarity beats speed
here, but the heavy ops go through BLAS (im2col + matmul) so the backend can
also train MNIST (``--device numpy``) in reasonable time.

The op contract (names, argument order, what ``fastnn.functional`` has already
validated) is :class:`fastnn.backends.contract.Backend`. In short: arrays are
C-contiguous float32/float64, images NCHW, conv weights OIHW, geometry
arguments are pairs of Python ints, padding is symmetric and N may be 0. Every
op returns a new C-contiguous array of the input's dtype; the optimizer steps
work in place and return None.
"""

from __future__ import annotations

import sys

import numpy as np

from fastnn.backends import _composed

# Elementwise ops, losses, dropout, BatchNorm and the optimizer steps are written
# once for NumPy and CuPy (cuda runs some of them too): see _array_ops.
from fastnn.backends._array_ops import (
    adam_step,
    batch_norm2d,
    batch_norm2d_backward,
    dropout_masked,
    log_softmax,
    log_softmax_backward,
    lookup_u8,
    mse_loss,
    mse_loss_backward,
    relu,
    relu_backward,
    sgd_step,
    sigmoid,
    sigmoid_backward,
    softmax_cross_entropy,
    tanh,
    tanh_backward,
)
from fastnn.backends._array_ops import fresh as _out
from fastnn.geometry import conv_out_size

Pair = tuple[int, int]

__all__ = [
    "adam_step",
    "adam_step_multi",
    "avg_pool2d",
    "avg_pool2d_backward",
    "batch_norm2d",
    "batch_norm2d_backward",
    "batch_norm2d_relu",
    "batch_norm2d_relu_backward",
    "batch_norm2d_relu_max_pool2d",
    "batch_norm2d_relu_max_pool2d_backward",
    "conv2d",
    "conv2d_backward_input",
    "conv2d_backward_weight",
    "conv2d_relu_max_pool2d",
    "conv2d_relu_max_pool2d_backward",
    "dropout_masked",
    "is_available",
    "linear_relu",
    "linear_relu_backward",
    "log_softmax",
    "log_softmax_backward",
    "lookup_u8",
    "matmul",
    "max_pool2d",
    "max_pool2d_backward",
    "max_pool2d_with_indices",
    "mse_loss",
    "mse_loss_backward",
    "relu",
    "relu_backward",
    "sgd_step",
    "sgd_step_multi",
    "sigmoid",
    "sigmoid_backward",
    "softmax_cross_entropy",
    "tanh",
    "tanh_backward",
]


def is_available() -> bool:
    """The reference backend runs wherever NumPy does."""
    return True


# --------------------------------------------------------------------------- #
# Window helpers shared by conv and pooling
# --------------------------------------------------------------------------- #


def _tap(i: int, d: int, s: int, n_out: int) -> slice:
    """Rows (or columns) of a padded input read by kernel tap ``i``.

    Output position ``o`` reads padded row ``o*s + i*d``, so for all ``n_out``
    outputs that is a strided slice starting at ``i*d``.
    """
    start = i * d
    return slice(start, start + s * (n_out - 1) + 1, s)


def _pad_hw(x: np.ndarray, pad_h: Pair, pad_w: Pair, value: float) -> np.ndarray:
    """Pad the last two axes by ((top, bottom), (left, right)) with ``value``."""
    widths = [(0, 0)] * (x.ndim - 2) + [pad_h, pad_w]
    return np.pad(x, widths, mode="constant", constant_values=value)


def _windows(
    xp: np.ndarray, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair
) -> np.ndarray:
    """Gather every window of the padded input ``xp`` (N, C, Hp, Wp).

    Returns (KH*KW, N, C, OH, OW): entry k holds, for every window, its cell
    at tap (i, j) = divmod(k, KW), i.e. cells in row-major window order, which
    the max-pool tie rule and the im2col column order rely on. Taps lead so
    that reducing over them is elementwise work on contiguous blocks. ``xp``
    must be large enough for all ``out_hw`` windows.
    """
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, stride, dilation, out_hw
    n, c = xp.shape[:2]
    cols = np.empty((kh * kw, n, c, oh, ow), dtype=xp.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[i * kw + j] = xp[:, :, _tap(i, dh, sh, oh), _tap(j, dw, sw, ow)]
    return cols


def _scatter_windows(
    cols: np.ndarray, padded_hw: Pair, kernel: Pair, stride: Pair, dilation: Pair
) -> np.ndarray:
    """Adjoint of :func:`_windows`: sum (KH*KW, N, C, OH, OW) back into (N, C, Hp, Wp).

    Overlapping windows accumulate, so this is col2im.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    _, n, c, oh, ow = cols.shape
    out = np.zeros((n, c) + tuple(padded_hw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, :, _tap(i, dh, sh, oh), _tap(j, dw, sw, ow)] += cols[i * kw + j]
    return out


def _pool_padding(size: int, k: int, s: int, p: int, d: int, n_out: int) -> Pair:
    """(before, after) padding so that ``n_out`` windows fit.

    With ceil_mode the last window may run past the symmetric padding; extra
    cells are added after it (and are excluded from max / divisors by the
    callers).
    """
    needed = (n_out - 1) * s + d * (k - 1) + 1
    return p, max(p, needed - size - p)


# --------------------------------------------------------------------------- #
# conv2d
# --------------------------------------------------------------------------- #


def _conv_columns(
    x: np.ndarray, kernel_hw: Pair, stride: Pair, padding: Pair, dilation: Pair,
    groups: int, out_hw: Pair,
) -> np.ndarray:
    """im2col of x (N, C, H, W) -> (G, N*OH*OW, C/G*KH*KW).

    Column order within a row is (c, kh, kw), matching a reshaped OIHW weight.
    """
    n, c = x.shape[:2]
    (ph, pw), (oh, ow) = padding, out_hw
    kh, kw = kernel_hw
    xp = _pad_hw(x, (ph, ph), (pw, pw), 0)
    cols = _windows(xp, kernel_hw, stride, dilation, out_hw)  # (KH*KW, N, C, OH, OW)
    cg = c // groups
    cols = cols.reshape(kh * kw, n, groups, cg, oh, ow)
    cols = cols.transpose(2, 1, 4, 5, 3, 0)  # (G, N, OH, OW, Cg, KH*KW)
    return cols.reshape(groups, n * oh * ow, cg * kh * kw)


def _grad_rows(grad_out: np.ndarray, groups: int) -> np.ndarray:
    """grad_out (N, O, OH, OW) -> (G, N*OH*OW, O/G), the layout of conv's GEMM output."""
    n, o, oh, ow = grad_out.shape
    g = grad_out.reshape(n, groups, o // groups, oh, ow).transpose(1, 0, 3, 4, 2)
    return g.reshape(groups, n * oh * ow, o // groups)


def conv2d(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> np.ndarray:
    """2-D cross-correlation, like ``torch.nn.functional.conv2d``.

    x (N, C, H, W), weight (O, C/groups, KH, KW), bias (O,) or None
    -> y (N, O, OH, OW), OH = (H + 2*ph - dh*(KH-1) - 1) // sh + 1 (same for W).
    """
    n, _, h, w = x.shape
    o, cg, kh, kw = weight.shape
    oh = conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    cols = _conv_columns(x, (kh, kw), stride, padding, dilation, groups, (oh, ow))
    wmat = weight.reshape(groups, o // groups, cg * kh * kw)
    y = cols @ wmat.transpose(0, 2, 1)  # (G, N*OH*OW, O/G)
    y = y.reshape(groups, n, oh, ow, o // groups).transpose(1, 0, 4, 2, 3)
    y = y.reshape(n, o, oh, ow)
    if bias is not None:
        # Cast so a float64 bias cannot promote a float32 result.
        y = y + bias.astype(x.dtype, copy=False).reshape(1, o, 1, 1)
    return _out(y, x.dtype)


def conv2d_backward_input(
    grad_out: np.ndarray, weight: np.ndarray, input_hw: Pair,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> np.ndarray:
    """Gradient of conv2d with respect to x.

    grad_out (N, O, OH, OW), weight (O, C/groups, KH, KW) -> grad_x (N, C, H, W).
    Input rows/columns that no window reaches (floor mode) get zero.
    """
    n, o, oh, ow = grad_out.shape
    _, cg, kh, kw = weight.shape
    h, w = input_hw
    ph, pw = padding
    wmat = weight.reshape(groups, o // groups, cg * kh * kw)
    cols = _grad_rows(grad_out, groups) @ wmat  # (G, N*OH*OW, Cg*KH*KW)
    cols = cols.reshape(groups, n, oh, ow, cg, kh * kw).transpose(5, 1, 0, 4, 2, 3)
    cols = cols.reshape(kh * kw, n, groups * cg, oh, ow)
    gxp = _scatter_windows(cols, (h + 2 * ph, w + 2 * pw), (kh, kw), stride, dilation)
    return _out(gxp[:, :, ph:ph + h, pw:pw + w], grad_out.dtype)


def conv2d_backward_weight(
    grad_out: np.ndarray, x: np.ndarray, kernel_hw: Pair,
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> np.ndarray:
    """Gradient of conv2d with respect to the weight.

    grad_out (N, O, OH, OW), x (N, C, H, W) -> grad_w (O, C/groups, KH, KW).
    (The bias gradient is grad_out.sum((0, 2, 3)); functional computes it.)
    """
    _, o, oh, ow = grad_out.shape
    c = x.shape[1]
    kh, kw = kernel_hw
    cols = _conv_columns(x, kernel_hw, stride, padding, dilation, groups, (oh, ow))
    gw = _grad_rows(grad_out, groups).transpose(0, 2, 1) @ cols  # (G, O/G, Cg*KH*KW)
    return _out(gw.reshape(o, c // groups, kh, kw), x.dtype)


# --------------------------------------------------------------------------- #
# matmul
# --------------------------------------------------------------------------- #


def matmul(
    a: np.ndarray, b: np.ndarray, transpose_a: bool = False, transpose_b: bool = False
) -> np.ndarray:
    """op(a) @ op(b) for 2-D (M,K)@(K,N) or batched 3-D (B,M,K)@(B,K,N).

    With transpose_a, ``a`` is stored (K, M) (or (B, K, M)); with transpose_b,
    ``b`` is stored (N, K) (or (B, N, K)). K = 0 gives zeros.
    """
    opa = a.swapaxes(-1, -2) if transpose_a else a
    opb = b.swapaxes(-1, -2) if transpose_b else b
    return _out(np.matmul(opa, opb), a.dtype)


# --------------------------------------------------------------------------- #
# max_pool2d
# --------------------------------------------------------------------------- #


def _max_windows(
    x: np.ndarray, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair,
    out_hw: Pair,
) -> tuple[np.ndarray, np.ndarray, Pair, Pair]:
    """Max-pool windows of x and which of their cells are real input.

    Returns (cols, valid, pad_h, pad_w): cols (KH*KW, N, C, OH, OW) with -inf
    in padded cells, valid (KH*KW, 1, 1, OH, OW) bool (True for real input
    cells), and the (before, after) padding used on each axis.
    """
    h, w = x.shape[2:]
    pad_h = _pool_padding(h, kernel_size[0], stride[0], padding[0], dilation[0], out_hw[0])
    pad_w = _pool_padding(w, kernel_size[1], stride[1], padding[1], dilation[1], out_hw[1])
    xp = _pad_hw(x, pad_h, pad_w, -np.inf)
    cols = _windows(xp, kernel_size, stride, dilation, out_hw)
    # A -inf input and a -inf pad cell compare equal, so real-ness is tracked
    # separately: padded cells must never win, even in an all -inf window.
    real = _pad_hw(np.ones((1, 1, h, w), dtype=bool), pad_h, pad_w, False)
    valid = _windows(real, kernel_size, stride, dilation, out_hw)
    return cols, valid, pad_h, pad_w


def max_pool2d(
    x: np.ndarray, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair,
    out_hw: Pair,
) -> np.ndarray:
    """Max pooling, like ``torch.nn.functional.max_pool2d``.

    x (N, C, H, W) -> y (N, C, OH, OW) with (OH, OW) = out_hw (ceil_mode already
    applied). Padded cells and cells past the input never win; a window that
    holds a NaN outputs NaN. A window with no real cell outputs -inf.
    """
    cols, _, _, _ = _max_windows(x, kernel_size, stride, padding, dilation, out_hw)
    # np.max propagates NaN, which is torch's rule; padded cells are -inf.
    return _out(cols.max(axis=0), x.dtype)


def _max_winner_mask(cols: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """One-hot (KH*KW, N, C, OH, OW) mask of each window's winning cell, torch's rule.

    torch scans a window in row-major order and lets a real cell win when it is
    greater than the running max or is NaN: the winner is the first maximum,
    or the last NaN if the window holds any. A window with no real cell has no
    winner (all False).
    """
    m = cols.max(axis=0)
    winner = np.zeros(cols.shape, dtype=bool)
    taken = np.isnan(m)  # NaN windows are settled by the second loop
    for k in range(cols.shape[0]):
        hit = (cols[k] == m) & valid[k] & ~taken
        winner[k] = hit
        taken |= hit
    taken = ~np.isnan(m)
    for k in reversed(range(cols.shape[0])):
        hit = np.isnan(cols[k]) & valid[k] & ~taken
        winner[k] |= hit
        taken |= hit
    return winner


def max_pool2d_with_indices(
    x: np.ndarray, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair,
    out_hw: Pair,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`max_pool2d` and where each window's winner is.

    x (N, C, H, W) -> (y, indices), both (N, C, OH, OW); indices are int64 flat
    indices h*W + w into each input plane of the window's winner (the first
    maximum, or the last NaN). A window with no real cell (possible with
    ceil_mode or dilation) outputs -inf and torch's index for it: that of its
    first tap at or after the plane's top-left corner, which lies outside the plane.
    """
    w = x.shape[3]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    cols, valid, _, _ = _max_windows(x, kernel_size, stride, padding, dilation, out_hw)
    winner = _max_winner_mask(cols, valid)
    h0 = np.arange(out_hw[0], dtype=np.int64) * sh - ph  # window starts
    w0 = np.arange(out_hw[1], dtype=np.int64) * sw - pw
    tap_h = h0[None, :] + dh * np.arange(kh)[:, None]  # (KH, OH): input row of tap i
    tap_w = w0[None, :] + dw * np.arange(kw)[:, None]  # (KW, OW)
    flat = tap_h[:, None, :, None] * w + tap_w[None, :, None, :]  # (KH, KW, OH, OW)
    idx = (winner * flat.reshape(kh * kw, 1, 1, *out_hw)).sum(axis=0)
    first_h = h0 + dh * np.maximum(0, -(h0 // dh))
    first_w = w0 + dw * np.maximum(0, -(w0 // dw))
    idx = np.where(winner.any(axis=0), idx, first_h[:, None] * w + first_w[None, :])
    return _out(cols.max(axis=0), x.dtype), _out(idx, np.dtype(np.int64))


def max_pool2d_backward(
    grad_out: np.ndarray, x: np.ndarray, kernel_size: Pair, stride: Pair,
    padding: Pair, dilation: Pair,
) -> np.ndarray:
    """Gradient of max_pool2d with respect to x.

    grad_out (N, C, OH, OW), x (N, C, H, W) -> grad_x (N, C, H, W). The argmax
    is recomputed from x; each window's gradient goes to its winner (the first
    maximum in row-major window order, or the last NaN if it holds any: torch's
    rule), and overlapping windows accumulate.
    """
    h, w = x.shape[2:]
    out_hw = grad_out.shape[2:]
    cols, valid, pad_h, pad_w = _max_windows(x, kernel_size, stride, padding, dilation, out_hw)
    winner = _max_winner_mask(cols, valid)
    gcols = np.where(winner, grad_out, grad_out.dtype.type(0))
    padded_hw = (h + sum(pad_h), w + sum(pad_w))
    gxp = _scatter_windows(gcols, padded_hw, kernel_size, stride, dilation)
    return _out(gxp[:, :, pad_h[0]:pad_h[0] + h, pad_w[0]:pad_w[0] + w], x.dtype)


# --------------------------------------------------------------------------- #
# avg_pool2d
# --------------------------------------------------------------------------- #


def _avg_divisor(
    input_hw: Pair, kernel_size: Pair, stride: Pair, padding: Pair, out_hw: Pair,
    count_include_pad: bool, divisor_override: int | None,
) -> np.ndarray:
    """The divisor of every output cell, (OH, OW) float64, torch's rule.

    For a window starting at h0 = oh*sh - ph: with count_include_pad the size
    clipped to the padded input, (min(h0+kh, H+ph) - h0) * (same for w); without
    it, the number of real input cells. divisor_override replaces both. A zero
    count (a window with no real cell) is returned as 0; the caller outputs 0.
    """

    def spans(size: int, k: int, s: int, p: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
        start = np.arange(n_out) * s - p
        end = np.minimum(start + k, size + p)
        padded = end - start
        real = np.minimum(end, size) - np.maximum(start, 0)
        return padded, np.maximum(real, 0)

    pad_h, real_h = spans(input_hw[0], kernel_size[0], stride[0], padding[0], out_hw[0])
    pad_w, real_w = spans(input_hw[1], kernel_size[1], stride[1], padding[1], out_hw[1])
    real = np.outer(real_h, real_w).astype(np.float64)
    if divisor_override is not None:
        div = np.full(real.shape, float(divisor_override))
    elif count_include_pad:
        div = np.outer(pad_h, pad_w).astype(np.float64)
    else:
        div = real
    # torch writes 0 for a window that covers no input cell at all.
    return np.where(real > 0, div, 0.0)


def _avg_scale(divisor: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """1/divisor in ``dtype``, 0 where the divisor is 0 (no real cell)."""
    with np.errstate(divide="ignore"):
        scale = np.where(divisor != 0, 1.0 / divisor, 0.0)
    return scale.astype(dtype)


def avg_pool2d(
    x: np.ndarray, kernel_size: Pair, stride: Pair, padding: Pair, out_hw: Pair,
    count_include_pad: bool, divisor_override: int | None,
) -> np.ndarray:
    """Average pooling, like ``torch.nn.functional.avg_pool2d``.

    x (N, C, H, W) -> y (N, C, OH, OW) with (OH, OW) = out_hw (ceil_mode already
    applied). Each window's sum of real cells is divided by the divisor of
    :func:`_avg_divisor`.
    """
    h, w = x.shape[2:]
    pad_h = _pool_padding(h, kernel_size[0], stride[0], padding[0], 1, out_hw[0])
    pad_w = _pool_padding(w, kernel_size[1], stride[1], padding[1], 1, out_hw[1])
    cols = _windows(_pad_hw(x, pad_h, pad_w, 0), kernel_size, stride, (1, 1), out_hw)
    divisor = _avg_divisor(
        (h, w), kernel_size, stride, padding, out_hw, count_include_pad, divisor_override
    )
    # Divide (not multiply by 1/d) so the result is correctly rounded like torch's.
    with np.errstate(invalid="ignore", divide="ignore"):
        y = cols.sum(axis=0) / divisor.astype(x.dtype)
    y = np.where(divisor != 0, y, x.dtype.type(0))
    return _out(y, x.dtype)


def avg_pool2d_backward(
    grad_out: np.ndarray, input_hw: Pair, kernel_size: Pair, stride: Pair, padding: Pair,
    count_include_pad: bool, divisor_override: int | None,
) -> np.ndarray:
    """Gradient of avg_pool2d with respect to x.

    grad_out (N, C, OH, OW) -> grad_x (N, C, H, W): each window spreads
    grad/divisor over its real cells; overlapping windows accumulate.
    """
    h, w = input_hw
    out_hw = grad_out.shape[2:]
    pad_h = _pool_padding(h, kernel_size[0], stride[0], padding[0], 1, out_hw[0])
    pad_w = _pool_padding(w, kernel_size[1], stride[1], padding[1], 1, out_hw[1])
    divisor = _avg_divisor(
        (h, w), kernel_size, stride, padding, out_hw, count_include_pad, divisor_override
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        share = grad_out / divisor.astype(grad_out.dtype)
    share = np.where(divisor != 0, share, grad_out.dtype.type(0))
    kk = kernel_size[0] * kernel_size[1]
    gcols = np.broadcast_to(share, (kk,) + share.shape)
    padded_hw = (h + sum(pad_h), w + sum(pad_w))
    gxp = _scatter_windows(gcols, padded_hw, kernel_size, stride, (1, 1))
    return _out(gxp[:, :, pad_h[0]:pad_h[0] + h, pad_w[0]:pad_w[0] + w], grad_out.dtype)


# --------------------------------------------------------------------------
# fused conv2d + ReLU + max_pool2d (composed from the ops above)
# --------------------------------------------------------------------------


# Composed from the ops above, as numpy_ref and cuda share it (see _composed).
conv2d_relu_max_pool2d, conv2d_relu_max_pool2d_backward = _composed.fused_conv_relu_pool(
    sys.modules[__name__]
)
batch_norm2d_relu, batch_norm2d_relu_backward = _composed.fused_bn_relu(sys.modules[__name__])
batch_norm2d_relu_max_pool2d, batch_norm2d_relu_max_pool2d_backward = (
    _composed.fused_bn_relu_pool(sys.modules[__name__])
)
linear_relu, linear_relu_backward = _composed.fused_linear_relu(sys.modules[__name__])
sgd_step_multi, adam_step_multi = _composed.multi_steps(sys.modules[__name__])
