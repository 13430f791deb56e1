"""matmul (groups matmul, matmul_linear_fwd/bwd_input/bwd_weight, matmul_small): squares 256..2048,
the seed model's Linear(5408, 128) products, small/skinny; more sizes with --bench-sweep.

Run: pytest benchmarks/test_bench_matmul.py --benchmark-only
"""

from __future__ import annotations

from typing import Callable

from fastnn.bench.cases import Case

FAMILY = "matmul"


def test_matmul(run_bench: Callable[[Case, str], None], case: Case, backend: str) -> None:
    run_bench(case, backend)
