"""``fastnn bench``: time fastnn's ops against the NumPy reference and PyTorch.

    fastnn bench --quick                      # MNIST shapes, under a minute
    fastnn bench                              # the full sweep (same as --full)
    fastnn bench --ops conv2d,matmul --backends cpu,torch --json out.json
    fastnn bench --compare old.json --plot bench.png

Also ``python -m fastnn.bench``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fastnn._malloc import retain_freed_memory
from fastnn.bench import machine as machine_mod
from fastnn.bench import report
from fastnn.bench.cases import BACKENDS, known_op_names, select_cases
from fastnn.bench.runners import (
    backend_status,
    close_all,
    make_runners,
    participants,
    run_cases,
)

#: per mode: alternating rounds, seconds of samples per case and backend (split over
#: the rounds), seconds of warm-up before each round's samples.
MODES = {
    "quick": {"rounds": 2, "target_s": 0.12, "warmup_s": 0.08},
    "full": {"rounds": 3, "target_s": 0.45, "warmup_s": 0.12},
    "tiny": {"rounds": 1, "target_s": 0.002, "warmup_s": 0.0},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastnn bench",
        description="Benchmark fastnn's kernels and training step against the NumPy "
                    "reference and PyTorch (when installed).",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="MNIST layer shapes only, short timings (under a minute)")
    mode.add_argument("--full", action="store_true",
                      help="the full sweep (the default)")
    mode.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ops", default=None,
                   help="comma-separated op families or names: conv2d, matmul, max_pool2d, "
                        "avg_pool2d, elementwise, train, or e.g. conv2d_fwd; strong: the "
                        "strong preset's conv layers and step (default: all)")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated, from {','.join(BACKENDS)} (default: all available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--json", metavar="PATH", help="write machine info and results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of GFLOP/s per op and backend")
    p.add_argument("--compare", metavar="OLD_JSON",
                   help="compare against an earlier --json file: what got faster or regressed")
    p.add_argument("--tolerance", type=float, default=0.10,
                   help="--compare: relative change treated as noise (default 0.10)")
    p.add_argument("--rounds", type=int, default=None,
                   help="alternating rounds per case (default: 2 quick, 3 full)")
    p.add_argument("--isolate", choices=("none", "peers", "all"), default="peers",
                   help="run backends in their own processes: peers = torch only (default)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--count-launches", action="store_true",
                   help="with --ops train --backends cuda: kernel launches and host us per "
                        "seed-model step (counted, not executed, under the CUDA simulator)")
    return p


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastnn bench``; returns the exit status."""
    args = build_parser().parse_args(argv)
    mode = "quick" if args.quick else "tiny" if args.tiny else "full"
    ops = _split(args.ops)
    if ops:
        unknown = sorted(set(ops) - known_op_names())
        if unknown:
            print(f"fastnn bench: unknown --ops {', '.join(unknown)}; known families: "
                  "conv2d, matmul, max_pool2d, avg_pool2d, elementwise, train", file=sys.stderr)
            return 2
    cases = select_cases(mode, ops)
    if not cases:
        print("fastnn bench: no cases selected", file=sys.stderr)
        return 2
    if args.count_launches:
        return _count_launches(args, ops)
    if args.list:
        for c in cases:
            print(f"{c.op:28s} {c.shape:32s} {','.join(c.tags)}")
        return 0

    requested = _split(args.backends)
    if requested:
        bad = [b for b in requested if b not in BACKENDS]
        if bad:
            print(f"fastnn bench: unknown --backends {', '.join(bad)}; choose from "
                  f"{', '.join(BACKENDS)}", file=sys.stderr)
            return 2
    backends = []
    for b in requested or BACKENDS:
        ok, why = backend_status(b)
        if ok:
            backends.append(b)
        elif requested:
            print(f"note: skipping backend {b}: {why}", file=sys.stderr)
    if not backends:
        print("fastnn bench: none of the requested backends is available", file=sys.stderr)
        return 2

    old = None
    if args.compare:
        try:
            old = report.load_json(args.compare)
        except ValueError as exc:
            print(f"fastnn bench: {exc}", file=sys.stderr)
            return 2

    cfg = MODES[mode]
    rounds = args.rounds or cfg["rounds"]
    # Every peer (this process and each worker) runs with glibc keeping freed memory,
    # as `fastnn train` does: a training step's frees and page faults are then what
    # the CLI pays, and the peers share one allocator setting.
    retain_freed_memory()
    info = machine_mod.machine_info()
    notes = [n for n in (machine_mod.openblas_note(), machine_mod.busy_note()) if n]
    for n in notes:
        print(n, file=sys.stderr)
    print("measuring this machine's ceilings (NumPy sgemm, copy bandwidth) ...", file=sys.stderr)
    ceilings = machine_mod.measure_ceilings(mode)

    foreign = machine_mod.ForeignCPU()
    runners = make_runners(backends, args.isolate)
    try:
        for b, r in runners.items():
            try:
                info.setdefault("threads", {})[b] = r.info().get("threads")
            except Exception as exc:  # noqa: BLE001 - the cases will report the failure
                info.setdefault("threads", {})[b] = f"error: {exc}"
        numpy_heavy = bool(requested and "numpy" in requested)
        total = sum(len(participants(c, backends, numpy_heavy)) for c in cases) * rounds
        bar = Progress(total, not args.no_progress)
        try:
            results = run_cases(cases, runners, dtype=args.dtype, rounds=rounds,
                                target_s=cfg["target_s"], warmup_s=cfg["warmup_s"],
                                numpy_heavy=numpy_heavy,
                                progress=bar.step)
        finally:
            bar.close()
    finally:
        close_all(runners)
    info["foreign_cpu_share"] = foreign.share()
    # Again at the end: the best of both is the ceiling (a busy moment only hides it).
    info.update(machine_mod.best_ceilings(ceilings, machine_mod.measure_ceilings(mode)))
    notes += [n for n in [machine_mod.foreign_note(info["foreign_cpu_share"])] if n]

    rows = report.result_rows(results, info)
    print(report.format_machine(info))
    for n in notes:
        print(n)
    print(report.format_table(rows, markdown=args.markdown))
    doc = report.to_json(info, rows, {"mode": mode, "dtype": args.dtype, "rounds": rounds,
                                      "backends": backends, "argv": list(argv or sys.argv[1:])})
    if "cpu" in backends and any(c.family == "train" for c in cases) and args.dtype == "float32":
        doc["profiles"] = _print_profiles(cases, rows, info, mode)
    if args.json:
        report.write_json(args.json, doc)
        print(f"wrote {args.json}")
    if old is not None:
        print(f"\ncompared with {args.compare} (ratio = old/new time; > 1 is faster now):")
        print(report.format_compare(report.compare(old["results"], rows, args.tolerance)))
    if args.plot:
        try:
            report.plot(rows, args.plot)
            print(f"wrote {args.plot}")
        except (RuntimeError, ValueError) as exc:
            print(f"fastnn bench: {exc}", file=sys.stderr)
            return 1
    return 0


