"""Training in small pieces: configuration and devices (:mod:`.config`), one
step / one epoch / inference (:mod:`.steps`), optimizer, schedule and
checkpoint save/resume (:mod:`.state`), and the loops that put them together
(:mod:`.loop`). :mod:`fastnn.train` re-exports the same names."""

from __future__ import annotations

from fastnn.training.config import (
    DEVICES,
    OPTIMIZERS,
    RUN_KEYS,
    SCHEDULES,
    Device,
    DeviceError,
    TrainConfig,
    TrainResult,
    resolve_device,
)
from fastnn.training.loop import eval_loader, evaluate_checkpoint, limit, train
from fastnn.training.state import (
    Restored,
    build_optimizer,
    build_scheduler,
    optimizer_meta,
    planned_epochs,
    restore,
    resume_config,
    save_epoch,
    sigint_deferred,
    training_states,
    write_json_atomic,
)
from fastnn.training.steps import (
    EpochStats,
    EvalResult,
    evaluate,
    predict,
    progress_enabled,
    run_epoch,
    train_step,
)

__all__ = [
    "DEVICES",
    "OPTIMIZERS",
    "RUN_KEYS",
    "SCHEDULES",
    "Device",
    "DeviceError",
    "EpochStats",
    "EvalResult",
    "Restored",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "build_scheduler",
    "eval_loader",
    "evaluate",
    "evaluate_checkpoint",
    "limit",
    "optimizer_meta",
    "planned_epochs",
    "predict",
    "progress_enabled",
    "resolve_device",
    "restore",
    "resume_config",
    "run_epoch",
    "save_epoch",
    "sigint_deferred",
    "train",
    "train_step",
    "training_states",
    "write_json_atomic",
]
