#!/usr/bin/env python3
"""Kernel-launch overhead of the cuda backend: microseconds per launch, host side.

Cases (each launched ``--launches`` times back to back on CuPy's current stream):

* an empty Numba kernel with 1 and with 4 CuPy array arguments, through
  fastnn's launcher (``Runtime.launch``: CUDA-array-interface wrapping without
  the per-argument stream sync, CuPy's stream) and through Numba's own
  ``kernel[grid, block](*cupy_arrays)`` for comparison;
* ``fastnn.functional.relu`` on a 1024-element float32 CuPy array (argument
  checks, backend dispatch, allocation, one launch);
* ``cupy.maximum(x, 0)`` on the same array: CuPy's own launch path as the floor.

``host_us`` is the wall time of the launch loop divided by the launch count
(what the Python thread pays); ``total_us`` also waits for the GPU to drain.
When the GPU outruns the host the two agree and the figure is pure launch cost.

Used as the ``launch`` section of ``bench_gpu.py``; also runs on its own:
``python benchmarks/bench_launch.py [--launches N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable


def _time(fn: Callable[[], Any], sync: Callable[[], None], launches: int) -> dict:
    for _ in range(20):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(launches):
        fn()
    host = time.perf_counter() - t0
    sync()
    total = time.perf_counter() - t0
    return {"host_us": host / launches * 1e6, "total_us": total / launches * 1e6,
            "launches": launches}


def launch_overhead(launches: int = 2000) -> dict[str, dict]:
    """{case: {"host_us", "total_us", "launches"}} (see the module docstring)."""
    import cupy as cp
    import numpy as np
    from numba import cuda

    from fastnn import functional as F
    from fastnn.backends._cuda.launch import runtime

    rt = runtime()

    @cuda.jit
    def empty1(a):
        pass

    @cuda.jit
    def empty4(a, b, c, d):
        pass

    xs = [cp.zeros(256, cp.float32) for _ in range(4)]
    small = cp.asarray(np.linspace(-1.0, 1.0, 1024, dtype=np.float32))
    stream = cp.cuda.get_current_stream()
    cases: dict[str, Callable[[], Any]] = {
        "numba_empty_1arg_fastnn_launch": lambda: rt.launch(empty1, (1,), 32, xs[0]),
        "numba_empty_4args_fastnn_launch": lambda: rt.launch(empty4, (1,), 32, *xs),
        "numba_empty_1arg_numba_launch": lambda: empty1[1, 32](xs[0]),
        "numba_empty_4args_numba_launch": lambda: empty4[1, 32](*xs),
        "F.relu_1024_float32": lambda: F.relu(small),
        "cupy_maximum_1024_float32": lambda: cp.maximum(small, 0),
    }
    out = {}
    for name, fn in cases.items():
        try:
            out[name] = _time(fn, stream.synchronize, launches)
        except Exception as exc:  # noqa: BLE001 - report the case, keep the others
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def format_rows(results: dict[str, dict]) -> list[str]:
    rows = [f"{'case':<34} {'host us/launch':>15} {'incl. GPU':>10}"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"{name:<34} error: {r['error'][:100]}")
        else:
            rows.append(f"{name:<34} {r['host_us']:15.1f} {r['total_us']:10.1f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=2000)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    results = launch_overhead(args.launches)
    print("\n".join(format_rows(results)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
