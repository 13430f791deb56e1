"""The fused training step of the cuda backend: a whole step in 2L + 4 launches.

For a model of the form ``[Conv2d -> ReLU -> MaxPool2d ->] Flatten -> Linear
(-> ReLU -> Linear)*`` (the ``seed`` preset: L = 2 linear layers, eight
launches), trained with cross-entropy and SGD/Adam/AdamW, :class:`FusedStep`
replaces autograd's 30-odd launches and ~1 ms of Python per step by a plan
built once per batch size: static buffers, :class:`~fastnn.backends._cuda.
launch.BoundLaunch` objects for the kernels of :mod:`fastnn.backends._cuda.
fused`, gradients written straight into the optimizer's flat gradient buffer
(:mod:`fastnn.optim.flat`) and one multi-tensor optimizer launch.

Launches per step: conv+bias+ReLU+pool (reading the uint8 batch through the
loader's normalisation table when the batch comes from a DataLoader), one
linear(+bias+ReLU) per layer, softmax-CE with its gradient and the epoch's
loss sum, one backward per linear layer (dx with the ReLU mask, dw, db), the
conv's weight/bias gradient through the pool's argmax, the optimizer. The
batch's indices (or images and labels) are copied into static buffers by
one or two device-to-device copies, so the same launches replay every step:
that is what :mod:`fastnn.training.cuda_graph` captures.

Set ``FASTNN_FUSED_STEP=0`` to use the autograd path instead. Models or
optimizers outside that pattern (BatchNorm, Dropout, frozen parameters, mixed
dtypes, eval mode) always use autograd.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import numpy as np

from fastnn import nn, optim
from fastnn.geometry import as_pair

__all__ = ["FusedStep", "Unsupported", "check_step", "fused_step_for", "parse_pattern"]


class Unsupported(ValueError):
    """The model or optimizer is outside the fused step's pattern (the message says how)."""


def _pair(v: Any, default: Any = None) -> tuple[int, int]:
    return as_pair(default if v is None else v, "fused step", "size", 0)


def parse_pattern(model: Any) -> tuple[Any, list[tuple[Any, bool]]]:
    """(conv, pool kernel) or None, and [(Linear, followed by ReLU)], for a model of the
    fused steps' pattern (this module's and :mod:`fastnn.training.cpu_step`'s);
    raises :class:`Unsupported` otherwise."""
    if not isinstance(model, nn.Sequential):
        raise Unsupported("the model is not an nn.Sequential")
    layers = list(model)
    conv = None
    i = 0
    if layers and isinstance(layers[0], nn.Conv2d):
        c = layers[0]
        if not (len(layers) > 2 and isinstance(layers[1], nn.ReLU)
                and isinstance(layers[2], nn.MaxPool2d)):
            raise Unsupported("a conv must be followed by ReLU and MaxPool2d")
        p = layers[2]
        k = _pair(p.kernel_size)
        if (c.groups != 1 or c.stride != (1, 1) or c.padding not in ((0, 0), "valid")
                or c.dilation != (1, 1)):
            raise Unsupported("only stride-1, unpadded, undilated, ungrouped convs")
        if (k[0] != k[1] or _pair(p.stride, k) != k or _pair(p.padding) != (0, 0)
                or _pair(p.dilation) != (1, 1) or p.ceil_mode or p.return_indices):
            raise Unsupported("only square max pools with stride == kernel_size")
        conv = (c, k[0])
        i = 3
    if i >= len(layers) or not isinstance(layers[i], nn.Flatten) or layers[i].start_dim != 1 \
            or layers[i].end_dim != -1:
        raise Unsupported("expected Flatten() before the linear layers")
    i += 1
    linears = []
    while i < len(layers):
        lin = layers[i]
        if not isinstance(lin, nn.Linear):
            raise Unsupported(f"unsupported layer {type(lin).__name__}")
        relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
        linears.append((lin, relu))
        i += 2 if relu else 1
    if not linears or linears[-1][1]:
        raise Unsupported("the model must end in a Linear layer (the logits)")
    return conv, linears


