"""Stochastic gradient descent with momentum (torch.optim.SGD, dampening 0)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastnn import functional as F
from fastnn._array import array_module as _xp
from fastnn.optim.optimizer import Optimizer

__all__ = ["SGD"]


class SGD(Optimizer):
    """``g = grad + weight_decay * p``; ``buf = momentum * buf + g``;
    ``p -= lr * (g + momentum * buf if nesterov else buf)`` (plain ``g`` when
    momentum is 0). State per parameter: ``momentum_buffer``."""

    def __init__(
        self, params: Iterable[Any], lr: float, momentum: float = 0.0,
        nesterov: bool = False, weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov,
                                  "weight_decay": weight_decay})

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if group["momentum"] < 0:
            raise ValueError(f"SGD: momentum must be >= 0, got {group['momentum']!r}")
        if group["weight_decay"] < 0:
            raise ValueError(f"SGD: weight_decay must be >= 0, got {group['weight_decay']!r}")
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError("SGD: nesterov requires momentum > 0")

    _flat_state = ("momentum_buffer",)

    def _param_step(self, g: dict[str, Any]) -> None:
        mom = g["momentum"]
        params, grads, bufs = [], [], []
        for p in g["params"]:
            grad = p.grad
            if grad is None:
                continue
            params.append(p.data)
            grads.append(grad)
            if mom != 0:
                st = self.state.setdefault(p, {})
                buf = st.get("momentum_buffer")
                if buf is None:
                    # Zeros make the first step buf = g, which is torch's clone(g).
                    buf = st["momentum_buffer"] = _xp(p.data).zeros_like(p.data)
                bufs.append(buf)
        F.sgd_step_multi(params, grads, bufs if mom != 0 else None, g["lr"], mom,
                         g["weight_decay"], g["nesterov"])

    def _flat_group_step(self, layout: Any, grp: Any, g: dict[str, Any]) -> bool:
        lr, mom, wd, nest = g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]
        if mom != 0:
            for p in grp.params:
                st = self.state.setdefault(p, {})
                if "momentum_buffer" not in st:
                    v = layout.views[p][2]["momentum_buffer"]
                    v[...] = 0
                    st["momentum_buffer"] = v
        layout.set_hyper(grp, (float(lr), float(mom), float(wd)))
        key = (wd != 0, mom != 0, bool(nest))

        def bind(grp: Any) -> Any:
            from fastnn.backends._cuda.multi_tensor import sgd_launch

            param, grad, st = layout.slices(grp)
            return sgd_launch(param, grad, st["momentum_buffer"], grp.hyper, *key)

        layout.run(grp, key, bind)
        return True
