"""Neural-network building blocks: :class:`Module`, :class:`Parameter`, layers
and :mod:`fastnn.nn.init`.

Model init is reproducible through ``rng=`` on each layer (a NumPy Generator or
an int seed) or, for layers built without one, ``fastnn.nn.init.manual_seed``.
"""

from __future__ import annotations

from fastnn.nn import init
from fastnn.nn.init import manual_seed
from fastnn.nn.layers import (
    AvgPool2d,
    BatchNorm2d,
    Conv2d,
    CrossEntropyLoss,
    Dropout,
    Flatten,
    Identity,
    Linear,
    LogSoftmax,
    MaxPool2d,
    MSELoss,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
)
from fastnn.nn.module import IncompatibleKeys, Module, Parameter

__all__ = [
    "AvgPool2d",
    "BatchNorm2d",
    "Conv2d",
    "CrossEntropyLoss",
    "Dropout",
    "Flatten",
    "Identity",
    "IncompatibleKeys",
    "Linear",
    "LogSoftmax",
    "MSELoss",
    "MaxPool2d",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "init",
    "manual_seed",
]
