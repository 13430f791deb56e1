"""``torch.optim.Adam`` and ``AdamW`` whose step runs fastnn's native Adam kernel.

Drop-ins: subclasses of torch's classes with the same constructor, param groups,
hooks and ``state_dict`` (``step`` a CPU scalar tensor, ``exp_avg``,
``exp_avg_sq``), so a checkpoint, an LR scheduler or ``isinstance`` checks work
with either, and state moves between the two classes in both directions.

Why: on the CPU torch's Adam makes seven passes over every parameter (lerp, mul,
addcmul, sqrt, div, add, addcdiv), each a separate op that wakes torch's thread
pool; fastnn's ``adam_step`` is one pass on fastnn's pool. In a model accelerated
by :func:`fastnn.torch.accelerate` that also keeps the step on one thread pool
(two pools that each think they own every core slow each other down).

The update is torch's math (L2 weight decay added to the gradient for Adam,
``p *= 1 - lr * weight_decay`` for AdamW / ``decoupled_weight_decay=True``;
bias corrections from the step count); results agree with torch's to float
rounding (the terms are summed in a different order). A group fastnn's kernel
does not cover (``amsgrad``, ``maximize``, ``capturable``, ``differentiable``,
``fused``, ``foreach=True``, a tensor ``lr`` or ``betas``, parameters that are
not float32/float64 contiguous CPU tensors, sparse or non-contiguous
gradients) runs torch's own step for that group: never a different answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

import fastnn.functional as F
from fastnn._config import park_threads

__all__ = ["Adam", "AdamW", "runs_on_fastnn_adam"]

_FLOATS = (torch.float32, torch.float64)
_TORCH_ONLY = ("amsgrad", "maximize", "capturable", "differentiable", "fused", "foreach")


def _dense_cpu(t: Tensor | None, dtype: torch.dtype) -> bool:
    return (t is not None and t.device.type == "cpu" and t.dtype == dtype
            and t.layout == torch.strided and t.is_contiguous())


def runs_on_fastnn_adam(group: dict[str, Any], state: Any = None) -> bool:
    """True when fastnn's kernel computes this param group's step as torch would, to
    float rounding (``state``: the optimizer's, to check existing per-parameter
    state too)."""
    if any(group.get(k) for k in _TORCH_ONLY):
        return False
    if isinstance(group["lr"], Tensor) or any(isinstance(b, Tensor) for b in group["betas"]):
        return False
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.dtype not in _FLOATS or not (_dense_cpu(p, p.dtype) and _dense_cpu(p.grad, p.dtype)):
            return False
        st = state.get(p) if state is not None else None
        if st and not (_dense_cpu(st.get("exp_avg"), p.dtype)
                       and _dense_cpu(st.get("exp_avg_sq"), p.dtype)
                       and isinstance(st.get("step"), Tensor) and st["step"].device.type == "cpu"):
            return False  # state loaded from elsewhere (another device or layout)
    return True


def _zeros_state(p: Tensor) -> dict[str, Tensor]:
    # torch.optim.Adam's own lazy state (non-capturable, non-fused): the step count
    # is a CPU tensor, float64 when that is torch's default dtype, else float32.
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return {
        "step": torch.tensor(0.0, dtype=step_dtype),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }


def _torch_adam_step(opt: torch.optim.Adam, groups: list[dict[str, Any]]) -> None:
    """torch's own Adam step over ``groups`` only (its step walks ``param_groups``)."""
    fn = torch.optim.Adam.step
    if getattr(fn, "hooked", False):
        fn = fn.__wrapped__  # the step hooks already ran around our step
    every = opt.param_groups
    opt.param_groups = groups
    try:
        fn(opt)
    finally:
        opt.param_groups = every


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` (same arguments and state) stepping on fastnn's kernel."""

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One Adam step; groups fastnn's kernel does not cover run torch's step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        left = []
        for group in self.param_groups:
            if runs_on_fastnn_adam(group, self.state):
                self._fastnn_group_step(group)
            else:
                left.append(group)
        if left:
            _torch_adam_step(self, left)
        # The step ends the training step: fastnn's workers sleep now rather than
        # poll on the cores the user's next torch op (the batch gather) needs.
        park_threads()
        return loss

    def _fastnn_group_step(self, group: dict[str, Any]) -> None:
        lr, (beta1, beta2) = float(group["lr"]), group["betas"]
        eps, wd = float(group["eps"]), float(group["weight_decay"])
        decoupled = bool(group.get("decoupled_weight_decay", False))
        todo = [p for p in group["params"] if p.grad is not None]
        for p in todo:
            if len(self.state[p]) == 0:
                self.state[p].update(_zeros_state(p))
        states = [self.state[p] for p in todo]
        # One call for the group: every entry is checked before any is updated.
        F.adam_step_multi([p.detach().numpy() for p in todo],
                          [p.grad.detach().numpy() for p in todo],
                          [st["exp_avg"].numpy() for st in states],
                          [st["exp_avg_sq"].numpy() for st in states],
                          [int(st["step"].item()) + 1 for st in states],
                          lr, float(beta1), float(beta2), eps, wd, decoupled)
        for p, st in zip(todo, states):
            st["step"] += 1
            # Written through NumPy views: tell autograd, as torch's in-place ops do.
            increment_version((p, st["exp_avg"], st["exp_avg_sq"]))


class AdamW(Adam, torch.optim.AdamW):
    """``torch.optim.AdamW`` (decoupled weight decay) stepping on fastnn's kernel."""
