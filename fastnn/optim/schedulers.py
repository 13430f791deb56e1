"""Learning-rate schedules: :class:`StepLR` and :class:`CosineAnnealingLR`.

Like torch, a scheduler sets each group's ``lr`` at construction (epoch 0) and
on every ``step()`` (usually once per epoch, after ``optimizer.step()``). Rates
come from closed forms of ``last_epoch``, so loading a state dict reproduces them.
"""

from __future__ import annotations

import math
from typing import Any

from fastnn.optim.optimizer import Optimizer

__all__ = ["CosineAnnealingLR", "LRScheduler", "StepLR"]


class LRScheduler:
    """Base class: subclasses define ``lr_at(base_lr, epoch)``."""

    _fields: tuple[str, ...] = ()

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: optimizer must be a fastnn Optimizer, "
                            f"got {type(optimizer).__name__}")
        self.optimizer = optimizer
        for g in optimizer.param_groups:
            if last_epoch == -1:
                g["initial_lr"] = g["lr"]
            elif "initial_lr" not in g:
                raise ValueError(f"{type(self).__name__}: resuming (last_epoch="
                                 f"{last_epoch}) needs 'initial_lr' in every param group")
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def lr_at(self, base_lr: float, epoch: int) -> float:
        raise NotImplementedError

    def step(self) -> None:
        """Advance one epoch and set every group's lr."""
        self.last_epoch += 1
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = self.lr_at(base, self.last_epoch)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        """The lrs set by the latest ``step()``."""
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        """Flat dict of scalars (plus ``base_lrs`` as a list), npz-friendly."""
        out: dict[str, Any] = {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}
        for f in self._fields:
            out[f] = getattr(self, f)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = [k for k in ("last_epoch", "base_lrs", *self._fields) if k not in state_dict]
        if missing:
            raise ValueError(f"{type(self).__name__}.load_state_dict: missing keys {missing}")
        base = [float(b) for b in list(state_dict["base_lrs"])]
        if len(base) != len(self.optimizer.param_groups):
            raise ValueError(f"{type(self).__name__}.load_state_dict: {len(base)} base_lrs for "
                             f"{len(self.optimizer.param_groups)} parameter groups")
        self.base_lrs = base
        self.last_epoch = int(state_dict["last_epoch"])
        for f in self._fields:
            v = state_dict[f]
            v = v.item() if hasattr(v, "item") else v
            setattr(self, f, type(getattr(self, f))(v))
        self._last_lr = [self.lr_at(b, self.last_epoch) for b in self.base_lrs]


class StepLR(LRScheduler):
    """``lr = base_lr * gamma ** (epoch // step_size)``."""

    _fields = ("step_size", "gamma")

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
            raise ValueError(f"StepLR: step_size must be a positive int, got {step_size!r}")
        self.step_size = step_size
        self.gamma = float(gamma)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr: float, epoch: int) -> float:
        return base_lr * self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2``."""

    _fields = ("T_max", "eta_min")

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0,  # noqa: N803
                 last_epoch: int = -1) -> None:
        if isinstance(T_max, bool) or not isinstance(T_max, int) or T_max < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be a positive int, got {T_max!r}")
        self.T_max = T_max
        self.eta_min = float(eta_min)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr: float, epoch: int) -> float:
        return self.eta_min + (base_lr - self.eta_min) * (
            1 + math.cos(math.pi * epoch / self.T_max)
        ) / 2
