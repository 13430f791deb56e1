"""conv2d forward, backward-input and backward-weight (groups conv2d_fwd, conv2d_bwd_input,
conv2d_bwd_weight): MNIST layer shapes, plus a batch/channel sweep with --bench-sweep.

Run: pytest benchmarks/test_bench_conv2d.py --benchmark-only
"""

from __future__ import annotations

from typing import Callable

from fastnn.bench.cases import Case

FAMILY = "conv2d"


def test_conv2d(run_bench: Callable[[Case, str], None], case: Case, backend: str) -> None:
    run_bench(case, backend)
