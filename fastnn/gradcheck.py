"""Finite-difference check of autograd gradients.

``gradcheck(fn, inputs)`` compares the gradients that ``backward`` produces with
central differences ``(f(x + eps) - f(x - eps)) / (2 eps)``, element by element,
for every input Tensor that requires grad. Outputs are contracted with a fixed
random cotangent ``v`` first (the check is on ``v^T J``), so one backward pass
and ``2 * numel`` forward passes suffice; for a random ``v`` a wrong Jacobian
entry shows up with probability 1.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fastnn._array import to_host
from fastnn.autograd import Tensor, no_grad

__all__ = ["GradcheckError", "gradcheck"]


class GradcheckError(AssertionError):
    """Analytical and numerical gradients disagree (or the check could not run)."""


def _outputs(out: Any) -> list[Tensor]:
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    for i, o in enumerate(outs):
        if not isinstance(o, Tensor):
            raise TypeError(f"gradcheck: output {i} of fn is {type(o).__name__}, not a Tensor")
    return outs


def _fail(msg: str, raise_exception: bool) -> bool:
    if raise_exception:
        raise GradcheckError(msg)
    import warnings

    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return False


def gradcheck(
    fn: Callable[..., Any],
    inputs: Sequence[Any],
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    *,
    raise_exception: bool = True,
    seed: int = 0,
) -> bool:
    """Check ``fn``'s autograd gradients against float64 central differences.

    ``fn(*inputs)`` must return a Tensor (or a tuple of Tensors). Every input
    that is a Tensor with ``requires_grad`` is checked and must be float64 (the
    differences are meaningless in float32); other inputs are passed through.
    An element passes when ``|analytic - numeric| <= atol + rtol * |numeric|``.

    Returns True when all elements pass. Otherwise raises :class:`GradcheckError`
    (or, with ``raise_exception=False``, warns and returns False) with a message
    naming the input, the worst element's index and both values. The inputs'
    data is restored and their ``.grad`` is left as it was before the call.
    """
    inputs = tuple(inputs)
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input is a Tensor with requires_grad=True")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise TypeError(
                f"gradcheck: input {i} has dtype {inputs[i].dtype}; use float64 inputs"
            )

    # Analytic v^T J through one backward pass, with the inputs' own grads saved.
    saved = [(inputs[i].grad, inputs[i]._owned_grad) for i in checked]
    for i in checked:
        inputs[i].zero_grad()
    outs = _outputs(fn(*inputs))
    rng = np.random.default_rng(seed)
    cotangents = []
    total = None
    for o in outs:
        v_host = rng.standard_normal(o.shape)
        xp = np if isinstance(o.data, np.ndarray) else __import__("cupy")
        v = xp.asarray(v_host, dtype=o.dtype)
        cotangents.append(v)
        if o.requires_grad:
            term = (o * v).sum()
            total = term if total is None else total + term
    analytic = []
    if total is not None:
        total.backward()
    for i in checked:
        g = inputs[i].grad
        if g is None:
            g = np.zeros(inputs[i].shape)
        elif tuple(g.shape) != inputs[i].shape:
            for i2, (g0, o0) in zip(checked, saved):
                inputs[i2].grad, inputs[i2]._owned_grad = g0, o0
            return _fail(
                f"gradcheck: input {i} got a gradient of shape {tuple(g.shape)}, "
                f"expected {inputs[i].shape}",
                raise_exception,
            )
        analytic.append(to_host(g).astype(np.float64))
    for i, (g0, o0) in zip(checked, saved):
        inputs[i].grad, inputs[i]._owned_grad = g0, o0

    def project() -> float:
        with no_grad():
            res = _outputs(fn(*inputs))
        return float(sum(float((r.data * v).sum()) for r, v in zip(res, cotangents)))

    # Numeric v^T J, one element at a time, perturbing the input's data in place.
    for k, i in enumerate(checked):
        data = inputs[i].data
        if not data.flags.c_contiguous:
            raise ValueError(f"gradcheck: input {i} must be C-contiguous (perturbed in place)")
        flat = data.reshape(-1)  # a view, so writing it perturbs the input
        numeric = np.empty(data.size)
        for j in range(data.size):
            orig = float(flat[j])
            flat[j] = orig + eps
            fp = project()
            flat[j] = orig - eps
            fm = project()
            flat[j] = orig
            numeric[j] = (fp - fm) / (2 * eps)
        a = analytic[k].reshape(-1)
        excess = np.abs(a - numeric) - (atol + rtol * np.abs(numeric))
        bad = ~(excess <= 0)  # NaN counts as a failure
        if bad.any():
            j = int(np.argmax(np.where(np.isnan(excess), np.inf, excess)))
            idx = np.unravel_index(j, data.shape) if data.ndim else ()
            return _fail(
                f"gradcheck: input {i} (shape {inputs[i].shape}): {int(bad.sum())} of "
                f"{data.size} elements differ; worst at index {tuple(int(t) for t in idx)}: "
                f"analytic {a[j]:.8g} vs numeric {numeric[j]:.8g} "
                f"(atol={atol}, rtol={rtol}, eps={eps})",
                raise_exception,
            )
    return True


class _CallableModule(types.ModuleType):
    """Importing this submodule rebinds ``fastnn.gradcheck`` from the function (which
    ``fastnn/__init__`` exports) to the module; making the module callable keeps
    ``fastnn.gradcheck(fn, inputs)`` working either way."""

    def __call__(self, *args: Any, **kwargs: Any) -> bool:
        return gradcheck(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
