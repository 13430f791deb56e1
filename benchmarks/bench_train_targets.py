#!/usr/bin/env python3
"""The training-speed targets of "training at the machine's limit", measured as
ratios in one run, with PASS/FAIL per target:

* ``fastnn train --model seed``: its epoch within 2x of its FLOP floor (the step's
  GEMM/conv FLOPs, counted from one profiled step, times the epoch's steps, at
  NumPy's sgemm rate measured here with the OpenBLAS overrides removed, right
  before each round's fastnn epoch: this machine's speed moves within minutes, so
  each round's epoch is set against its own floor and the median ratio is
  reported), and at least 4x faster than the same model in PyTorch;
* ``fastnn train --model strong``: its epoch at least 2x faster than PyTorch's.

Each peer runs in its own process, alternating round by round: fastnn as the real
``fastnn train`` command (its per-epoch ``seconds`` from ``--metrics-json``: the
training pass with data loading, no evaluation), PyTorch as the same model, the
same Adam (lr 1e-3), batch 128 and shuffled batches gathered and normalised per
step, with ``torch.set_num_threads`` equal to fastnn's thread count. Every round
trains two epochs on ``--limit-train`` images and keeps the second (warm)
epoch, scaled to 60,000 images.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE FASTNN_DATA_DIR=... \\
        python benchmarks/bench_train_targets.py --rounds 3 [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MNIST_TRAIN = 60000
OUT = REPO / "benchmarks" / "results" / "train_targets.md"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def fastnn_epoch(model: str, limit: int, threads: int) -> float:
    """Seconds of the second epoch of ``fastnn train``, scaled to 60,000 images."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "m.json"
        cmd = [sys.executable, "-m", "fastnn", "train", "--model", model, "--epochs", "2",
               "--limit-train", str(limit), "--limit-test", "500", "--no-progress",
               "--threads", str(threads), "--metrics-json", str(metrics)]
        subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL)
        epochs = json.loads(metrics.read_text())["epochs"]
    return epochs[-1]["seconds"] * MNIST_TRAIN / epochs[-1]["train_images"]


