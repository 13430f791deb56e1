"""conv2d and its backward."""

from __future__ import annotations

from fastnn.functional._args import (
    Array,
    Pair,
    _as_float_array,
    _batched,
    _check_alloc,
    _check_bias,
    _check_grad_out,
    _contig,
    _int,
    _pick_backend,
    _same_dtype,
    _tensor_aware,
    _xp,
)
from fastnn.geometry import conv_geometry

# --------------------------------------------------------------------------
# conv2d
# --------------------------------------------------------------------------


class _ConvArgs:
    """Validated conv2d geometry shared by forward and backward."""

    __slots__ = (
        "x", "weight", "unbatched", "stride", "padding", "dilation", "groups",
        "extra", "out_shape", "backend",
    )

    def __init__(self, op, x, weight, stride, padding, dilation, groups, extra_arrays=()):
        x = _as_float_array(x, op, "x")
        weight = _as_float_array(weight, op, "weight")
        _same_dtype(op, x, "x", weight, "weight")
        x, self.unbatched = _batched(x, op)
        if weight.ndim != 4:
            raise ValueError(
                f"{op}: weight must be 4-D (O, C/groups, KH, KW), got shape {tuple(weight.shape)}"
            )
        groups = _int(groups, op, "groups")
        if groups < 1:
            raise ValueError(f"{op}: groups must be positive, got {groups}")
        n, c, h, w = x.shape
        o, cg, kh, kw = weight.shape
        if c % groups:
            raise ValueError(f"{op}: input channels {c} are not divisible by groups={groups}")
        if o == 0:  # torch needs at least `groups` output channels
            raise ValueError(f"{op}: weight must have at least one output channel, got 0")
        if o % groups:
            raise ValueError(f"{op}: weight out-channels {o} not divisible by groups={groups}")
        if cg * groups != c:
            raise ValueError(
                f"{op}: x has {c} channels but weight expects {cg * groups} "
                f"(weight.shape[1]={cg} x groups={groups})"
            )
        g = conv_geometry(op, (h, w), (kh, kw), stride, padding, dilation)
        stride, pad, dilation, extra = g.stride, g.padding, g.dilation, g.extra
        oh, ow = g.out_hw
        if extra != (0, 0):
            xp = _xp(x)
            x = xp.pad(x, ((0, 0), (0, 0), (0, extra[0]), (0, extra[1])))
        self.x = _contig(x)
        self.weight = _contig(weight)
        self.stride, self.padding, self.dilation, self.groups = stride, pad, dilation, groups
        self.extra = extra
        self.out_shape = (n, o, oh, ow)
        _check_alloc(op, self.out_shape, x.dtype)
        self.backend = _pick_backend(op, [x, weight, *extra_arrays])

    def unbatch(self, a: Array) -> Array:
        return a[0] if self.unbatched else a


@_tensor_aware
def conv2d(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    stride: Pair = 1,
    padding: Pair | str = 0,
    dilation: Pair = 1,
    groups: int = 1,
) -> Array:
    """2-D convolution (cross-correlation), as ``torch.nn.functional.conv2d``.

    x (N, C, H, W) or (C, H, W); weight (O, C/groups, KH, KW); bias (O,) or None.
    Returns (N, O, OH, OW) with OH = (H + 2*pad - dil*(KH-1) - 1) // stride + 1.
    ``stride``, ``padding`` and ``dilation`` are an int or a tuple of one or two
    ints; ``padding`` may also be ``"same"`` (stride 1 only) or ``"valid"``. The
    accepted arguments are torch's (see :mod:`fastnn.geometry`).
    """
    a = _ConvArgs("conv2d", x, weight, stride, padding, dilation, groups)
    b = _check_bias("conv2d", bias, a.out_shape[1], a.x)
    xp = _xp(a.x)
    if 0 in a.out_shape or a.x.shape[1] == 0:
        y = xp.zeros(a.out_shape, dtype=a.x.dtype)
        if b is not None and y.size:
            y += b[None, :, None, None]
        return a.unbatch(y)
    y = a.backend.conv2d(a.x, a.weight, b, a.stride, a.padding, a.dilation, a.groups)
    return a.unbatch(y)


@_tensor_aware
def conv2d_backward(
    grad_out: Array,
    x: Array,
    weight: Array,
    stride: Pair = 1,
    padding: Pair | str = 0,
    dilation: Pair = 1,
    groups: int = 1,
    *,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients of :func:`conv2d` with respect to x, weight and bias.

    Returns ``(grad_x, grad_weight, grad_bias)``; an entry is None where
    ``output_mask`` is False (so the first layer can skip ``grad_x``).
    """
    op = "conv2d_backward"
    grad_out = _as_float_array(grad_out, op, "grad_out")
    a = _ConvArgs(op, x, weight, stride, padding, dilation, groups, extra_arrays=[grad_out])
    _same_dtype(op, a.x, "x", grad_out, "grad_out")
    gy = grad_out[None] if a.unbatched and grad_out.ndim == 3 else grad_out
    _check_grad_out(op, gy, a.out_shape)
    gy = _contig(gy)
    xp = _xp(a.x)
    need_x, need_w, need_b = output_mask
    n, c, hp, wp = a.x.shape
    kh, kw = a.weight.shape[2:]
    empty = gy.size == 0 or a.x.size == 0 or a.weight.size == 0
    gx = gw = gb = None
    if need_x:
        if empty:
            gx = xp.zeros(a.x.shape, dtype=a.x.dtype)
        else:
            gx = a.backend.conv2d_backward_input(
                gy, a.weight, (hp, wp), a.stride, a.padding, a.dilation, a.groups
            )
        if a.extra != (0, 0):
            gx = xp.ascontiguousarray(gx[:, :, : hp - a.extra[0], : wp - a.extra[1]])
        gx = a.unbatch(gx)
    if need_w:
        if empty:
            gw = xp.zeros(a.weight.shape, dtype=a.x.dtype)
        else:
            gw = a.backend.conv2d_backward_weight(
                gy, a.x, (kh, kw), a.stride, a.padding, a.dilation, a.groups
            )
    if need_b:
        gb = gy.sum(axis=(0, 2, 3), dtype=gy.dtype)
    return gx, gw, gb
