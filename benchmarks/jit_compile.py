#!/usr/bin/env python3
"""Compile every CUDA kernel variant once on this GPU, timing each and filling Numba's cache.

The variants and their launch signatures come from
:mod:`fastnn.backends._cuda.variants` (``core()`` first, then the rest of
``every()``), so what is compiled here is what later launches load from the
on-disk cache (``NUMBA_CACHE_DIR``, or ``__pycache__`` beside the sources).

Before the first kernel it checks that NVVM loads and compiles a trivial
kernel to PTX and to a module on the device, so a missing toolkit shows up as
one clear error instead of a failure per variant.

Writes ``--out`` (JSON) after every variant, so a run stopped by ``--budget``
or killed by a time limit still leaves everything compiled so far::

    {"nvvm": {...}, "device": "...", "budget_s": 55, "elapsed_s": ...,
     "done": false, "variants": [{"name", "family", "dtype", "seconds",
     "registers", "error"}], "not_compiled": [...names left when the budget ran out]}

Usage: ``python benchmarks/jit_compile.py --out DIR/jit.json [--budget S] [--core]``
Exit status 0 when every attempted variant compiled, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


def _write(path: str | None, doc: dict) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def nvvm_check() -> dict[str, Any]:
    """NVVM's version and path, and a trivial kernel compiled to PTX and loaded."""
    out: dict[str, Any] = {}
    try:
        from numba import cuda, types
        from numba.cuda.cudadrv import nvvm

        out["version"] = ".".join(map(str, nvvm.NVVM().get_version()))
        try:
            from numba.cuda.cuda_paths import get_cuda_paths

            found = get_cuda_paths().get("nvvm")
            # (a named tuple (by, info) in numba-cuda: where it was found, and the file)
            out["path"] = str(getattr(found, "info", found))
            out["found_by"] = str(getattr(found, "by", ""))
        except Exception as exc:  # noqa: BLE001 - the path is informative only
            out["path"] = f"unknown ({type(exc).__name__})"

        def probe(a):
            a[0] = 1.0

        t0 = time.perf_counter()
        cuda.compile_ptx(probe, (types.Array(types.float32, 1, "C"),), cc=(9, 0))
        out["compile_ptx_s"] = time.perf_counter() - t0
        out["ok"] = True
    except Exception as exc:  # noqa: BLE001
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file, rewritten after every variant")
    parser.add_argument("--budget", type=float, default=1e9,
                        help="stop starting new compiles after this many seconds")
    parser.add_argument("--core", action="store_true", help="only variants.core()")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    doc: dict[str, Any] = {"budget_s": args.budget, "done": False, "variants": []}
    doc["nvvm"] = nvvm_check()
    print(f"NVVM: {doc['nvvm']}", flush=True)
    from fastnn.backends._cuda.launch import runtime_or_none

    rt, reason = runtime_or_none()
    if rt is None or rt.sim:
        doc["error"] = f"no GPU runtime: {reason or 'the simulator is on'}"
        print(doc["error"], flush=True)
        _write(args.out, doc)
        return 1
    doc["device"] = rt.cuda.get_current_device().name
    if isinstance(doc["device"], bytes):
        doc["device"] = doc["device"].decode()
    if not doc["nvvm"]["ok"]:
        doc["error"] = "NVVM unusable: no kernel can compile"
        _write(args.out, doc)
        return 1

    from fastnn.backends._cuda import variants

    todo = variants.core() if args.core else variants.every()
    failures = 0
    for i, v in enumerate(todo):
        if time.perf_counter() - start > args.budget:
            doc["not_compiled"] = [w.name for w in todo[i:]]
            print(f"budget of {args.budget:.0f} s spent: {len(todo) - i} variants not compiled",
                  flush=True)
            break
        row: dict[str, Any] = {"name": v.name, "family": v.family, "dtype": v.dtype}
        t0 = time.perf_counter()
        try:
            v.kernel.compile(v.sig)
            row["seconds"] = time.perf_counter() - t0
            try:
                row["registers"] = v.kernel.get_regs_per_thread(v.sig)
            except Exception:  # noqa: BLE001 - informative only
                pass
        except Exception as exc:  # noqa: BLE001 - record and go on
            row["seconds"] = time.perf_counter() - t0
            row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            failures += 1
        doc["variants"].append(row)
        doc["elapsed_s"] = time.perf_counter() - start
        print(f"{i + 1:4d}/{len(todo)} {row['seconds']:7.2f} s  {v.name}"
              + (f"  ERROR {row['error'][:200]}" if "error" in row else ""), flush=True)
        _write(args.out, doc)
    else:
        doc["done"] = True
    doc["elapsed_s"] = time.perf_counter() - start
    secs = [r["seconds"] for r in doc["variants"] if "error" not in r]
    doc["summary"] = {"compiled": len(secs), "failed": failures,
                      "total_s": sum(secs), "max_s": max(secs, default=0.0)}
    print(f"compiled {len(secs)}, failed {failures}, {sum(secs):.1f} s compiling", flush=True)
    _write(args.out, doc)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