def torch_epoch(model: str, limit: int, threads: int) -> float:
    """Seconds of PyTorch's second epoch on the same model and data (own process)."""
    out = subprocess.run([sys.executable, __file__, "--worker-torch", model, "--limit",
                          str(limit), "--threads", str(threads)], env=_env(),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the torch worker failed:\n{out.stderr}")
    return float(out.stdout.strip().splitlines()[-1])


def _torch_worker(model: str, limit: int, threads: int) -> None:
    import numpy as np
    import torch

    from fastnn.bench.torch_peer import preset_model
    from fastnn.bench.train_cases import mnist_train_arrays
    from fastnn.data.loader import MNIST_MEAN, MNIST_STD

    torch.set_num_threads(threads)
    images, labels, _ = mnist_train_arrays(limit)
    net = preset_model(torch, "float32", model)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels)
    mean, std = MNIST_MEAN * 255, MNIST_STD * 255
    n = 128
    seconds = 0.0
    for epoch in range(2):
        order = torch.from_numpy(np.random.default_rng([0, epoch]).permutation(len(labels)))
        t0 = time.perf_counter()
        for i in range(0, len(labels) - n + 1, n):
            idx = order[i:i + n]
            xb = ((images_t[idx].float() - mean) / std).reshape(n, 1, 28, 28)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(xb), labels_t[idx]).backward()
            opt.step()
        seconds = time.perf_counter() - t0
    print(seconds * MNIST_TRAIN / (len(labels) // n * n))


def seed_epoch_gflop() -> float:
    """The seed epoch's GEMM and conv GFLOP: one profiled step's FLOPs times 469
    steps (its floor is this at the measured sgemm rate)."""
    from fastnn.bench.profile import profile_train_step

    p = profile_train_step("seed", steps=3, warmup=1)
    return p.flops_per_step * (MNIST_TRAIN // 128) / 1e9


def sgemm_clean() -> float:
    """NumPy's sgemm GFLOP/s at 2048^2, in a child without the OpenBLAS overrides."""
    env = {k: v for k, v in _env().items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    code = "from fastnn.bench.machine import sgemm_peak; print(sgemm_peak(2048, 5))"
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True,
                         text=True)
    return float(out.stdout.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed-limit", type=int, default=60000, help="seed epoch images")
    ap.add_argument("--strong-limit", type=int, default=6400, help="strong epoch images")
    ap.add_argument("--threads", type=int, default=0, help="0: fastnn's default")
    ap.add_argument("--models", default="seed,strong")
    ap.add_argument("--write", action="store_true", help=f"also write {OUT.relative_to(REPO)}")
    ap.add_argument("--worker-torch", help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_torch:
        _torch_worker(args.worker_torch, args.limit, args.threads)
        return 0

    import fastnn
    from fastnn.bench import machine

    threads = args.threads or fastnn.get_num_threads()
    cpu = machine.cpu_model()
    load = machine.load_average()
    gflop = seed_epoch_gflop()
    models = args.models.split(",")
    times: dict[str, dict[str, list[float]]] = {m: {"fastnn": [], "torch": []} for m in models}
    sgemms: list[float] = []  # measured right before each round's seed fastnn epoch
    for r in range(args.rounds):
        for m in models:
            limit = args.seed_limit if m == "seed" else args.strong_limit
            peers = [("fastnn", fastnn_epoch), ("torch", torch_epoch)]
            for name, fn in peers if r % 2 == 0 else peers[::-1]:
                if m == "seed" and name == "fastnn":
                    sgemms.append(sgemm_clean())
                t = fn(m, limit, threads)
                times[m][name].append(t)
                extra = f" (sgemm {sgemms[-1]:.0f} GFLOP/s just before)" if (
                    m == "seed" and name == "fastnn") else ""
                print(f"round {r + 1}: {m} {name} {t:.2f} s/epoch{extra}", file=sys.stderr,
                      flush=True)
    sgemm = statistics.median(sgemms) if sgemms else sgemm_clean()
    floor_s = gflop / sgemm
    # Each round's seed epoch against the floor at that round's sgemm rate.
    floor_ratios = [t * g / gflop for t, g in zip(times.get("seed", {}).get("fastnn", []),
                                                 sgemms)]

    rows = []
    for m in models:
        f, t = statistics.median(times[m]["fastnn"]), statistics.median(times[m]["torch"])
        spread = f"{min(times[m]['fastnn']):.2f}-{max(times[m]['fastnn']):.2f}"
        tspread = f"{min(times[m]['torch']):.2f}-{max(times[m]['torch']):.2f}"
        if m == "seed":
            ratio = statistics.median(floor_ratios)
            rows.append((m, "epoch <= 2x its FLOP floor", f"{f:.2f} s ({spread})",
                         f"floor {floor_s:.2f} s", f"{ratio:.2f}x floor "
                         f"({min(floor_ratios):.2f}-{max(floor_ratios):.2f})",
                         "PASS" if ratio <= 2 else "FAIL"))
            rows.append((m, "epoch >= 4x PyTorch", f"{f:.2f} s", f"{t:.2f} s ({tspread})",
                         f"{t / f:.2f}x", "PASS" if t >= 4 * f else "FAIL"))
        else:
            rows.append((m, "epoch >= 2x PyTorch", f"{f:.2f} s ({spread})",
                         f"{t:.2f} s ({tspread})", f"{t / f:.2f}x",
                         "PASS" if t >= 2 * f else "FAIL"))
    lines = [
        "# Training targets (fastnn train vs PyTorch, epoch floor)",
        "",
        f"Measured {time.strftime('%Y-%m-%dT%H:%M:%S%z')} on {cpu}, {threads} threads per peer "
        f"(load average {load} at the start), {args.rounds} alternating rounds, median "
        f"(min-max); epochs scaled to 60,000 images from {args.seed_limit} (seed) and "
        f"{args.strong_limit} (strong) images. Command: `env -u OPENBLAS_CORETYPE -u "
        f"OPENBLAS_L2_SIZE python benchmarks/bench_train_targets.py --rounds {args.rounds}`.",
        "",
        f"NumPy sgemm (2048^2, OpenBLAS overrides removed), measured right before each "
        f"round's seed epoch: {', '.join(f'{g:.0f}' for g in sgemms)} GFLOP/s (median "
        f"{sgemm:.0f}); the seed epoch's products: {gflop:.0f} GFLOP, so its floor is "
        f"{floor_s:.2f} s at the median rate. The floor ratio is the median over rounds of "
        f"each round's epoch against its own round's floor.",
        "",
        "| model | target | fastnn | peer | ratio | result |",
        "|---|---|---:|---:|---:|---|",
        *[f"| {' | '.join(r)} |" for r in rows],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        OUT.write_text(text)
        print(f"wrote {OUT.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
