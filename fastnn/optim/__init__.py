"""Optimizers (:class:`SGD`, :class:`Adam`, :class:`AdamW`), :func:`l1_penalty`
and learning-rate schedules (:class:`StepLR`, :class:`CosineAnnealingLR`)."""

from __future__ import annotations

from fastnn.optim.adam import Adam, AdamW
from fastnn.optim.optimizer import Optimizer, l1_penalty
from fastnn.optim.schedulers import CosineAnnealingLR, LRScheduler, StepLR
from fastnn.optim.sgd import SGD

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "CosineAnnealingLR",
    "LRScheduler",
    "Optimizer",
    "StepLR",
    "l1_penalty",
]
