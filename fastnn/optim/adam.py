"""Adam and AdamW (torch.optim.Adam / AdamW semantics, no amsgrad)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastnn import functional as F
from fastnn._array import array_module as _xp
from fastnn.optim.optimizer import Optimizer

__all__ = ["Adam", "AdamW"]


class Adam(Optimizer):
    """Adam with L2 weight decay added to the gradient (``g += wd * p``).

    State per parameter: ``step`` (int, from 1), ``exp_avg``, ``exp_avg_sq``.
    """

    _decoupled = False

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        name = type(self).__name__
        betas = group["betas"] = tuple(float(b) for b in group["betas"])
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"{name}: betas must be two numbers in [0, 1), got {betas!r}")
        if group["eps"] < 0:
            raise ValueError(f"{name}: eps must be >= 0, got {group['eps']!r}")
        if group["weight_decay"] < 0:
            raise ValueError(f"{name}: weight_decay must be >= 0, got {group['weight_decay']!r}")

    _flat_state = ("exp_avg", "exp_avg_sq")

    def _param_step(self, g: dict[str, Any]) -> None:
        params, grads, avgs, avg_sqs, steps, states = [], [], [], [], [], []
        for p in g["params"]:
            grad = p.grad
            if grad is None:
                continue
            st = self.state.get(p)
            if st is None:
                xp = _xp(p.data)
                st = self.state[p] = {
                    "step": 0,
                    "exp_avg": xp.zeros_like(p.data),
                    "exp_avg_sq": xp.zeros_like(p.data),
                }
            params.append(p.data)
            grads.append(grad)
            avgs.append(st["exp_avg"])
            avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"] + 1)
            states.append(st)
        # One call per group: the options are checked once, every array before any
        # update; the step counts advance only once it has run.
        F.adam_step_multi(params, grads, avgs, avg_sqs, steps, g["lr"], *g["betas"], g["eps"],
                          g["weight_decay"], self._decoupled)
        for st, step in zip(states, steps):
            st["step"] = step

    def _flat_group_step(self, layout: Any, grp: Any, g: dict[str, Any]) -> bool:
        state = self.state
        steps = {state[p]["step"] if p in state else 0 for p in grp.params}
        if len(steps) != 1:
            return False
        for p in grp.params:
            if p not in state:
                sv = layout.views[p][2]
                for v in sv.values():
                    v[...] = 0
                state[p] = {"step": 0, **sv}
        layout.sync_step(grp, steps.pop())
        lr, (b1, b2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
        layout.set_hyper(grp, (float(lr), b1, b2, float(eps), float(wd)))
        key = (wd != 0 and not self._decoupled, wd != 0 and self._decoupled)

        def bind(grp: Any) -> Any:
            from fastnn.backends._cuda.multi_tensor import adam_launch

            param, grad, st = layout.slices(grp)
            return adam_launch(param, grad, st["exp_avg"], st["exp_avg_sq"], grp.hyper,
                               grp.counter, *key)

        layout.run(grp, key, bind)
        grp.step += 1
        for p in grp.params:
            state[p]["step"] = grp.step
        return True


class AdamW(Adam):
    """Adam with decoupled weight decay: ``p *= 1 - lr * weight_decay`` each step."""

    _decoupled = True

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
