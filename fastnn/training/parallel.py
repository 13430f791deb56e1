"""What a training run does differently on several MPI ranks.

Only rank 0 reads the checkpoint (and sends it to the others) and writes
files; every rank trains on its share of each global batch and evaluates its
share of the test set, and the results are summed or gathered here. With one
rank every function is the identity.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import numpy as np

import fastnn
from fastnn import checkpoint as ckpt
from fastnn.data import share_bounds
from fastnn.distributed import World
from fastnn.metrics import accuracy
from fastnn.training.config import TrainConfig
from fastnn.training.steps import EpochStats, EvalResult

__all__ = [
    "check_ranks_agree",
    "gather_eval",
    "gather_times",
    "load_on_root",
    "quiet_stream",
    "sharded_optimizer",
    "sum_epoch",
    "test_share",
]

# Fields that may differ between ranks: where each machine keeps its data.
_PER_RANK_FIELDS = ("data_dir",)


def quiet_stream() -> io.StringIO:
    """Where a rank other than 0 prints (nowhere)."""
    return io.StringIO()


def load_on_root(world: World, path: str | os.PathLike) -> ckpt.Checkpoint:
    """Rank 0 loads the checkpoint and sends it to every rank (no shared disk
    needed); a failure to load raises the same error on every rank."""
    if world.size == 1:
        return ckpt.load(path)
    saved: Any = None
    if world.is_root:
        try:
            saved = ckpt.load(path)
        except (ckpt.CheckpointError, OSError) as exc:
            saved = exc
    saved = world.bcast(saved)
    if isinstance(saved, BaseException):
        raise saved
    return saved


def check_ranks_agree(world: World, config: TrainConfig, model: Any) -> None:
    """Raise :class:`~fastnn.distributed.DistributedError` when ranks were started
    with different hyperparameters, models or fastnn versions."""
    if world.size == 1:
        return
    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k not in _PER_RANK_FIELDS}
    cfg["fastnn_version"] = fastnn.__version__
    cfg["parameter_shapes"] = [tuple(p.shape) for p in model.parameters()]
    world.check_same("settings", cfg)


def sum_epoch(world: World, stats: EpochStats) -> EpochStats:
    """The whole job's epoch: images and mean loss over all ranks, the slowest
    rank's time."""
    if world.size == 1:
        return stats
    loss_sum, images = world.allreduce_sum([stats.loss * stats.images, stats.images])
    slowest = max(world.allgather(stats.seconds))
    return EpochStats(float(loss_sum) / max(images, 1), int(images), stats.steps, slowest)


def test_share(world: World, n: int) -> slice:
    """This rank's contiguous part of the first ``n`` test images."""
    lo, hi = share_bounds(n, world.rank, world.size)
    return slice(lo, hi)


def gather_eval(world: World, ev: EvalResult) -> EvalResult:
    """All ranks' labels and predictions in test-set order (rank shares are
    contiguous), so every rank reports the same accuracy over the whole set."""
    if world.size == 1:
        return ev
    parts = world.allgather((ev.y_true, ev.y_pred, ev.seconds))
    y_true = np.concatenate([p[0] for p in parts])
    y_pred = np.concatenate([p[1] for p in parts])
    return EvalResult(accuracy(y_true, y_pred), y_true, y_pred, max(p[2] for p in parts))


def sharded_optimizer(ddp: Any, opt: Any) -> Any:
    """The optimizer the ranks step: ``opt`` sharded over them (each rank updates
    its slice of the parameters, :meth:`DistributedDataParallel.shard_optimizer`)
    for host arrays on MPI, else ``opt``. ``FASTNN_DIST_SHARD=0`` keeps every rank
    updating all parameters after an Allreduce."""
    if ddp is None or os.environ.get("FASTNN_DIST_SHARD", "1") == "0":
        return opt
    if any(not isinstance(p.data, np.ndarray) for p in ddp.parameters()):
        return opt  # CuPy: NCCL Allreduce
    return ddp.shard_optimizer(opt)


def gather_times(world: World, ddp: Any) -> list[dict[str, float]]:
    """Every rank's split of its epoch (:attr:`DistributedDataParallel.times`, in
    seconds, and its step count), in rank order."""
    mine = {**ddp.times, "steps": ddp.steps}
    return world.allgather(mine)
