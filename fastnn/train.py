"""Training and evaluation behind ``fastnn train`` / ``fastnn evaluate``.

The code lives in :mod:`fastnn.training` (config, steps, state, loop); this
module keeps the historical import path ``fastnn.train`` working, including
the private names older code and tests import (``_sigint_deferred``, ...).

Devices: ``numpy`` runs everything under ``fastnn.backend("numpy")`` (the
reference), ``cpu`` uses NumPy arrays with the C++ kernels, ``cuda`` uses CuPy
arrays with the Numba-CUDA kernels (or, with ``NUMBA_ENABLE_CUDASIM=1``, NumPy
arrays under ``fastnn.backend("cuda")`` in Numba's simulator).
"""

from __future__ import annotations

from fastnn.training import (
    DEVICES,
    OPTIMIZERS,
    SCHEDULES,
    DeviceError,
    EpochStats,
    EvalResult,
    TrainConfig,
    TrainResult,
    build_optimizer,
    build_scheduler,
    evaluate,
    evaluate_checkpoint,
    predict,
    resolve_device,
    run_epoch,
    train,
    train_step,
)
from fastnn.training.config import RUN_KEYS as _RUN_KEYS  # noqa: F401
from fastnn.training.config import Device as _Device  # noqa: F401
from fastnn.training.loop import limit as _limit  # noqa: F401
from fastnn.training.state import optimizer_meta as _optimizer_meta  # noqa: F401
from fastnn.training.state import sigint_deferred as _sigint_deferred  # noqa: F401
from fastnn.training.state import write_json_atomic as _write_json_atomic  # noqa: F401
from fastnn.training.steps import progress_enabled as _progress_enabled  # noqa: F401

__all__ = [
    "DEVICES",
    "OPTIMIZERS",
    "SCHEDULES",
    "DeviceError",
    "EpochStats",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "evaluate_checkpoint",
    "predict",
    "resolve_device",
    "run_epoch",
    "train",
    "train_step",
]

