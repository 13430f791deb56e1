"""Parameter initialisers (in place), matching ``torch.nn.init``.

Every function takes a Tensor (or a NumPy/CuPy array), overwrites its data and
returns it. Randomness comes from ``rng``: a ``numpy.random.Generator``, an int
seed, or None for this module's global generator, which :func:`manual_seed`
reseeds. Values are drawn in float64 on the host and then cast and copied, so a
seed gives the same numbers for float32/float64 and for NumPy/CuPy data.

Reproducible models: either pass one generator to every layer
(``rng = np.random.default_rng(0); Conv2d(1, 32, 3, rng=rng); Linear(..., rng=rng)``)
or call ``fastnn.nn.init.manual_seed(0)`` before building the model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "calculate_gain",
    "constant_",
    "default_generator",
    "kaiming_normal_",
    "kaiming_uniform_",
    "manual_seed",
    "normal_",
    "ones_",
    "uniform_",
    "xavier_normal_",
    "xavier_uniform_",
    "zeros_",
]

_GLOBAL_RNG = np.random.default_rng()


def manual_seed(seed: int) -> np.random.Generator:
    """Reseed the global generator used when no ``rng`` is given; returns it."""
    global _GLOBAL_RNG
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"manual_seed: seed must be an int, got {type(seed).__name__}")
    _GLOBAL_RNG = np.random.default_rng(int(seed))
    return _GLOBAL_RNG


def default_generator() -> np.random.Generator:
    """The global generator (layers and init functions use it when ``rng`` is None)."""
    return _GLOBAL_RNG


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if rng is None:
        return _GLOBAL_RNG
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")


def _data(t: Any) -> Any:
    data = t.data if getattr(type(t), "_fastnn_tensor", False) else t
    if not hasattr(data, "shape") or not hasattr(data, "dtype"):
        raise TypeError(f"tensor must be a fastnn Tensor or an array, got {type(t).__name__}")
    return data


def _fill(t: Any, values: np.ndarray | float) -> Any:
    data = _data(t)
    if isinstance(values, np.ndarray):
        values = values.astype(data.dtype, copy=False)
        if not isinstance(data, np.ndarray):  # CuPy: copy the host draw to the device
            import cupy

            values = cupy.asarray(values)
    data[...] = values
    return t


def _fans(t: Any) -> tuple[int, int]:
    shape = tuple(_data(t).shape)
    if len(shape) < 2:
        raise ValueError(
            f"fan in and fan out need at least 2 dimensions, got a tensor of shape {shape}"
        )
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """torch's recommended gain for ``nonlinearity`` (``param``: leaky_relu's slope)."""
    linear = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
              "conv_transpose3d", "sigmoid")
    if nonlinearity in linear:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else param
        if isinstance(slope, bool) or not isinstance(slope, (int, float)):
            raise ValueError(f"calculate_gain: negative_slope {param!r} is not a number")
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"calculate_gain: unsupported nonlinearity {nonlinearity!r}")


def uniform_(t: Any, a: float = 0.0, b: float = 1.0, rng: Any = None) -> Any:
    """Fill with U(a, b)."""
    return _fill(t, _rng(rng).uniform(a, b, size=_data(t).shape))


def normal_(t: Any, mean: float = 0.0, std: float = 1.0, rng: Any = None) -> Any:
    """Fill with N(mean, std^2)."""
    return _fill(t, _rng(rng).normal(mean, std, size=_data(t).shape))


def constant_(t: Any, val: float) -> Any:
    """Fill with ``val``."""
    return _fill(t, val)


def zeros_(t: Any) -> Any:
    """Fill with 0."""
    return _fill(t, 0)


def ones_(t: Any) -> Any:
    """Fill with 1."""
    return _fill(t, 1)


def xavier_uniform_(t: Any, gain: float = 1.0, rng: Any = None) -> Any:
    """Glorot uniform: U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = _fans(t)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(t, -bound, bound, rng)


def xavier_normal_(t: Any, gain: float = 1.0, rng: Any = None) -> Any:
    """Glorot normal: N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = _fans(t)
    return normal_(t, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), rng)


def _kaiming_std(t: Any, a: float, mode: str, nonlinearity: str) -> float:
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = _fans(t)
    fan = fan_in if mode == "fan_in" else fan_out
    if fan == 0:
        raise ValueError("kaiming init of a tensor with zero fan")
    return calculate_gain(nonlinearity, a) / math.sqrt(fan)


def kaiming_uniform_(
    t: Any, a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu",
    rng: Any = None,
) -> Any:
    """He uniform: U(-b, b), b = gain * sqrt(3 / fan); ``a`` is leaky_relu's slope."""
    bound = math.sqrt(3.0) * _kaiming_std(t, a, mode, nonlinearity)
    return uniform_(t, -bound, bound, rng)


def kaiming_normal_(
    t: Any, a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu",
    rng: Any = None,
) -> Any:
    """He normal: N(0, std^2), std = gain / sqrt(fan)."""
    return normal_(t, 0.0, _kaiming_std(t, a, mode, nonlinearity), rng)
