"""The pieces of a training run that touch data: one optimisation step
(:func:`train_step`), one pass over a loader (:func:`run_epoch`), and inference
(:func:`predict`, :func:`evaluate`).

``fastnn train`` and ``fastnn bench`` (the ``train_step`` and ``train_mnist``
cases) both call these, so the benchmark times exactly the step users run.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

import fastnn
from fastnn import functional as F
from fastnn import optim
from fastnn._array import to_host
from fastnn.autograd import Tensor, no_grad
from fastnn.data import DataLoader
from fastnn.metrics import accuracy
from fastnn.models import reseed_dropout
from fastnn.training.cpu_step import cpu_step_for
from fastnn.training.cuda_graph import fused_graph_step
from fastnn.training.cuda_step import fused_step_for

__all__ = [
    "EpochStats",
    "EvalResult",
    "evaluate",
    "predict",
    "progress_enabled",
    "run_epoch",
    "train_step",
]


def train_step(
    model: Any, opt: optim.Optimizer, x: Any, y: Any, *, global_batch: int | None = None
) -> Tensor | None:
    """One optimisation step on the batch ``x`` float32 ``(B, 1, H, W)`` (NCHW),
    ``y`` int64 ``(B,)``: forward, mean cross-entropy, backward, ``opt.step()``.

    Runs on whatever backend the caller selected (``with fastnn.backend(...)``).
    Returns the 0-d loss Tensor; its array stays on the batch's device, so the
    step does not wait for a GPU unless the caller reads it.

    ``global_batch``: ``model`` is a :class:`~fastnn.distributed.DistributedDataParallel`
    and ``x`` this rank's share of a batch of that many samples; the gradients
    are averaged over ranks, weighted by share. An empty share still takes part
    in the reduction and the step (returns None: no loss).

    Models and optimizers of the fused steps' pattern (the ``seed`` preset among
    them) run with no autograd graph: on the cuda backend as eight launches
    (:mod:`fastnn.training.cuda_step`), on the cpu backend as the same kernels
    autograd would call, bit for bit (:mod:`fastnn.training.cpu_step`); the
    returned loss then has no ``grad_fn``. (Not under ``global_batch``: the
    distributed step needs the per-parameter gradient hooks.)
    """
    if global_batch is None:
        # The cpu step first: it needs a NumPy batch, which the cuda one never takes,
        # and it costs less to rule out (no walk over the model's parameters).
        host = cpu_step_for(model, opt, x, y)
        if host is not None:
            return Tensor(host.run(x, y))
        fused = fused_step_for(model, opt)
        if fused is not None:
            return Tensor(fused.run(x, y))
        logits = model(Tensor(x))
    elif len(y) == 0:
        opt.zero_grad()
        model.reduce_without_batch()
        opt.step()
        return None
    else:
        logits = model(Tensor(x), global_batch=global_batch)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad()
    loss.backward()
    if global_batch is not None:
        model.synchronize()  # a no-op unless some parameter got no gradient
    opt.step()
    return loss


@dataclass(frozen=True)
class EpochStats:
    """What :func:`run_epoch` measured: mean training loss over ``images`` images
    in ``steps`` steps, and the wall time of the pass (data loading included)."""

    loss: float
    images: int
    steps: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def progress_enabled(progress: bool | None) -> bool:
    """``progress`` if given, else on only when stdout and stderr are terminals."""
    if progress is not None:
        return progress
    return sys.stdout.isatty() and sys.stderr.isatty()


def _bar(iterable: Any, enabled: bool, **kwargs: Any) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, leave=False, dynamic_ncols=True, **kwargs)


def run_epoch(
    model: Any,
    opt: optim.Optimizer,
    loader: DataLoader,
    backend: str,
    *,
    epoch: int | None = None,
    seed: int = 0,
    max_steps: int | None = None,
    progress: bool = False,
    desc: str = "",
    cuda_graph: bool = False,
) -> EpochStats:
    """Train ``model`` in train mode for one pass over ``loader`` with
    :func:`train_step`, every op under ``fastnn.backend(backend)``.

    ``epoch``: reseed the loader's shuffle/augmentation and the model's dropout
    for this epoch (from ``seed``), so a resumed run repeats the uninterrupted
    one; None continues the loader's own epoch counter. ``max_steps``: stop after
    that many batches (benchmarks). ``progress``: a tqdm bar titled ``desc``.
    ``cuda_graph``: replay each step as a CUDA graph where the fused cuda step
    applies (:mod:`fastnn.training.cuda_graph`; a one-line note where it cannot).
    A sharded loader (MPI ranks) trains its share of each global batch.
    """
    if max_steps is not None and (
        isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1
    ):
        raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
    if epoch is not None:
        loader.set_epoch(epoch)
        reseed_dropout(model, seed, epoch, stream=loader.shard[0])
    model.train()
    total = len(loader) if max_steps is None else min(len(loader), max_steps)
    loss_sum: Any = 0.0
    seen = steps = 0
    sharded = loader.shard[1] > 1
    t0 = time.perf_counter()
    bar = None
    try:
        with fastnn.backend(backend):
            # The fused cuda step trains on the loader's uint8 rows (no batch launches).
            fused = None
            if not (loader.augment_shift or sharded):
                fused = fused_step_for(model, opt, loader)
            if fused is not None and fused.images is not None:
                step_fn = fused_graph_step(fused) if cuda_graph else fused.run_indices
                fused.loss_acc[...] = 0
                batches: Any = loader.index_batches()
            else:
                if cuda_graph:
                    print("note: --cuda-graph: this model/optimizer/loader is outside the "
                          "fused cuda step; running eagerly", file=sys.stderr)
                fused, batches = None, loader
            bar = _bar(batches, progress, total=total, desc=desc, unit="batch")
            loss = None
            for batch in bar:
                if fused is not None:
                    step_fn(batch)
                    n = len(batch)
                else:
                    x, y = batch
                    if sharded:
                        global_batch = loader.global_batch_len(steps)
                        loss = train_step(model, opt, x, y, global_batch=global_batch)
                    else:
                        loss = train_step(model, opt, x, y)
                    if loss is not None:  # None: this rank's share was empty
                        # Summed on the device: reading the loss every step would sync a GPU.
                        loss_sum = loss_sum + loss.data.astype(np.float64) * len(y)
                    n = len(y)
                seen += n
                steps += 1
                if progress and steps % 25 == 0 and loss is not None:
                    bar.set_postfix(loss=f"{float(loss.data):.4f}")
                if steps == max_steps:
                    break
            if fused is not None:
                loss_sum = fused.loss_acc[0]
        mean_loss = float(loss_sum) / max(seen, 1)  # syncs a GPU before the clock stops
        seconds = time.perf_counter() - t0
    finally:
        if progress and bar is not None:
            bar.close()
    return EpochStats(mean_loss, seen, steps, seconds)


def predict(model: Any, loader: DataLoader, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` in eval mode over ``loader``; return ``(y_true, y_pred)`` (host int64)."""
    model.eval()
    trues, preds = [], []
    with fastnn.backend(backend), no_grad():
        for x, y in loader:
            logits = model(Tensor(x))
            preds.append(logits.data.argmax(axis=1))
            trues.append(y)
    if not trues:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    xp = sys.modules["cupy"] if loader.device == "cuda" else np
    return to_host(xp.concatenate(trues)), to_host(xp.concatenate(preds)).astype(np.int64)


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` returns: accuracy, host labels and predictions, wall time."""

    accuracy: float
    y_true: np.ndarray
    y_pred: np.ndarray
    seconds: float


def evaluate(model: Any, loader: DataLoader, backend: str) -> EvalResult:
    """:func:`predict` over ``loader``, timed, with its accuracy."""
    t0 = time.perf_counter()
    y_true, y_pred = predict(model, loader, backend)
    seconds = time.perf_counter() - t0
    return EvalResult(accuracy(y_true, y_pred), y_true, y_pred, seconds)

