"""avg_pool2d forward and backward (groups avg_pool2d_fwd, avg_pool2d_bwd) at N=128 C=32 26x26 2x2;
more with --bench-sweep.

Run: pytest benchmarks/test_bench_avg_pool2d.py --benchmark-only
"""

from __future__ import annotations

from typing import Callable

from fastnn.bench.cases import Case

FAMILY = "avg_pool2d"


def test_avg_pool2d(run_bench: Callable[[Case, str], None], case: Case, backend: str) -> None:
    run_bench(case, backend)
