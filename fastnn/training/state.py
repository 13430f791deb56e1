"""A run's optimizer and learning-rate schedule, and its checkpoint: what is
saved after every epoch (:func:`save_epoch`) and how ``--resume`` restores it
(:func:`resume_config`, :func:`restore`), re-planning the schedule when the run
is extended past the total it was planned for.

Checkpoint contents: states ``{"model", "optimizer", "scheduler"}`` and metadata
``{"model", "seed", "fastnn_version", "config", "rng", "epoch", "optimizer",
"device", "metrics", "planned_epochs"}``; ``planned_epochs`` is the total the
lr schedule is planned for (``config["epochs"]`` unless a resume shortened the
run; see :mod:`fastnn.checkpoint` for the file format).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from fastnn import checkpoint as ckpt
from fastnn import optim
from fastnn._io import write_atomic
from fastnn.training.config import OPTIMIZERS, RUN_KEYS, TrainConfig

__all__ = [
    "Restored",
    "build_optimizer",
    "build_scheduler",
    "optimizer_meta",
    "planned_epochs",
    "restore",
    "resume_config",
    "save_epoch",
    "sigint_deferred",
    "training_states",
    "write_json_atomic",
]

# Scheduler state entries that record progress; every other entry is the plan
# (T_max, step_size, ...) and follows the run's total epochs.
_PROGRESS_KEYS = ("last_epoch", "base_lrs")


def build_optimizer(config: TrainConfig, params: Iterable[Any]) -> optim.Optimizer:
    """``config.optimizer`` over ``params`` with the config's lr, momentum, weight decay."""
    if config.optimizer == "sgd":
        return optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {config.optimizer!r}")


def build_scheduler(config: TrainConfig, opt: optim.Optimizer) -> optim.LRScheduler | None:
    """The per-epoch lr schedule planned over ``config.epochs`` (None for ``none``)."""
    if config.schedule == "cosine":
        return optim.CosineAnnealingLR(opt, T_max=config.epochs)
    if config.schedule == "step":
        return optim.StepLR(opt, step_size=max(1, config.epochs // 3), gamma=0.1)
    return None


def optimizer_meta(config: TrainConfig, opt: optim.Optimizer) -> dict[str, Any]:
    """The optimizer's name and first group's hyperparameters, JSON-able."""
    group = opt.param_groups[0]
    hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
    return {"name": config.optimizer, **hyper}


def resume_config(
    config: TrainConfig,
    saved: ckpt.Checkpoint,
    explicit: Iterable[str] = (),
    log: Callable[[str], None] = print,
) -> TrainConfig:
    """``config`` with the checkpoint's run hyperparameters (:data:`RUN_KEYS`);
    a warning is logged for each one named in ``explicit`` that it overrides."""
    saved_cfg = saved.metadata.get("config", {})
    explicit = set(explicit)
    changes = {}
    for key in RUN_KEYS:
        if key in saved_cfg:
            if key in explicit and getattr(config, key) != saved_cfg[key]:
                log(
                    f"warning: --resume keeps the checkpoint's {key}={saved_cfg[key]!r} "
                    f"(ignoring {getattr(config, key)!r})"
                )
            changes[key] = saved_cfg[key]
    return dataclasses.replace(config, **changes)


@dataclass(frozen=True)
class Restored:
    """What :func:`restore` did: epochs already done, the total the schedule is now
    planned for (store it as ``planned_epochs`` in later checkpoints), and a line to
    print when the schedule was re-planned over a larger total (else None)."""

    epochs_done: int
    planned_epochs: int
    note: str | None = None


def planned_epochs(saved: ckpt.Checkpoint) -> int | None:
    """The total the checkpoint's lr schedule was planned for: its ``planned_epochs``
    metadata, else (older checkpoints) the run's ``config["epochs"]``."""
    meta = saved.metadata
    planned = meta.get("planned_epochs", meta.get("config", {}).get("epochs"))
    if isinstance(planned, bool) or not isinstance(planned, int) or planned < 1:
        return None
    return planned


def restore(
    saved: ckpt.Checkpoint,
    model: Any,
    opt: optim.Optimizer,
    sched: optim.LRScheduler | None,
    config: TrainConfig,
    source: str | os.PathLike = "checkpoint",
) -> Restored:
    """Load ``saved`` into ``model``, ``opt`` and ``sched`` (``sched`` freshly built
    for ``config``, i.e. planned over ``config.epochs``).

    With ``config.epochs`` at most the total the checkpoint was planned for
    (:func:`planned_epochs`), the saved schedule continues unchanged (an
    interrupted run resumes exactly; a smaller total just stops early). With
    a larger total, the schedule's plan (T_max, step size) is taken from ``sched``
    and only its progress from the checkpoint, and the optimizer's lr is reset to
    the new plan's value: the remaining epochs get the rates a run planned for the
    new total would have had. Raises :class:`~fastnn.checkpoint.CheckpointError`
    when the states do not fit.
    """
    done = int(saved.metadata.get("epoch", 0))
    planned = planned_epochs(saved)
    state = saved.states.get("scheduler")
    replan = (
        sched is not None and state is not None and planned is not None and config.epochs > planned
    )
    note = None
    try:
        model.load_state_dict(saved.model_state)
        opt.load_state_dict(saved.optimizer_state)
        if sched is not None and state is not None:
            if replan:
                plan = {k: v for k, v in sched.state_dict().items() if k not in _PROGRESS_KEYS}
                state = {**state, **plan}
                old_lr = opt.param_groups[0]["lr"]
            sched.load_state_dict(state)
    except (ValueError, TypeError, KeyError) as exc:
        raise ckpt.CheckpointError(f"{source}: does not fit the model/optimizer: {exc}") from exc
    if replan:
        for group, lr in zip(opt.param_groups, sched.get_last_lr()):
            group["lr"] = lr
        note = (
            f"resume: extending the {config.schedule} schedule from {planned} to "
            f"{config.epochs} epochs; epoch {done + 1} lr {opt.param_groups[0]['lr']:.4g} "
            f"(the {planned}-epoch plan had {old_lr:.4g})"
        )
    return Restored(done, config.epochs if planned is None else max(planned, config.epochs), note)


def training_states(
    model: Any, opt: optim.Optimizer, sched: optim.LRScheduler | None
) -> dict[str, Any]:
    """The states a checkpoint holds: model, optimizer and scheduler."""
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else None,
    }


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON, written atomically."""
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C until the block ends, then raise it.

    The checkpoint and the metrics JSON of an epoch are written one after the
    other; an interrupt between the two would leave them an epoch apart.
    Signals can only be handled on the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):  # Python's default handler raises KeyboardInterrupt
            previous(signal.SIGINT, None)
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt


def save_epoch(
    checkpoint: str | os.PathLike | None,
    states: dict[str, Any] | None,
    meta: dict[str, Any] | None,
    metrics_json: str | os.PathLike | None,
    metrics: dict[str, Any] | None,
) -> None:
    """Write the epoch's checkpoint (``states`` + ``meta``) and metrics JSON, each
    atomically, with Ctrl-C held until both are on disk. A None path skips a file."""
    with sigint_deferred():
        if checkpoint is not None:
            ckpt.save(checkpoint, states or {}, meta)
        if metrics_json is not None:
            write_json_atomic(metrics_json, metrics)