def _print_profiles(cases: list[Any], rows: list[dict[str, Any]], info: dict[str, Any],
                    mode: str) -> list[dict[str, Any]]:
    """The cpu training step's per-op profile (:mod:`fastnn.bench.profile`) of each
    model with a ``train_step`` case, printed under the table; returned for the JSON."""
    from fastnn.bench import profile

    epoch = next((r["epoch_s"] for r in rows if r["op"] == "train_mnist"
                  and r["backend"] == "cpu" and "epoch_s" in r), None)
    out = []
    for c in cases:
        if c.op != "train_step":
            continue
        model = c.params.get("model", "seed")
        steps = 3 if mode == "tiny" else 30
        p = profile.profile_train_step(model, "cpu", c.params["N"], steps=steps,
                                       warmup=1 if mode == "tiny" else 5)
        print()
        print(profile.format_profile(p, info["sgemm_gflops"], info["copy_gb_s"],
                                     epoch_seconds=epoch if model == "seed" else None))
        out.append(profile.to_json(p, info["sgemm_gflops"], info["copy_gb_s"]))
    return out


def _count_launches(args: argparse.Namespace, ops: list[str] | None) -> int:
    """``--count-launches``: the cuda training step's launches and host time."""
    from fastnn.bench import launches

    if _split(args.backends) != ["cuda"] or not ops or not all(o.startswith("train") for o in ops):
        print("fastnn bench: --count-launches needs --ops train --backends cuda", file=sys.stderr)
        return 2
    from fastnn.backends._cuda.launch import runtime_or_none

    rt, why = runtime_or_none()  # a GPU, or Numba's simulator (NUMBA_ENABLE_CUDASIM=1)
    if rt is None:
        print(f"fastnn bench: the cuda backend is unavailable: {why}", file=sys.stderr)
        return 2
    doc = launches.count_train_launches()
    print(launches.format_counts(doc))
    if args.json:
        report.write_json(args.json, {"count_launches": doc, "machine": machine_mod.machine_info()})
        print(f"wrote {args.json}")
    return 0


class Progress:
    """A tqdm bar on stderr when it is a terminal; otherwise nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, file=sys.stderr, unit="run", leave=False)
            except ImportError:
                pass

    def step(self, desc: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(desc, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


if __name__ == "__main__":
    raise SystemExit(main())
