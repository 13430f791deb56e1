"""Turning timings into rows, tables, JSON, comparisons and plots.

A row (one per case and backend) is the JSON schema ``fastnn bench --json``
writes under ``"results"``::

    {"op": "conv2d_fwd", "shape": "N128 1->32 3x3 28x28", "backend": "cpu",
     "dtype": "float32", "median_s": 0.0012, "best_s": 0.0011, "samples": 30,
     "flops": ..., "bytes": ..., "metric": "gflops", "gflops": 52.1,
     "pct_peak": 11.3, "speedup_vs_numpy": 14.2, "speedup_vs_torch": 2.3}

``metric`` is ``gflops`` (compute-bound ops; ``pct_peak`` is against NumPy's
sgemm rate measured in the same run), ``gb_s`` (memory-bound ops; ``pct_peak``
is against the large-copy bandwidth) or ``images_s`` (training; ``gflops`` is
given too, and ``train_mnist`` adds ``epoch_s`` for 60,000 images). Speedups
are ``median(peer) / median(this)``: above 1 means this backend is faster
(``cuda`` rows get no torch ratio: the torch peer runs on the CPU). A failed case
has ``error`` instead of timings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastnn.bench.runners import Result

MNIST_TRAIN_IMAGES = 60000
SCHEMA_VERSION = 1


def result_rows(results: Sequence[Result], ceilings: dict[str, Any] | None = None) -> list[dict]:
    """JSON-ready rows with throughput, % of the machine's ceiling and speedups."""
    ceilings = ceilings or {}
    medians = {(r.case.op, r.case.shape, r.dtype, r.backend): r.timing.median
               for r in results if r.timing is not None and r.timing.samples}
    rows = []
    for r in results:
        c = r.case
        row: dict[str, Any] = {"op": c.op, "shape": c.shape, "backend": r.backend,
                               "dtype": r.dtype, "metric": c.metric}
        if r.note:
            row["note"] = r.note
        if r.timing is None or not r.timing.samples:
            row["error"] = r.error or "no samples"
            rows.append(row)
            continue
        t = r.timing.median
        row.update(median_s=t, best_s=r.timing.best, samples=len(r.timing.samples),
                   inner=r.timing.inner, flops=c.flops, bytes=c.bytes)
        # The ceilings are this host's CPU; they say nothing about a GPU.
        ceiling_applies = r.backend != "cuda"
        if c.metric == "gb_s":
            row["gb_s"] = c.bytes / t / 1e9
            if ceiling_applies and ceilings.get("copy_gb_s"):
                row["pct_peak"] = 100.0 * row["gb_s"] / ceilings["copy_gb_s"]
        else:
            row["gflops"] = c.flops / t / 1e9
            if c.metric == "gflops" and ceiling_applies and ceilings.get("sgemm_gflops"):
                row["pct_peak"] = 100.0 * row["gflops"] / ceilings["sgemm_gflops"]
        if c.metric == "images_s":
            row["images_s"] = c.images / t
            if c.op == "train_mnist":
                row["epoch_s"] = MNIST_TRAIN_IMAGES / row["images_s"]
        for peer in ("numpy", "torch"):
            if peer == "torch" and r.backend == "cuda":
                continue  # the torch peer runs on the CPU: no like-for-like ratio
            base = medians.get((c.op, c.shape, r.dtype, peer))
            if base is not None:
                row[f"speedup_vs_{peer}"] = base / t
        if r.error:  # a later round failed after earlier samples
            row["error"] = r.error
        rows.append(row)
    return rows


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_throughput(row: dict[str, Any]) -> str:
    if "gb_s" in row:
        return f"{row['gb_s']:.1f} GB/s"
    if "images_s" in row:
        text = f"{row['images_s']:,.0f} img/s"
        return text + (f" ({row['epoch_s']:.1f} s/epoch)" if "epoch_s" in row else "")
    if "gflops" in row:
        return f"{row['gflops']:.1f} GFLOP/s"
    return "-"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The results table: op, shape, backend, median, throughput, speedups, % peak."""
    has_torch = any("speedup_vs_torch" in r for r in rows)
    head = ["op", "shape", "backend", "median", "throughput", "vs numpy"]
    head += ["vs torch"] if has_torch else []
    head += ["% peak"]
    body = []
    for r in rows:
        if "error" in r and "median_s" not in r:
            line = [r["op"], r["shape"], r["backend"], "error", r["error"][:40], "", ""]
            body.append(line[: len(head)] + [""] * (len(head) - len(line)))
            continue
        line = [r["op"], r["shape"], r["backend"], fmt_time(r.get("median_s")),
                fmt_throughput(r), _ratio(r.get("speedup_vs_numpy"))]
        line += [_ratio(r.get("speedup_vs_torch"))] if has_torch else []
        line += [f"{r['pct_peak']:.0f}%" if "pct_peak" in r else "-"]
        body.append(line)
    return _render(head, body, markdown, right_from=3)


def _render(head: list[str], body: list[list[str]], markdown: bool, right_from: int) -> str:
    if markdown:
        sep = ["---"] * right_from + ["---:"] * (len(head) - right_from)
        lines = [head, sep] + body
        return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in ln) + " |"
                         for ln in lines)
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]

    def fmt(ln: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < right_from else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(ln, widths))).rstrip()

    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def format_machine(m: dict[str, Any]) -> str:
    """One paragraph: CPU, BLAS, ceilings, versions."""
    parts = [f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores", f"numpy {m.get('numpy')}"]
    for lib in m.get("blas", []):
        parts.append(f"{lib.get('internal_api')} {lib.get('version')} "
                     f"({lib.get('architecture')}, {lib.get('num_threads')} threads)")
    if m.get("fastnn_isa"):
        parts.append(f"fastnn {m.get('fastnn')} {m['fastnn_isa']} "
                     f"{m.get('fastnn_threads')} threads")
    if m.get("fastnn_cpu"):
        c = m["fastnn_cpu"]
        parts.append(f"{c.get('cpu')}: {c.get('caches')}; sgemm blocking {c.get('gemm_float32')}")
    if m.get("torch"):
        parts.append(f"torch {m['torch']}")
    if m.get("gpu"):
        parts.append(f"GPU {m['gpu'].get('name')}")
    text = "machine: " + "; ".join(parts) + f"; {m.get('date', '')}"
    if m.get("sgemm_gflops"):
        text += (f"\nceilings (this run): NumPy sgemm {m['sgemm_n']}^2 = "
                 f"{m['sgemm_gflops']:.1f} GFLOP/s; copy {m['copy_mib']} MiB = "
                 f"{m['copy_gb_s']:.1f} GB/s (in cache {m.get('copy_cache_gb_s', 0):.1f} GB/s)")
    return text


def to_json(machine: dict[str, Any], rows: Sequence[dict[str, Any]],
            run: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, "machine": machine, "run": run or {}, "results": list(rows)}


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a ``--json`` file; ValueError if it is not one."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read benchmark JSON {path}: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise ValueError(f"{path} is not a fastnn bench JSON file (no 'results' list)")
    return doc


# --------------------------------------------------------------------------- #
# --compare
# --------------------------------------------------------------------------- #


def compare(old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]],
            tolerance: float = 0.10) -> dict[str, Any]:
    """Match rows by (op, shape, backend, dtype); ``ratio`` = old median / new median
    (above 1: faster now). Changes within ``tolerance`` count as unchanged."""

    def key(r: dict[str, Any]) -> tuple:
        return (r["op"], r["shape"], r["backend"], r.get("dtype", "float32"))

    old_by = {key(r): r for r in old if r.get("median_s")}
    new_by = {key(r): r for r in new if r.get("median_s")}
    matched = []
    for k, n in new_by.items():
        o = old_by.get(k)
        if o is None:
            continue
        ratio = o["median_s"] / n["median_s"]
        status = ("faster" if ratio > 1 + tolerance else
                  "slower" if ratio < 1 / (1 + tolerance) else "same")
        matched.append({"op": k[0], "shape": k[1], "backend": k[2], "dtype": k[3],
                        "old_s": o["median_s"], "new_s": n["median_s"], "ratio": ratio,
                        "status": status})
    matched.sort(key=lambda m: -m["ratio"])
    return {"rows": matched, "tolerance": tolerance,
            "only_old": sorted(set(old_by) - set(new_by)),
            "only_new": sorted(set(new_by) - set(old_by))}


def format_compare(cmp: dict[str, Any]) -> str:
    rows = cmp["rows"]
    head = ["op", "shape", "backend", "old", "new", "ratio", "status"]
    body = [[r["op"], r["shape"], r["backend"], fmt_time(r["old_s"]), fmt_time(r["new_s"]),
             f"{r['ratio']:.2f}x", r["status"]] for r in rows]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("faster", "slower", "same")}
    text = _render(head, body, False, right_from=3) if rows else "(no matching cases)"
    text += (f"\n{counts['faster']} faster, {counts['slower']} slower (regressed), "
             f"{counts['same']} within {cmp['tolerance']:.0%}")
    if cmp["only_old"]:
        text += f"; {len(cmp['only_old'])} only in the old run"
    if cmp["only_new"]:
        text += f"; {len(cmp['only_new'])} new"
    return text


# --------------------------------------------------------------------------- #
# --plot
# --------------------------------------------------------------------------- #


def plot(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """PNG of GFLOP/s per op/shape and backend (and GB/s for memory-bound ops),
    grouped horizontal bars on a log scale. Needs matplotlib (the ``bench`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(
            "--plot needs matplotlib: pip install 'fastnn[bench]' (or pip install matplotlib)"
        ) from exc
    panels = [(m, label) for m, label in (("gflops", "GFLOP/s"), ("gb_s", "GB/s"))
              if any(r.get("metric") == m and m in r for r in rows)]
    if not panels:
        raise ValueError("nothing to plot: no successful GFLOP/s or GB/s results")
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    heights = []
    for metric, _ in panels:
        heights.append(len({(r["op"], r["shape"]) for r in rows if r.get("metric") == metric}))
    height = 1.5 + 0.16 * len(backends) * sum(heights) + len(panels)
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, figsize=(10, height),
                             gridspec_kw={"height_ratios": heights})
    bar = 0.8 / max(len(backends), 1)
    for ax, (metric, label) in zip(axes[:, 0], panels):
        cases = list(dict.fromkeys((r["op"], r["shape"]) for r in rows
                                   if r.get("metric") == metric))
        # Keep each op's shapes together (sweeps come after the standard shapes).
        first = {op: i for i, (op, _) in reversed(list(enumerate(cases)))}
        cases.sort(key=lambda c: first[c[0]])
        for j, b in enumerate(backends):
            vals = {(r["op"], r["shape"]): r[metric] for r in rows
                    if r["backend"] == b and r.get("metric") == metric and metric in r}
            ys = [i + j * bar for i, c in enumerate(cases) if c in vals]
            ax.barh(ys, [vals[c] for c in cases if c in vals], height=bar, label=b)
        ax.set_yticks([i + bar * (len(backends) - 1) / 2 for i in range(len(cases))])
        ax.set_yticklabels([f"{op}  {shape}" for op, shape in cases], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(axis="x", which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0, 0].set_title("fastnn bench: throughput per op and backend (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
