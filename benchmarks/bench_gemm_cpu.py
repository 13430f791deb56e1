#!/usr/bin/env python3
"""fastnn's float32 GEMM (``_C.matmul``) against NumPy/OpenBLAS at the shapes of the
"training at the machine's limit" issue, with the cache geometry fastnn blocked for.

    python benchmarks/bench_gemm_cpu.py                       # detected caches
    python benchmarks/bench_gemm_cpu.py --cache-sizes l1d=32K,l2=1M,l3=32M --cache-sizes ""

Target: >= 1.0x NumPy at 512^2, 1024^2, 2048^2 and the MNIST linear products
(128x5408x128 forward x @ W^T, and the two backward products), same thread count.

How it measures: fastnn's ``cpu`` backend and NumPy (``numpy.matmul`` on transposed
views) each run in their own worker process (``fastnn.bench.runners.WorkerRunner``);
the NumPy worker runs with ``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` removed; peers
alternate round by round and a case's time is the median (or best, ``--stat best``)
of all samples. Each ``--cache-sizes`` spec ("" = as detected) starts a fastnn worker
with ``FASTNN_CACHE_SIZES`` set to it, so blocking for another vendor's caches can be
timed on this CPU. The header names the CPU, its caches and the blocking chosen.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from fastnn.bench import machine  # noqa: E402
from fastnn.bench.cases import matmul_case, mnist_linear_cases  # noqa: E402
from fastnn.bench.runners import WorkerRunner, backend_status, close_all, run_cases  # noqa: E402

SQUARES = (512, 1024, 2048)
TARGET = 1.0


def cases() -> list:
    return [matmul_case(s, s, s) for s in SQUARES] + mnist_linear_cases()


def _blocking_for(spec: str) -> str:
    """cpu_cache_info() under ``spec`` (applied in this process, then restored)."""
    from fastnn import _C
    from fastnn._config import cpu_cache_info

    before = os.environ.get("FASTNN_CACHE_SIZES", "")
    _C.set_cache_sizes(spec)
    try:
        c = cpu_cache_info()
    finally:
        _C.set_cache_sizes(before)
    return f"{c['caches']}; sgemm {c['gemm_float32']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-sizes", action="append", default=None, metavar="SPEC",
                   help='FASTNN_CACHE_SIZES for a fastnn worker (repeatable; "" = detected)')
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per case")
    p.add_argument("--seconds", type=float, default=1.0,
                   help="seconds of samples per case and peer, over all rounds")
    p.add_argument("--stat", choices=("median", "best"), default="median")
    args = p.parse_args(argv)
    specs = args.cache_sizes if args.cache_sizes is not None else [""]

    ok, why = backend_status("cpu")
    if not ok:
        print(f"bench_gemm_cpu: the cpu backend is unavailable ({why})", file=sys.stderr)
        return 2
    info = machine.machine_info()
    busy = machine.busy_note()
    if busy:
        print(busy, file=sys.stderr)
    foreign = machine.ForeignCPU()
    runners: dict = {"numpy": WorkerRunner("numpy", drop_env=machine.OPENBLAS_VARS)}
    saved = os.environ.get("FASTNN_CACHE_SIZES")
    try:
        for i, spec in enumerate(specs):
            os.environ["FASTNN_CACHE_SIZES"] = spec
            runners[f"cpu{i}"] = WorkerRunner("cpu")
    finally:
        if saved is None:
            os.environ.pop("FASTNN_CACHE_SIZES", None)
        else:
            os.environ["FASTNN_CACHE_SIZES"] = saved
    try:
        blas = runners["numpy"].info().get("blas") or [{}]
        threads = {"numpy": blas[0].get("num_threads"),
                   "cpu": runners["cpu0"].info().get("threads")}
        results = run_cases(cases(), runners, rounds=args.rounds, target_s=args.seconds,
                            warmup_s=0.2)
    finally:
        close_all(runners)
    share = foreign.share()
    t: dict = {}
    for r in results:
        if r.timing is not None:
            t[(r.case.key, r.backend)] = (r.timing.best if args.stat == "best"
                                          else r.timing.median)
    head = ["case", "shape (M x K x N)", "NumPy GFLOP/s"]
    for spec in specs:
        head.append(f"fastnn GFLOP/s [{spec or 'detected'}]")
        head.append("ratio")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * 2 + " ---: |" * (1 + 2 * len(specs))]
    fails = 0
    keys = list(runners)
    for c in cases():
        flops = c.flops
        tn = t.get((c.key, "numpy"))
        row = [c.op.replace("matmul_", ""), c.shape,
               f"{flops / tn / 1e9:.1f}" if tn else "-"]
        for i in range(len(specs)):
            tf = t.get((c.key, keys[1 + i]))
            row.append(f"{flops / tf / 1e9:.1f}" if tf else "-")
            ratio = tn / tf if tn and tf else None
            if ratio is not None and ratio < TARGET:
                fails += 1
            row.append(f"{ratio:.2f}" if ratio is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    print(f"# float32 GEMM vs NumPy ({args.stat} of {args.rounds} alternating rounds)\n")
    print(f"- CPU: {info['cpu']}, {info['cores']} cores; fastnn {info.get('fastnn_isa')} "
          f"{threads['cpu']} threads, NumPy {threads['numpy']} threads")
    for spec in specs:
        print(f"- fastnn [{spec or 'detected'}]: {_blocking_for(spec)}")
    print(f"- load average at the start: {info.get('load_average')}; other processes' share "
          f"of the CPU during the run: {share if share is None else f'{share:.0%}'}")
    print()
    print("\n".join(lines))
    print(f"\nratio = NumPy time / fastnn time; target >= {TARGET:g}: "
          f"{'all met' if fails == 0 else f'{fails} below'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
