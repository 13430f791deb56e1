"""The fused training step of the cpu backend: a whole step as a fixed sequence of
native calls, with no autograd graph.

For a model of the form ``[Conv2d -> ReLU -> MaxPool2d ->] Flatten -> Linear
(-> ReLU -> Linear)*`` (the ``seed`` preset), trained with cross-entropy and
SGD/Adam/AdamW (the pattern of :mod:`fastnn.training.cuda_step`, parsed by the
same :func:`~fastnn.training.cuda_step.parse_pattern`), :class:`CpuFusedStep`
runs forward, loss and backward as the kernels autograd would call, in the
same order on the same arrays, so parameters after any number of steps equal
the autograd path's bit for bit. What it drops is autograd's bookkeeping:
building and walking the graph, the Tensor wrappers, ``functional``'s argument
checks (done once, when the step is built) and the ``grad * 1.0`` of the loss.
On the seed model the time outside the kernels fell from 9-10% of the step to 4-5%.

The conv front runs ``conv2d_relu_max_pool2d`` with ``return_argmax``, so its
backward routes the gradient by the kept window codes instead of recomputing
the conv. The optimizer's own ``step()`` updates the parameters, so its state,
``state_dict`` and schedulers are those of the autograd path.

``FASTNN_FUSED_STEP=0`` selects the autograd path (as on the cuda backend).
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from fastnn.training.cuda_step import Unsupported, check_step, enabled

__all__ = ["CpuFusedStep", "cpu_step_for"]


class CpuFusedStep:
    """The fused step of ``model`` with ``opt`` on the cpu backend (see the module
    doc). Raises :class:`~fastnn.training.cuda_step.Unsupported` outside the pattern."""

    def __init__(self, model: Any, opt: Any) -> None:
        from fastnn.backends import get_backend

        try:
            self.ops = get_backend("cpu")
        except ImportError as exc:  # no native module: the NumPy reference runs instead
            raise Unsupported(f"the cpu backend is not built: {exc}") from exc
        self.conv, self.linears, params = check_step(model, opt)
        dtypes = {p.data.dtype for p in params}
        if len(dtypes) != 1 or dtypes.pop() not in (np.float32, np.float64) or not all(
            type(p.data) is np.ndarray and p.data.flags.c_contiguous for p in params
        ):
            raise Unsupported("the parameters are not C-contiguous NumPy arrays of one float dtype")
        self.model, self.opt, self.params = model, opt, params
        self.layers = list(model)
        self.dtype = params[0].data.dtype
        if self.conv is not None:
            c = self.conv[0]
            if c.in_channels != c.weight.data.shape[1]:
                raise Unsupported("grouped convs are not fused")

    def valid(self, x: Any, y: Any) -> bool:
        """Whether this step applies to the batch (x, y) now: the model is in train
        mode with the same layers and parameter dtype, x is a non-empty NumPy batch
        of that dtype and y NumPy integers. Anything else takes the autograd path,
        whose checks then say what is wrong."""
        if not (self.model.training and type(x) is np.ndarray and x.dtype == self.dtype
                and x.ndim == 4 and x.shape[0] > 0 and type(y) is np.ndarray
                and y.dtype.kind in "iu" and y.shape == (x.shape[0],)):
            return False
        if any(a is not b for a, b in zip(self.model, self.layers)) or len(
                self.model) != len(self.layers):
            return False
        if any(p.data.dtype != self.dtype or type(p.data) is not np.ndarray
               or not p.data.flags.c_contiguous or p._post_hooks for p in self.params):
            return False  # (gradient hooks run on the autograd path only)
        if self.conv is not None:
            c, k = self.conv
            kh, kw = c.kernel_size
            if x.shape[1] != c.in_channels or x.shape[2] - kh + 1 < k or x.shape[3] - kw + 1 < k:
                return False
        return True

    def run(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """One optimisation step on x (N, C, H, W) and int labels y (N,); returns the
        batch's mean loss as a 0-d array."""
        ops = self.ops
        x = np.ascontiguousarray(x)
        y = np.ascontiguousarray(y, dtype=np.int64)
        n = x.shape[0]
        codes = pooled = None
        if self.conv is not None:
            c, k = self.conv
            w = c.weight.data
            b = c.bias.data if c.bias is not None else None
            oh, ow = x.shape[2] - w.shape[2] + 1, x.shape[3] - w.shape[3] + 1
            pooled, codes = ops.conv2d_relu_max_pool2d(
                x, w, b, (1, 1), (0, 0), (1, 1), 1, (k, k), (k, k), (0, 0), (1, 1),
                (oh // k, ow // k), True)
            act = pooled.reshape(n, -1)
        else:
            act = x.reshape(n, -1)
        acts = [act]
        for lin, relu in self.linears:
            b = lin.bias.data if lin.bias is not None else None
            if relu:  # bias and ReLU in the GEMM's epilogue, as autograd's LinearReLU
                z = ops.linear_relu(act, lin.weight.data, b)
            else:
                z = ops.matmul(act, lin.weight.data, False, True)
                if b is not None:
                    z += b
            acts.append(z)
            act = z
        loss, g = ops.softmax_cross_entropy(act, y)
        grads: list[tuple[Any, Any]] = []
        for i in range(len(self.linears) - 1, -1, -1):
            lin, relu = self.linears[i]
            a_in, w = acts[i], lin.weight.data
            has_b = lin.bias is not None
            need_x = i > 0 or self.conv is not None  # the first layer's input is data
            if relu:  # g is the gradient at the ReLU's output; the mask is applied inside
                gx, gw, gb = ops.linear_relu_backward(g, a_in, w, acts[i + 1], need_x, True,
                                                      has_b)
            else:
                gx = ops.matmul(g, w, False, False) if need_x else None
                gw = ops.matmul(g, a_in, True, False)
                gb = g.sum(axis=0, dtype=g.dtype) if has_b else None
            grads.append((lin.weight, gw))
            if has_b:
                grads.append((lin.bias, gb))
            g = gx
        if self.conv is not None:
            c, k = self.conv
            b = c.bias.data if c.bias is not None else None
            _, gw, gb = ops.conv2d_relu_max_pool2d_backward(
                g.reshape(pooled.shape), x, c.weight.data, b, (1, 1), (0, 0), (1, 1), 1,
                (k, k), (k, k), (0, 0), (1, 1), False, True, b is not None, codes)
            grads.append((c.weight, gw))
            if b is not None:
                grads.append((c.bias, gb))
        for p, gr in grads:
            p.grad = gr
            p._owned_grad = None  # as autograd leaves a fresh gradient
        self.opt.step()
        return loss


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cpu_step_for(model: Any, opt: Any, x: Any, y: Any) -> CpuFusedStep | None:
    """The cached :class:`CpuFusedStep` of (model, opt), or None when it is disabled,
    another backend is forced or the model, optimizer or batch is outside it."""
    from fastnn.backends import forced_backend

    if not enabled() or forced_backend() not in (None, "cpu") or type(x) is not np.ndarray:
        return None
    entry = _CACHE.get(model)
    if entry is None or entry.opt is not opt:
        try:
            entry = CpuFusedStep(model, opt)
        except Unsupported:
            return None
        _CACHE[model] = entry
    return entry if entry.valid(x, y) else None
