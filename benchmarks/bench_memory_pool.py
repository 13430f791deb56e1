#!/usr/bin/env python3
"""A user's own training loop with and without fastnn's pool of freed output
blocks: milliseconds, minor page faults and system CPU time per step.

"Your own loop" means what a library user writes: ``train_step`` (model forward,
backward, optimizer step) over one fixed batch, without the glibc settings that
``fastnn train`` adds (``fastnn.retain_freed_memory``). The pool is turned off
by ``FASTNN_MEMORY_POOL_LIMIT=0`` (outputs then come from NumPy's allocator).
Each configuration runs in its own process, alternating round by round, because
this machine's speed moves within minutes; the table gives per-round medians and
the median of the per-round ratios.

    python benchmarks/bench_memory_pool.py --model strong --rounds 5 --steps 20

(with a development build instead of an install: ``PYTHONPATH=$PWD python ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
import fastnn
from fastnn.bench.train_cases import step_batch
from fastnn.models import build_model
from fastnn.training import TrainConfig, build_optimizer, train_step

name, steps = sys.argv[1], int(sys.argv[2])
model = build_model(name, 0)
model.train()
opt = build_optimizer(TrainConfig(model=name), model.parameters())
x, y = step_batch(128, "float32")
with fastnn.backend("cpu"):
    for _ in range(3):
        train_step(model, opt, x, y)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, x, y)
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "ms": (t1 - t0) / steps * 1e3,
    "faults": (r1.ru_minflt - r0.ru_minflt) / steps,
    "sys_ms": (r1.ru_stime - r0.ru_stime) / steps * 1e3,
    "pool": fastnn.memory_pool_stats(),
}))
"""


def _fastnn_root() -> Path:
    """The folder holding the fastnn this script imports (installed, or a checkout
    on PYTHONPATH with a development build): the children import the same one."""
    import fastnn

    return Path(fastnn.__file__).resolve().parents[1]


def run(model: str, steps: int, pool: bool) -> dict:
    root = _fastnn_root()
    env = dict(os.environ, PYTHONPATH=str(root))
    env.pop("FASTNN_MEMORY_POOL_LIMIT", None)
    if not pool:
        env["FASTNN_MEMORY_POOL_LIMIT"] = "0"
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, model, str(steps)],
        env=env, cwd=root, capture_output=True, text=True, check=True, timeout=1800,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="strong", choices=["seed", "strong"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)

    rows: dict[bool, list[dict]] = {True: [], False: []}
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for pool in order:
            rows[pool].append(run(args.model, args.steps, pool))
        off, on = rows[False][-1], rows[True][-1]
        print(f"round {r + 1}: pool off {off['ms']:.2f} ms ({off['faults']:.0f} faults), "
              f"on {on['ms']:.2f} ms ({on['faults']:.0f} faults)", file=sys.stderr)

    def med(pool: bool, key: str) -> float:
        return statistics.median(x[key] for x in rows[pool])

    ratio = statistics.median(a["ms"] / b["ms"] for a, b in zip(rows[False], rows[True]))
    print(f"{args.model} step, batch 128, {args.rounds} rounds x {args.steps} steps, "
          f"{fastnn_threads()} threads")
    print("| pool | ms/step | minor faults/step | system ms/step |")
    print("| --- | ---: | ---: | ---: |")
    for pool, label in ((False, "off (FASTNN_MEMORY_POOL_LIMIT=0)"), (True, "on (default)")):
        print(f"| {label} | {med(pool, 'ms'):.2f} | {med(pool, 'faults'):.1f} | "
              f"{med(pool, 'sys_ms'):.2f} |")
    print(f"step time off/on, median of the per-round ratios: {ratio:.2f}x")
    return 0


def fastnn_threads() -> int:
    import fastnn

    return fastnn.get_num_threads()


if __name__ == "__main__":
    raise SystemExit(main())
