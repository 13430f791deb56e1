#!/usr/bin/env python3
"""Measure every CPU-speed target of the "CPU kernels at the hardware's limit" issue
as ratios in one run, and print a markdown table with PASS/FAIL per target.

    python benchmarks/bench_cpu_targets.py            # print the table
    python benchmarks/bench_cpu_targets.py --write    # also write benchmarks/results/cpu_targets.md

How it measures (float32; each peer's threads as installed, 2 on the reference machine):

* fastnn's ``cpu`` backend, the NumPy peer (``numpy.matmul`` for GEMM, the
  ``numpy`` reference backend otherwise) and PyTorch (when installed) each run in
  their own worker process, so no thread pool shares a process or spins against
  another; this parent process only coordinates.
* The NumPy worker runs with ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` removed
  from its environment (only there), so NumPy runs the OpenBLAS kernel it would pick
  for this CPU. The sgemm peak and copy bandwidth are measured in that worker too.
* Each case alternates the peers round by round (the order rotates), with a timed
  warm-up before each round's samples; a case's time is the median of all samples.

Targets (ratios are peer time / fastnn time, so above 1 means fastnn is faster):

* matmul: >= 0.9x NumPy for squares 256..2048 and the MNIST linear shape with its two
  backward products; >= 1.0x for small/skinny products.
* conv2d fwd / bwd-input / bwd-weight at N=32 and N=128 1->32 3x3 28x28 and N=128
  32->64 3x3 13x13 pad 1: >= 10x the NumPy reference and >= 2x PyTorch.
* max and avg pooling, forward+backward, N=128 C=32 26x26 2x2: >= 50% of the copy
  bandwidth and >= 3x PyTorch (per-pass rows are shown for information).
* training: the seed model's epoch time (200 Adam steps at batch 128 through fastnn's
  DataLoader/Tensor/nn/optim stack, scaled to 60,000 images) >= 3x faster than PyTorch.
* elementwise ops and single training steps: reported (GB/s, % of copy bandwidth,
  ratios), no target.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from fastnn.bench import machine, report  # noqa: E402
from fastnn.bench.cases import (  # noqa: E402
    CONV_PASSES,
    MNIST_CONVS,
    MNIST_POOL,
    SQUARES,
    Case,
    conv_case,
    elementwise_cases,
    matmul_case,
    mnist_linear_cases,
    pool_case,
    small_matmul_cases,
    train_mnist_case,
    train_step_case,
)
from fastnn.bench.cli import Progress  # noqa: E402
from fastnn.bench.runners import (  # noqa: E402
    WorkerRunner,
    backend_status,
    close_all,
    run_cases,
)

RESULTS = REPO / "benchmarks" / "results" / "cpu_targets.md"


@dataclass
class Target:
    """One row: ``cases`` are timed and their times summed (fwd+bwd rows sum two).

    ``goals`` maps a peer (``numpy``, ``torch``) to the minimum speedup over it, or
    ``copy`` to the minimum fraction of the copy bandwidth. Empty: informational.
    """

    group: str
    label: str
    cases: list[Case]
    goals: dict[str, float]


def targets() -> list[Target]:
    out: list[Target] = []
    for s in SQUARES:
        out.append(Target("matmul", "square", [matmul_case(s, s, s)], {"numpy": 0.9}))
    for c in mnist_linear_cases():
        out.append(Target("matmul", c.op.replace("matmul_", ""), [c], {"numpy": 0.9}))
    for c in small_matmul_cases():
        out.append(Target("matmul", "small/skinny", [c], {"numpy": 1.0}))
    for n, cin, hw, o, p in MNIST_CONVS:
        for op in CONV_PASSES:
            out.append(Target("conv2d", op.replace("conv2d_", ""),
                              [conv_case(op, n, cin, hw, o, 3, 1, p)],
                              {"numpy": 10.0, "torch": 2.0}))
    for kind in ("max", "avg"):
        fwd = pool_case(f"{kind}_pool2d_fwd", *MNIST_POOL)
        bwd = pool_case(f"{kind}_pool2d_bwd", *MNIST_POOL)
        out.append(Target("pool", f"{kind} fwd", [fwd], {}))
        out.append(Target("pool", f"{kind} bwd", [bwd], {}))
        out.append(Target("pool", f"{kind} fwd+bwd", [fwd, bwd], {"copy": 0.5, "torch": 3.0}))
    for c in elementwise_cases():
        out.append(Target("elementwise", c.op, [c], {}))
    out.append(Target("train", "train_step", [train_step_case(128)], {}))
    # The training issue's target: epoch time at least 3x faster than PyTorch (the
    # NumPy reference is left out: an epoch of it takes minutes).
    out.append(Target("train", "train_mnist (epoch)", [train_mnist_case(128, 200, ("heavy",))],
                      {"torch": 3.0}))
    return out


def _describe(t: Target) -> str:
    return f"{t.group} {t.label} {' + '.join(c.shape for c in t.cases)}"


def _goal_text(goals: dict[str, float]) -> str:
    names = {"numpy": "NumPy", "torch": "torch"}
    parts = []
    for k, v in goals.items():
        parts.append(f">= {v:.0%} copy" if k == "copy" else f">= {v:g}x {names[k]}")
    return ", ".join(parts) or "-"


def evaluate(tgts: list[Target], medians: dict[tuple, float], ceilings: dict) -> list[dict]:
    """Per target: summed times, throughput, ratios, distance to the floor, verdict."""
    rows = []
    for t in tgts:
        def total(backend: str, t: Target = t) -> float | None:
            times = [medians.get((c.op, c.shape, backend)) for c in t.cases]
            return None if any(v is None for v in times) else sum(times)

        cpu = total("cpu")
        flops = sum(c.flops for c in t.cases)
        nbytes = sum(c.bytes for c in t.cases)
        row = {"group": t.group, "target": t.label,
               "shape": t.cases[0].shape, "goal": _goal_text(t.goals), "cpu_s": cpu}
        if cpu is None:
            row["result"] = "ERROR" if t.goals else "info"
            rows.append(row)
            continue
        metric = t.cases[0].metric
        if metric == "gb_s":
            row["throughput"] = f"{nbytes / cpu / 1e9:.1f} GB/s"
        elif metric == "images_s":
            rate = t.cases[0].images / cpu
            row["throughput"] = f"{rate:,.0f} img/s"
            if t.cases[0].op == "train_mnist":
                row["throughput"] += f", {report.MNIST_TRAIN_IMAGES / rate:.1f} s/epoch"
        else:
            row["throughput"] = f"{flops / cpu / 1e9:.1f} GFLOP/s"
        for peer in ("numpy", "torch"):
            base = total(peer)
            if base is not None:
                row[f"vs_{peer}"] = base / cpu
        if ceilings.get("copy_gb_s") and metric == "gb_s":
            row["copy_frac"] = nbytes / cpu / 1e9 / ceilings["copy_gb_s"]
        # The time this work cannot beat: FLOPs at the sgemm peak, bytes at copy speed.
        floor = max(flops / (ceilings.get("sgemm_gflops") or math.inf) / 1e9 if metric != "gb_s"
                    else 0.0, nbytes / (ceilings.get("copy_gb_s") or math.inf) / 1e9)
        if floor > 0:
            row["x_floor"] = cpu / floor
        fails = []
        for k, goal in t.goals.items():
            got = row.get("copy_frac" if k == "copy" else f"vs_{k}")
            if got is None:
                fails.append(f"no {k}")
            elif got < goal:
                fails.append(k)
        if not t.goals:
            row["result"] = "info"
        elif any(f.startswith("no ") for f in fails) and len(fails) == len(t.goals):
            row["result"] = "n/a (" + ", ".join(fails) + ")"
        else:
            row["result"] = "PASS" if not fails else "FAIL (" + ", ".join(fails) + ")"
        rows.append(row)
    return rows


def _pct(v: float | None) -> str:
    return "unknown" if v is None else f"{v:.0%}"


def markdown(rows: list[dict], info: dict, ceilings: dict, threads: dict, argv: list[str],
             has_torch: bool) -> str:
    def ratio(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    head = ["group", "target", "shape", "fastnn cpu", "throughput", "vs NumPy"]
    head += ["vs torch"] if has_torch else []
    head += ["% copy bw", "x floor", "goal", "result"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 5) + ["---", "---"]) + "|"]
    for r in rows:
        cells = [r["group"], r["target"], r["shape"], report.fmt_time(r.get("cpu_s")),
                 r.get("throughput", "-"), ratio(r.get("vs_numpy"))]
        cells += [ratio(r.get("vs_torch"))] if has_torch else []
        cells += [f"{100 * r['copy_frac']:.0f}%" if "copy_frac" in r else "-",
                  f"{r['x_floor']:.1f}" if "x_floor" in r else "-", r["goal"], r["result"]]
        lines.append("| " + " | ".join(cells) + " |")
    n_pass = sum(r["result"] == "PASS" for r in rows)
    n_goal = sum(r["result"] != "info" for r in rows)
    blas = "; ".join(f"{b.get('internal_api')} {b.get('version')} {b.get('architecture')} "
                     f"kernel, {b.get('num_threads')} threads"
                     for b in threads.get("numpy_blas", []))
    text = [
        "# fastnn CPU targets",
        "",
        f"{n_pass} of {n_goal} targets pass. Measured {info['date']} with "
        f"`python benchmarks/bench_cpu_targets.py {' '.join(argv)}`.".rstrip(),
        "",
        "\n".join(lines),
        "",
        "Ratios are peer time / fastnn time (above 1: fastnn is faster). `x floor` is fastnn's "
        "time over the floor: FLOPs at the sgemm peak or bytes at the copy bandwidth, "
        "whichever is longer; below 1 means the kernel does less work than the nominal count "
        "(e.g. Winograd conv) or the data stays in cache. fwd+bwd pooling rows sum both "
        "passes.",
        "",
        "## Machine",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores; {info['platform']}",
        f"- Python {info['python']}, NumPy {info['numpy']} ({blas or 'BLAS unknown'}; "
        "measured with OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset)",
        f"- fastnn {info['fastnn']}, ISA {info.get('fastnn_isa')}, "
        f"{threads.get('cpu')} threads" + (f"; torch {info['torch']}, "
                                            f"{threads.get('torch')} threads" if has_torch else ""),
        f"- NumPy sgemm {ceilings['sgemm_n']}^2 float32: {ceilings['sgemm_gflops']:.1f} GFLOP/s; "
        f"copy {ceilings['copy_mib']} MiB: {ceilings['copy_gb_s']:.1f} GB/s "
        f"(4 MiB in cache: {ceilings['copy_cache_gb_s']:.1f} GB/s); best of the start and "
        "the end of this run",
        f"- load average at the start: {info.get('load_average')}; other processes' share "
        f"of the CPU during the run: {_pct(info.get('foreign_cpu_share'))}",
        "",
        f"Each peer ran in its own process; peers alternated round by round on every case; "
        f"times are the {info.get('stat', 'median')} of all samples.",
    ]
    share = info.get("foreign_cpu_share")
    if share is not None and share >= 0.05:
        text.insert(2, f"**Warning:** other processes used {share:.0%} of the CPU during this "
                       "run: on 2 cores every multi-threaded kernel then stalls at its barriers, "
                       "so these ratios are noisy. Re-run on an idle machine.\n")
    return "\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"write the table to {RESULTS}")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per case")
    p.add_argument("--seconds", type=float, default=0.6,
                   help="seconds of samples per case and peer, over all rounds")
    p.add_argument("--json", metavar="PATH", help="also write the raw rows as JSON")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    p.add_argument("--stat", choices=("median", "best"), default="median",
                   help="per-case statistic the ratios use (best resists a busy machine)")
    p.add_argument("--only", metavar="TEXT", action="append", default=[],
                   help="keep only targets whose 'group label shape' contains TEXT "
                        "(repeatable; e.g. --only conv2d --only 'pool max')")
    args = p.parse_args(argv)

    ok, why = backend_status("cpu")
    if not ok:
        print(f"bench_cpu_targets: the cpu backend is unavailable ({why}); build it with "
              "tools/dev_build.sh or pip install .", file=sys.stderr)
        return 2
    has_torch = not args.no_torch and backend_status("torch")[0]
    info = machine.machine_info()
    busy = machine.busy_note()
    if busy:
        print(busy, file=sys.stderr)
    foreign = machine.ForeignCPU()
    runners = {"cpu": WorkerRunner("cpu"),
               "numpy": WorkerRunner("numpy", drop_env=machine.OPENBLAS_VARS)}
    if has_torch:
        runners["torch"] = WorkerRunner("torch")
    try:
        threads = {b: r.info().get("threads") for b, r in runners.items()}
        threads["numpy_blas"] = runners["numpy"].info().get("blas", [])
        print("measuring the sgemm peak and copy bandwidth (NumPy worker) ...", file=sys.stderr)
        ceilings = runners["numpy"].ceilings("full")
        tgts = [t for t in targets()
                if not args.only or any(o in _describe(t) for o in args.only)]
        if not tgts:
            print(f"bench_cpu_targets: no target matches {args.only}", file=sys.stderr)
            return 2
        cases = list({c.key: c for t in tgts for c in t.cases}.values())
        bar = Progress(len(cases) * len(runners) * args.rounds, enabled=True)
        try:
            results = run_cases(cases, runners, rounds=args.rounds, target_s=args.seconds,
                                warmup_s=0.15, progress=bar.step)
        finally:
            bar.close()
        # Again at the end: the best of both is the ceiling (a busy moment only hides it).
        ceilings = machine.best_ceilings(ceilings, runners["numpy"].ceilings("full"))
    finally:
        close_all(runners)
    for r in results:
        if r.error:
            print(f"warning: {r.case.op} {r.case.shape} on {r.backend}: {r.error}",
                  file=sys.stderr)
    info["foreign_cpu_share"] = foreign.share()  # after close_all: workers reaped
    info["stat"] = args.stat
    medians = {(r.case.op, r.case.shape, r.backend): getattr(r.timing, args.stat)
               for r in results if r.timing is not None and r.timing.samples}
    rows = evaluate(tgts, medians, ceilings)
    text = markdown(rows, info, ceilings, threads, list(argv or sys.argv[1:]), has_torch)
    print(text)
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text, encoding="utf-8")
        print(f"wrote {RESULTS}", file=sys.stderr)
    if args.json:
        doc = report.to_json(dict(info, **ceilings, threads=threads),
                             report.result_rows(results, ceilings),
                             {"script": "bench_cpu_targets", "targets": rows,
                              "date": datetime.datetime.now().isoformat(timespec="seconds")})
        report.write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