def check_step(model: Any, opt: Any) -> tuple[Any, list[tuple[Any, bool]], list[Any]]:
    """(conv, linears, parameters) of a model and optimizer that a fused step (this
    module's or :mod:`fastnn.training.cpu_step`'s) can run: the layer pattern of
    :func:`parse_pattern`, SGD/Adam/AdamW holding exactly the model's parameters,
    train mode, every parameter trainable. Raises :class:`Unsupported` otherwise."""
    if type(opt) not in (optim.SGD, optim.Adam, optim.AdamW):
        raise Unsupported(f"optimizer {type(opt).__name__} is not SGD, Adam or AdamW")
    conv, linears = parse_pattern(model)
    if not model.training:
        raise Unsupported("the model is in eval mode")
    params = list(model.parameters())
    if {id(p) for p in params} != {id(p) for p in opt._all_params()}:
        raise Unsupported("the optimizer does not hold exactly the model's parameters")
    if not all(p.requires_grad for p in params):
        raise Unsupported("a parameter does not require grad")
    return conv, linears, params


class _Plan:
    """Static buffers and bound launches for one batch size and input mode."""

    def __init__(self, step: FusedStep, n: int, in_shape: tuple[int, ...], gather: bool) -> None:
        from fastnn.backends._cuda import fused as K
        from fastnn.backends._cuda.gemm import numba_type

        rt, xp, dt = step.rt, step.rt.xp, step.dtype
        T = numba_type(dt)
        views = step.layout.views
        self.n, self.gather = n, gather
        self.idx = xp.zeros(n, np.int64)
        self.y = xp.zeros(n, np.int64)
        self.x = None if gather else xp.zeros((n, *in_shape), dt)
        fwd: list[Any] = []
        bwd: list[Any] = []
        lut = step.lut if gather else xp.zeros(1, dt)
        src = step.images.reshape(-1) if gather else self.x.reshape(-1)
        act = None  # the current activation, flat
        act_relu = False
        if step.conv is not None:
            c, pk = step.conv
            ci, h, w = (1, *step.images.shape[1:]) if gather else in_shape
            kh, kw = c.kernel_size
            co = c.out_channels
            ph, pw = (h - kh + 1) // pk, (w - kw + 1) // pk
            out = xp.empty(n * co * ph * pw, dt)
            arg = xp.empty(n * co * ph * pw, np.int32)
            has_b = c.bias is not None
            wv = views[c.weight][0].reshape(-1)
            bv = views[c.bias][0].reshape(-1) if has_b else wv
            kern = K.conv_pool_fwd(T, gather, has_b, ci, kh, kw, pk)
            fwd.append(rt.bind(kern, (max(1, min(-(-out.size // 256), 32 * rt.num_sms)),), 256,
                               src, self.idx, lut, wv, bv, out, arg,
                               n, co, h, w, ph, pw))
            self.conv_out = out
            dout = xp.empty_like(out)
            gw = views[c.weight][1].reshape(-1)
            gb = views[c.bias][1].reshape(-1) if has_b else xp.empty(co, dt)
            kern = K.conv_pool_bwd(T, gather, has_b, ci, kh, kw, pk)
            conv_bwd = rt.bind(kern, (co, ci * kh * kw + (1 if has_b else 0)),
                               K.REDUCE_THREADS, src, self.idx, lut, dout, out, arg, gw, gb,
                               n, co, h, w, ph, pw)
            act, act_relu, act_grad = out, True, dout
        else:
            conv_bwd = None
            act, act_grad = self.x.reshape(-1), None
            if gather:
                raise Unsupported("uint8 batches need a conv front")
        tile = (K.TILE, K.TILE)
        for lin, relu in step.linears:
            o, k = lin.out_features, lin.in_features
            has_b = lin.bias is not None
            wv = views[lin.weight][0].reshape(-1)
            bv = views[lin.bias][0].reshape(-1) if has_b else wv
            y = xp.empty(n * o, dt)
            fwd.append(rt.bind(K.linear_fwd(T, has_b, relu), (K.gemm_tiles(n, o),), tile,
                               act, wv, bv, y, n, o, k))
            need_dx = act_grad is not None
            dy = xp.empty(n * o, dt)
            gw = views[lin.weight][1].reshape(-1)
            gb = views[lin.bias][1].reshape(-1) if has_b else xp.empty(o, dt)
            dx = act_grad if need_dx else xp.empty(1, dt)
            grid = K.linear_bwd_blocks(n, o, k, need_dx, has_b)
            bwd.append(rt.bind(K.linear_bwd(T, need_dx, act_relu, has_b), (grid,), tile,
                               dy, act, wv, dx, gw, gb, n, o, k))
            act, act_relu, act_grad = y, relu, dy
        self.logits = act
        self.loss = xp.empty(1, dt)
        labels = step.labels if gather else self.y
        self.ce = rt.bind(K.softmax_ce(T, gather), (1,), K.REDUCE_THREADS, act, labels,
                          self.idx, act_grad, self.loss, step.loss_acc, n,
                          step.linears[-1][0].out_features)
        bwd.reverse()
        if conv_bwd is not None:
            bwd.append(conv_bwd)
        self.launches = (*fwd, self.ce, *bwd)


class FusedStep:
    """The fused step of ``model`` with ``opt`` on the cuda backend (see the module doc).

    ``loader``: when given, :meth:`run_indices` trains on its batches straight
    from the uint8 dataset. Raises :class:`Unsupported` outside the pattern.
    """

    def __init__(self, model: Any, opt: Any, loader: Any = None) -> None:
        from fastnn.backends._cuda.launch import runtime

        self.conv, self.linears, params = check_step(model, opt)
        self.rt = runtime()
        layout = opt.flat_layout()
        if layout is None:
            raise Unsupported("the parameters cannot share one flat buffer")
        self.model, self.opt, self.layout = model, opt, layout
        self.dtype = layout.dtype
        self.params = params
        self.grads = [(p, layout.views[p][1]) for p in params]
        self.loss_acc = self.rt.xp.zeros(2, np.float64)
        self.images = self.labels = self.lut = None
        if loader is not None and self.conv is not None and self.conv[0].in_channels == 1:
            self.images, self.labels, self.lut = loader._images, loader._labels, loader._lut
            if self.lut.dtype != self.dtype:
                self.lut = self.lut.astype(self.dtype)
        self._plans: dict[tuple, _Plan] = {}

    def valid(self) -> bool:
        """Whether the plans still describe the model and optimizer (no rebuild of the
        flat layout, no mode change)."""
        return (self.opt.__dict__.get("_flat") is self.layout and self.model.training
                and not any(p._post_hooks for p in self.params))  # hooks need autograd

    def plan(self, n: int, in_shape: tuple[int, ...], gather: bool) -> _Plan:
        key = (n, in_shape, gather)
        p = self._plans.get(key)
        if p is None:
            p = self._plans[key] = _Plan(self, n, in_shape, gather)
        return p

    def launch(self, plan: _Plan) -> None:
        """The plan's kernels, then the optimizer (its multi-tensor launch)."""
        for f in plan.launches:
            f()
        for p, g in self.grads:
            p.grad = g
        self.opt.step()

    def run(self, x: Any, y: Any) -> Any:
        """One step on float batch ``x`` (N, C, H, W) and labels ``y`` (N,); returns
        the batch's mean loss as a new 0-d device array."""
        plan = self.plan(x.shape[0], tuple(x.shape[1:]), False)
        copy = self.rt.copy_into
        copy(plan.x, x if x.dtype == self.dtype else x.astype(self.dtype))
        copy(plan.y, y if y.dtype == np.int64 else y.astype(np.int64))
        self.launch(plan)
        loss = self.rt.xp.empty((), self.dtype)
        copy(loss, plan.loss.reshape(()))
        return loss

    def run_indices(self, idx: Any) -> None:
        """One step on the loader's rows ``idx`` (int64, N); the loss goes to
        :attr:`loss_acc` (sum of row losses, rows)."""
        plan = self.plan(idx.shape[0], (), True)
        self.rt.copy_into(plan.idx, idx)
        self.launch(plan)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def enabled() -> bool:
    """False when ``FASTNN_FUSED_STEP=0`` asks for the autograd path."""
    return os.environ.get("FASTNN_FUSED_STEP", "1") != "0"


def fused_step_for(model: Any, opt: Any, loader: Any = None) -> FusedStep | None:
    """The cached :class:`FusedStep` of (model, opt[, loader]), or None when the cuda
    backend is not in use, it is disabled, or the model/optimizer are outside it."""
    from fastnn.optim import flat

    if not enabled() or not flat.wanted(next(iter(model.parameters())).data):
        return None
    entry = _CACHE.get(model)
    if entry is not None and entry.opt is opt and entry.valid() and (
            loader is None or entry.images is loader._images):
        return entry
    try:
        entry = FusedStep(model, opt, loader)
    except Unsupported:
        return None
    _CACHE[model] = entry
    return entry
