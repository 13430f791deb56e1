#!/usr/bin/env python3
"""Per-step A/B of the data-parallel step on 2 MPI ranks, interleaved, and the
best ratio the compute allows.

    mpiexec -n 2 python benchmarks/bench_mpi_steps.py            # 30 rounds of 10 steps
    mpiexec -n 2 python benchmarks/bench_mpi_steps.py --rounds 60

Seed model, global batch 128, Adam, 1 thread per rank, synthetic data (the
loader is not timed). Every round runs ``--steps`` steps of each variant, the
order reversed every other round, so load from other jobs falls on all of them:

* ``one``: one process, batch 128, on rank 0 (rank 1 sleeps in a barrier);
* ``bound``: each rank its batch of 64, forward, backward and Adam on half of
  the parameters, no communication at all: what 2 ranks could reach if
  communication cost nothing (it gives the compute scaling, the ceiling of any
  data-parallel scheme that shards the optimizer);
* ``allreduce``: DistributedDataParallel, Allreduce, Adam on all parameters;
* ``shard``: DistributedDataParallel with ``shard_optimizer`` (the CLI's default).

It prints, per variant, the 10th/25th percentile and the median step time and
the ratio to ``one`` at each (on a shared machine the low percentiles are the
steps no other job interrupted), and the phase split
(:data:`fastnn.distributed.PHASES`) of the fastest quarter of the steps, then
the cost of the collectives alone on the seed model's gradient (both ranks
enter together, nothing else running): Iallreduce, Ireduce_scatter and an
in-place Iallgatherv, with a local copy of the same bytes for scale.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastnn  # noqa: E402
import fastnn.distributed as dist  # noqa: E402
from fastnn import functional as F  # noqa: E402
from fastnn import optim  # noqa: E402
from fastnn.autograd import Tensor  # noqa: E402
from fastnn.models import build_model  # noqa: E402

VARIANTS = ("one", "bound", "allreduce", "shard")


def build(variant: str, world: dist.World) -> tuple:
    model = build_model("seed", 0)
    if variant == "bound":
        return model, {}
    opt = optim.Adam(model.parameters(), lr=1e-3)
    if variant == "one":
        return model, opt
    ddp = dist.DistributedDataParallel(model, world)
    return ddp, ddp.shard_optimizer(opt) if variant == "shard" else opt


def bound_step(model: object, state: dict, x: np.ndarray, y: np.ndarray) -> None:
    loss = F.cross_entropy(model(Tensor(x)), y)
    for p in model.parameters():
        p.grad = None
    loss.backward()
    # Adam on the first half of every parameter: the sharded optimizer's work.
    for p in model.parameters():
        n = p.data.size // 2
        m, v = state.setdefault(id(p), (np.zeros(n, np.float32), np.zeros(n, np.float32)))
        F.adam_step(p.data.reshape(-1)[:n], p.grad.reshape(-1)[:n], m, v, 1, 1e-3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps", type=int, default=10, help="steps of a variant per round")
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    world = dist.init()
    if world.size != 2:
        sys.exit("run under mpiexec -n 2")
    fastnn.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    g = args.batch_size
    lo, hi = dist.share_bounds(g, world.rank, world.size)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((8, g, 1, 28, 28)).astype(np.float32)
    ys = rng.integers(0, 10, (8, g))
    runs = {v: build(v, world) for v in VARIANTS}
    took: dict[str, list[float]] = {v: [] for v in VARIANTS}
    phases: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    comm = world.comm

    def idle_barrier() -> None:
        req = comm.Ibarrier()
        while not req.Test():
            time.sleep(0.0005)  # leave the core to the other rank

    with fastnn.backend("cpu"):
        for rd in range(args.rounds):
            for v in VARIANTS if rd % 2 == 0 else VARIANTS[::-1]:
                model, opt = runs[v]
                idle_barrier()
                if v in ("allreduce", "shard"):
                    model.reset_times()  # the block's first step starts the clock
                for i in range(args.steps):
                    x, y = xs[i % 8], ys[i % 8]
                    before = dict(model.times) if v in ("allreduce", "shard") else None
                    t0 = time.perf_counter()
                    if v == "one":
                        if world.rank == 0:
                            loss = F.cross_entropy(model(Tensor(x)), y)
                            opt.zero_grad()
                            loss.backward()
                            opt.step()
                    elif v == "bound":
                        bound_step(model, opt, x[lo:hi], y[lo:hi])
                    else:
                        loss = F.cross_entropy(model(Tensor(x[lo:hi]), global_batch=g), y[lo:hi])
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                    if rd == 0 and i < 3:
                        continue  # warm-up
                    took[v].append(time.perf_counter() - t0)
                    if before is not None:
                        phases[v].append({k: model.times[k] - before[k] for k in before})
    if world.rank != 0:
        collectives(world, sum(p.data.size for p in runs["one"][0].parameters()))
        return 0
    one = np.array(took["one"]) * 1e3
    q = (10, 25, 50)
    print(f"CPU: {cpu_name()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"seed model, global batch {g}, Adam, 1 thread per rank, {args.rounds} rounds x "
          f"{args.steps} steps per variant, interleaved\n")
    print("| variant | p10 ms | p25 ms | median ms | ratio to one (p10 / p25 / median) |")
    print("| --- | --- | --- | --- | --- |")
    for v in VARIANTS:
        a = np.array(took[v]) * 1e3
        pa, po = np.percentile(a, q), np.percentile(one, q)
        ratio = "" if v == "one" else " / ".join(f"{o / x:.2f}x" for o, x in zip(po, pa))
        print(f"| {v} | {pa[0]:.2f} | {pa[1]:.2f} | {pa[2]:.2f} | {ratio} |")
    print("\nPhases of the fastest quarter of the steps, rank 0, ms (median):\n")
    print("| variant | " + " | ".join(dist.PHASES) + " |")
    print("| --- |" + " --- |" * len(dist.PHASES))
    for v in ("allreduce", "shard"):
        a = np.array(took[v])
        cut = np.percentile(a, 25)
        fast = [ph for ph, t in zip(phases[v], a) if t <= cut]
        cells = [f"{1e3 * float(np.median([f[k] for f in fast])):.2f}" for k in dist.PHASES]
        print(f"| {v} | " + " | ".join(cells) + " |")
    collectives(world, sum(p.data.size for p in runs["one"][0].parameters()))
    return 0


def collectives(world: dist.World, n: int, reps: int = 100) -> None:
    """Time the gradient's collectives alone (rank 0 prints)."""
    from mpi4py import MPI

    comm = world.comm
    grad = np.ones(n, np.float32)
    counts = [hi - lo for lo, hi in (dist.share_bounds(n, r, 2) for r in range(2))]
    displs = [0, counts[0]]
    part = np.empty(counts[world.rank], np.float32)
    full = np.ones(n, np.float32)
    other = np.empty(n, np.float32)
    ops = {
        "Iallreduce (in place)": lambda: comm.Iallreduce(MPI.IN_PLACE, grad, op=MPI.SUM).Wait(),
        "Ireduce_scatter": lambda: comm.Ireduce_scatter(grad, part, counts, op=MPI.SUM).Wait(),
        "Iallgatherv (in place)": lambda: comm.Iallgatherv(
            MPI.IN_PLACE, [full, (counts, displs)]).Wait(),
        "local copy of the gradient (np.copyto)": lambda: np.copyto(other, grad),
    }
    rows = []
    for name, op in ops.items():
        ts = []
        for _ in range(reps):
            comm.Barrier()
            t0 = time.perf_counter()
            op()
            ts.append(time.perf_counter() - t0)
        rows.append((name, *(1e3 * np.percentile(ts, (10, 50)))))
    if world.rank == 0:
        print(f"\nCollectives on {n} float32 ({4 * n / 1e6:.2f} MB), {reps} times:\n")
        print("| operation | p10 ms | median ms |")
        print("| --- | --- | --- |")
        for name, p10, med in rows:
            print(f"| {name} | {p10:.3f} | {med:.3f} |")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
