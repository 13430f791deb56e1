"""The training and evaluation loops behind ``fastnn train`` / ``fastnn evaluate``.

One epoch = a seeded, shuffled pass over the training set (:func:`run_epoch`),
then an evaluation on the test set, then an atomic checkpoint and metrics-JSON
write (:func:`save_epoch`). Shuffle, augmentation and dropout are reseeded from
``(seed, epoch)`` at the start of every epoch, so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import numpy as np

import fastnn
from fastnn import checkpoint as ckpt
from fastnn import distributed
from fastnn.data import MNIST, DataLoader, load_mnist
from fastnn.distributed import World
from fastnn.metrics import (
    accuracy,
    classification_report,
    confusion_matrix,
    format_confusion_matrix,
)
from fastnn.models import MODELS, build_model
from fastnn.training.config import Device, TrainConfig, TrainResult, resolve_device
from fastnn.training.parallel import (
    check_ranks_agree,
    gather_eval,
    gather_times,
    load_on_root,
    quiet_stream,
    sharded_optimizer,
    sum_epoch,
    test_share,
)
from fastnn.training.state import (
    build_optimizer,
    build_scheduler,
    optimizer_meta,
    restore,
    resume_config,
    save_epoch,
    training_states,
    write_json_atomic,
)
from fastnn.training.steps import evaluate, predict, progress_enabled, run_epoch

__all__ = ["eval_loader", "evaluate_checkpoint", "limit", "train"]

_RNG_SCHEME = (
    "per-epoch: shuffle/augment default_rng([seed, epoch]), dropout default_rng([seed, epoch, 1])"
)


def limit(a: np.ndarray, n: int | None) -> np.ndarray:
    """The first ``n`` entries of ``a`` (all of them for None)."""
    return a if n is None else a[:n]


def limit_count(a: np.ndarray, n: int | None) -> int:
    """``len(limit(a, n))``."""
    return len(a) if n is None else min(len(a), n)


def eval_loader(
    data: MNIST,
    limit_test: int | None,
    batch_size: int,
    device: Device,
    world: World | None = None,
) -> DataLoader:
    """Unshuffled batches of the first ``limit_test`` MNIST test images (with a
    ``world``, this rank's contiguous part of them)."""
    images = limit(data.test_images, limit_test)
    labels = limit(data.test_labels, limit_test)
    if world is not None and world.size > 1:
        part = test_share(world, len(labels))
        images, labels = images[part], labels[part]
    return DataLoader(images, labels, batch_size, device=device.arrays)


def _model_for(name: str, seed: int, device: Device, world: World | None = None) -> Any:
    model = build_model(name, seed)
    if device.arrays == "cuda":
        if world is not None and world.size > 1:
            from fastnn.distributed.nccl import select_device

            select_device(world)  # one GPU per rank on each machine
        model.to("cuda")
    return model


def train(
    config: TrainConfig,
    *,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    metrics_json: str | os.PathLike | None = None,
    progress: bool | None = None,
    explicit: Iterable[str] = (),
    out: TextIO | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    world: World | None = None,
    cuda_graph: bool = False,
) -> TrainResult:
    """Train ``config.model`` on MNIST for ``config.epochs`` epochs (total, counting
    epochs done before a resume).

    ``checkpoint``: saved atomically after every epoch. ``resume``: continue from
    it (its model, optimizer and scheduler state; its run hyperparameters win
    over ``config``, with a warning for those named in ``explicit``). A larger
    ``config.epochs`` than the checkpoint was planned for extends the run: the
    lr schedule is re-planned over the new total (one ``resume:`` line says so).
    ``metrics_json``: rewritten after every epoch with ``{"epochs": [...], ...}``.
    ``progress``: tqdm bar (None: only when stdout and stderr are TTYs).
    Prints one line per epoch and a classification report to ``out`` (stdout).

    ``world`` (default :func:`fastnn.distributed.init`: the MPI world when started
    by ``mpiexec -n N``, else one process): with N > 1 ranks, ``batch_size`` is the
    global batch and each rank trains on its share of every batch, so the run
    follows the single-process trajectory (up to summation order; BatchNorm batch
    statistics are per rank, dropout masks differ). Only rank 0 prints, shows the
    bar and writes the checkpoint and metrics; evaluation is split across ranks.
    ``cuda_graph``: replay the fused cuda step as a CUDA graph (see
    :func:`fastnn.training.run_epoch`).
    """
    world = world if world is not None else distributed.init()
    out = out if out is not None else (sys.stdout if world.is_root else quiet_stream())
    if not world.is_root:
        progress = False

    def log(msg: str) -> None:
        print(msg, file=out, flush=True)

    history: list[dict[str, Any]] = []
    saved = None
    if resume:
        if checkpoint is None:
            raise ValueError("resume needs a checkpoint path (--checkpoint PATH)")
        saved = load_on_root(world, checkpoint)
        config = resume_config(config, saved, explicit, log)
        history = list(saved.metadata.get("metrics", {}).get("epochs", []))
    config.validate()
    device = resolve_device(config.device)

    data = load_mnist(config.data_dir)
    train_loader = DataLoader(
        limit(data.train_images, config.limit_train),
        limit(data.train_labels, config.limit_train),
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        augment_shift=config.augment,
        device=device.arrays,
        shard=(world.rank, world.size),
        # No prefetch thread: each batch is one native pass (~1% of the seed step),
        # and a thread beside the kernels' own made the epoch 8-10% slower on 2 cores.
        prefetch=0,
    )
    tests = eval_loader(data, config.limit_test, config.eval_batch_size, device, world)

    model = _model_for(config.model, config.seed, device, world)
    check_ranks_agree(world, config, model)
    opt = build_optimizer(config, model.parameters())
    sched = build_scheduler(config, opt)
    start_epoch, planned = 0, config.epochs
    if saved is not None:
        restored = restore(saved, model, opt, sched, config, checkpoint)
        start_epoch, planned = restored.epochs_done, restored.planned_epochs
        history = history[:start_epoch]
        log(f"resuming {config.model} from {checkpoint} at epoch {start_epoch}/{config.epochs}")
        if restored.note is not None:
            log(restored.note)
    else:
        log(
            f"training {config.model} on {train_loader.num_samples} images "
            f"(test {limit_count(data.test_labels, config.limit_test)}), device {device.name}, "
            f"{config.optimizer} lr {config.lr}, batch {config.batch_size}, {config.epochs} epochs"
            + (f", {world.size} MPI ranks" if world.size > 1 else "")
        )
    # After restore: every rank holds the same state; the wrapper broadcasts
    # rank 0's anyway, so a rank can never start from different weights.
    ddp = distributed.DistributedDataParallel(model, world) if world.size > 1 else None
    step_model = ddp if ddp is not None else model
    step_opt = sharded_optimizer(ddp, opt)  # opt itself unless ranks share the optimizer step

    show = progress_enabled(progress)
    meta_base = {
        "model": config.model,
        "seed": config.seed,
        "fastnn_version": fastnn.__version__,
        "config": dataclasses.asdict(config),
        "planned_epochs": planned,
        "rng": {"scheme": _RNG_SCHEME},
    }

    def metrics_doc() -> dict[str, Any]:
        return {
            "epochs": history,
            "model": config.model,
            "device": device.name,
            "config": dataclasses.asdict(config),
        }

    y_true = y_pred = np.zeros(0, np.int64)
    for epoch in range(start_epoch, config.epochs):
        lr = opt.param_groups[0]["lr"]
        if ddp is not None:
            ddp.reset_times()
        stats = run_epoch(
            step_model,
            step_opt,
            train_loader,
            device.backend,
            epoch=epoch,
            seed=config.seed,
            progress=show,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            cuda_graph=cuda_graph,
        )
        stats = sum_epoch(world, stats)
        if sched is not None:
            sched.step()
        if ddp is not None:
            ddp.average_buffers()  # BatchNorm running statistics: one model to test and save
        ev = gather_eval(world, evaluate(model, tests, device.backend))
        y_true, y_pred = ev.y_true, ev.y_pred
        record = {
            "epoch": epoch + 1,
            "train_loss": stats.loss,
            "test_accuracy": ev.accuracy,
            "seconds": stats.seconds,
            "images_per_second": stats.images_per_second,
            "eval_seconds": ev.seconds,
            "lr": lr,
            "train_images": stats.images,
            "test_images": int(len(y_true)),
        }
        comm = ""
        if ddp is not None:
            # Rank 0's wait for gradient reductions that backward did not hide.
            record["ranks"] = world.size
            record["comm_wait_seconds"] = ddp.comm_seconds
            record["comm_wait_share"] = ddp.comm_seconds / stats.seconds if stats.seconds else 0.0
            record["rank_times"] = gather_times(world, ddp)
            comm = f", comm wait {100 * record['comm_wait_share']:.1f}%"
        history.append(record)
        if not np.isfinite(stats.loss):
            raise FloatingPointError(f"training diverged: loss {stats.loss} in epoch {epoch + 1}")
        states = meta = None
        if checkpoint is not None and (world.is_root or step_opt is not opt):
            # A sharded optimizer gathers its state from every rank.
            states = training_states(model, step_opt, sched)
        if checkpoint is not None and world.is_root:
            meta = {
                **meta_base,
                "epoch": epoch + 1,
                "optimizer": optimizer_meta(config, opt),
                "device": device.name,
                "metrics": {"epochs": history},
            }
        if world.is_root:
            doc = metrics_doc() if metrics_json is not None else None
            save_epoch(checkpoint, states, meta, metrics_json, doc)
        log(
            f"epoch {epoch + 1:>3}/{config.epochs}  loss {stats.loss:.4f}  "
            f"test acc {100 * ev.accuracy:6.2f}%  {stats.images_per_second:8.0f} img/s  "
            f"{stats.seconds:6.2f} s (eval {ev.seconds:.2f} s{comm})"
        )
        if on_epoch_end is not None:
            on_epoch_end(record)

    if start_epoch >= config.epochs:
        log(f"checkpoint already at epoch {start_epoch} >= --epochs {config.epochs}; evaluating")
        ev = gather_eval(world, evaluate(model, tests, device.backend))
        y_true, y_pred = ev.y_true, ev.y_pred
    acc = accuracy(y_true, y_pred)
    report = classification_report(y_true, y_pred, labels=list(range(10)), digits=4)
    log(f"\ntest accuracy {100 * acc:.2f}% ({int((y_true == y_pred).sum())}/{len(y_true)})")
    log(report)
    if metrics_json is not None and world.is_root:
        doc = metrics_doc()
        doc["final_test_accuracy"] = acc
        write_json_atomic(metrics_json, doc)
    return TrainResult(history, acc, y_true, y_pred, config, report)


def evaluate_checkpoint(
    path: str | os.PathLike,
    *,
    data_dir: str | None = None,
    device: str = "cpu",
    limit_test: int | None = None,
    batch_size: int = 1000,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Load a checkpoint, evaluate it on the MNIST test set, and print the
    accuracy, a classification report and the confusion matrix. Returns
    ``{"test_accuracy", "confusion_matrix", "epoch", "model"}``."""
    out = out if out is not None else sys.stdout
    saved = ckpt.load(path)
    name = saved.metadata.get("model")
    if name not in MODELS:
        raise ckpt.CheckpointError(f"{path}: unknown model {name!r} in checkpoint metadata")
    dev = resolve_device(device)
    model = _model_for(name, int(saved.metadata.get("seed", 0)), dev)
    try:
        model.load_state_dict(saved.model_state)
    except (ValueError, TypeError) as exc:
        raise ckpt.CheckpointError(f"{path}: does not fit model {name!r}: {exc}") from exc
    loader = eval_loader(load_mnist(data_dir), limit_test, batch_size, dev)
    y_true, y_pred = predict(model, loader, dev.backend)
    acc = accuracy(y_true, y_pred)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(10)))
    epoch = saved.metadata.get("epoch")
    print(f"checkpoint {path}: model {name}, epoch {epoch}", file=out)
    print(f"test accuracy {100 * acc:.2f}% ({int(np.trace(cm))}/{len(y_true)})\n", file=out)
    print(classification_report(y_true, y_pred, labels=list(range(10)), digits=4), file=out)
    print("confusion matrix (rows: true, columns: predicted)", file=out)
    print(format_confusion_matrix(cm), file=out, end="", flush=True)
    return {"test_accuracy": acc, "confusion_matrix": cm, "epoch": epoch, "model": name}
