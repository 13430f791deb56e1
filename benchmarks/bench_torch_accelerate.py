"""The seed model in plain PyTorch vs the same model after ``fastnn.torch.accelerate``.

Every peer runs the same user code (``torch.optim.Adam(lr=1e-3)``,
``loss_fn = torch.nn.CrossEntropyLoss()``, batch 128, the same batches in the
same order, the same initial weights from ``torch.manual_seed(0)``); what each
adds (``--peers``, all by default):

* ``torch``: nothing;
* ``model``: ``accelerate(model)``: the layers on fastnn, torch's Adam and loss;
* ``model+optimizer``: ``accelerate(model, optimizer=opt)``: also the Adam step
  on fastnn's kernel (:mod:`fastnn.torch.optim`; the optimizer object and its
  state stay torch's);
* ``model+optimizer+loss``: that and ``accelerate(loss_fn)``: the loss on
  fastnn's fused softmax cross-entropy.

They train ``--epochs`` MNIST epochs, interleaved every ``CHUNK`` batches (who
goes first rotates) so load changes on a shared machine hit all alike. Reports
each epoch's wall time, the per-epoch speedups (median of the ratios), the test
accuracy after the last epoch, the time spent gathering batches, and one more
epoch of three fresh models interleaved: torch, the last peer, and the last peer
under ``torch.compile(fullgraph=True)`` (inductor; compile time reported apart).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=$PWD \\
        python benchmarks/bench_torch_accelerate.py --epochs 5 --md out.md

Needs torch and the MNIST files (``$FASTNN_DATA_DIR``; never downloaded here).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import time

import numpy as np
import torch

import fastnn
import fastnn.torch as ft
from fastnn.data.loader import MNIST_MEAN, MNIST_STD
from fastnn.data.mnist import load_mnist

BATCH = 128
CHUNK = 10  # batches per turn when runs are interleaved
PEERS = ("model", "model+optimizer", "model+optimizer+loss")
CALLS = {"model": "accelerate(model)",
         "model+optimizer": "accelerate(model, optimizer=opt)",
         "model+optimizer+loss": "accelerate(model, optimizer=opt) + accelerate(loss_fn)"}


def seed_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 13 * 13, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = (images.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    return torch.from_numpy(x.reshape(-1, 1, 28, 28)), torch.from_numpy(labels.astype(np.int64))


class Run:
    """A model, its optimizer and its per-epoch times."""

    def __init__(self, name: str, model: torch.nn.Module, forward=None,
                 accelerate: str = "") -> None:
        self.name, self.model = name, model
        self.forward = forward or model
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.times: list[float] = []
        self.loader_times: list[float] = []
        self.report = None
        parts = accelerate.split("+") if accelerate else []
        if "model" in parts:
            self.report = ft.accelerate(
                model, optimizer=self.opt if "optimizer" in parts else None)
        if "loss" in parts:
            ft.accelerate(self.loss_fn)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss_fn(self.forward(xb), yb).backward()
        self.opt.step()

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.eval()
        hits = sum(int((self.model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum())
                   for i in range(0, x.shape[0], 1000))
        return 100.0 * hits / x.shape[0]


def interleaved_epoch(runs: list[Run], x: torch.Tensor, y: torch.Tensor, epoch: int) -> None:
    """One epoch for each run, same batch order, interleaved every CHUNK batches
    (rotating who goes first), so load changes on a shared machine hit all runs
    alike; each run's epoch time is the sum of its chunks. The time spent
    gathering the batches (``x[idx]``, part of the epoch time: the loop is the
    user's) is also kept apart, in ``loader_times``."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(epoch))
    starts = list(range(0, x.shape[0], BATCH))
    spent, loading = [0.0] * len(runs), [0.0] * len(runs)
    clock = time.perf_counter
    for r in runs:
        r.model.train()
    for c, first in enumerate(range(0, len(starts), CHUNK)):
        for k in range(len(runs)):
            j = (k + c) % len(runs)
            t0 = clock()
            for i in starts[first:first + CHUNK]:
                t1 = clock()
                idx = order[i:i + BATCH]
                xb, yb = x[idx], y[idx]
                loading[j] += clock() - t1
                runs[j].step(xb, yb)
            spent[j] += clock() - t0
    for r, t, ld in zip(runs, spent, loading):
        r.times.append(t)
        r.loader_times.append(ld)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines()
                    if ln.startswith("Model name"))
    except Exception:  # noqa: BLE001 - no lscpu
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    ap.add_argument("--md", help="also write the markdown table here")
    ap.add_argument("--limit", type=int, help="train on the first N images (a smoke run)")
    ap.add_argument("--peers", default=",".join(PEERS),
                    help=f"what the accelerated peers add, comma-separated from {PEERS}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fastnn.set_num_threads(args.threads)

    data = load_mnist(download=False)
    x, y = tensors(data.train_images[:args.limit], data.train_labels[:args.limit])
    xt, yt = tensors(data.test_images, data.test_labels)
    kinds = [k.strip() for k in args.peers.split(",") if k.strip()]
    if not kinds or any(k not in PEERS for k in kinds):
        ap.error(f"--peers: choose from {', '.join(PEERS)}")
    plain = Run("torch", seed_model())
    peers = [Run(CALLS[k], copy.deepcopy(plain.model), accelerate=k) for k in kinds]
    print(peers[-1].report)
    load = [os.getloadavg()[0]]
    for e in range(args.epochs):
        interleaved_epoch([plain, *peers], x, y, e)
        print(f"epoch {e + 1}: torch {plain.times[-1]:.2f} s, "
              + ", ".join(f"{r.name} {r.times[-1]:.2f} s" for r in peers), flush=True)
        load.append(os.getloadavg()[0])
    ratios = {r.name: [p / a for p, a in zip(plain.times, r.times)] for r in peers}
    acc = {r.name: r.accuracy(xt, yt) for r in (plain, *peers)}

    rows = [("torch (eager)", statistics.median(plain.times), acc["torch"], "1.00x")]
    rows += [(f"torch + {r.name} (eager)", statistics.median(r.times),
              acc[r.name], f"{statistics.median(ratios[r.name]):.2f}x") for r in peers]
    compile_note = ""
    if not args.no_compile:
        # A fresh epoch of three fresh models, interleaved the same way: torch, the
        # accelerated model (and optimizer), and that model compiled.
        full = kinds[-1]
        fresh = [Run("torch", seed_model()), Run("eager", seed_model(), accelerate=full)]
        model = seed_model()
        compiled = Run("compiled", model, torch.compile(model, fullgraph=True),
                       accelerate=full)
        t0 = time.perf_counter()
        compiled.step(x[:BATCH], y[:BATCH])  # the compile itself, timed apart
        compile_s = time.perf_counter() - t0
        interleaved_epoch([*fresh, compiled], x, y, 0)
        t_torch, t_eager, dt = fresh[0].times[0], fresh[1].times[0], compiled.times[0]
        rows.append((f"torch + {CALLS[full]} + torch.compile(fullgraph=True), 1 epoch", dt,
                     compiled.accuracy(xt, yt), f"{t_torch / dt:.2f}x"))
        compile_note = (f"Compiled: a separate epoch of fresh models, interleaved: torch "
                        f"{t_torch:.2f} s, accelerated eager {t_eager:.2f} s "
                        f"({t_torch / t_eager:.2f}x), accelerated compiled {dt:.2f} s; "
                        f"inductor compile {compile_s:.1f} s before the first step (not in "
                        f"the epoch); its accuracy is after that single epoch.")
        load.append(os.getloadavg()[0])

    lines = [
        f"CPU: {cpu_name()}, {args.threads} threads (torch.set_num_threads and "
        f"fastnn.set_num_threads), torch {torch.__version__}; 1-minute load average "
        f"{min(load):.1f}-{max(load):.1f} during the run.",
        "",
        "| model | s / epoch (median) | test accuracy after the epochs | speedup vs torch |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {n} | {t:.2f} | {a:.2f}% | {s} |" for n, t, a, s in rows),
        "",
        f"{args.epochs} epochs each, interleaved every {CHUNK} batches; per-epoch ratios "
        + "; ".join(f"{n}: {', '.join(f'{v:.2f}' for v in rs)}" for n, rs in ratios.items())
        + " (speedup = median ratio). Accuracy difference vs torch: "
        + ", ".join(f"{r.name} {acc[r.name] - acc['torch']:+.2f} points" for r in peers)
        + ". Of each epoch, gathering the batches (`x[idx]`, `y[idx]`, median): "
        + ", ".join(f"{r.name} {statistics.median(r.loader_times):.2f} s"
                    for r in (plain, *peers))
        + f". {compile_note}",
    ]
    print("\n".join(lines))
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
