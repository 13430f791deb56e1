"""The training loop's elementwise ops (relu fwd/bwd, softmax cross-entropy, SGD and Adam steps) at
the seed model's sizes.

Run: pytest benchmarks/test_bench_elementwise.py --benchmark-only
"""

from __future__ import annotations

from typing import Callable

from fastnn.bench.cases import Case

FAMILY = "elementwise"


def test_elementwise(run_bench: Callable[[Case, str], None], case: Case, backend: str) -> None:
    run_bench(case, backend)
