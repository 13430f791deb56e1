"""One seed-model SGD training step at batch 128 (group train_step): conv, relu, maxpool, two
linears, softmax cross-entropy, backward and update. fastnn backends run it on their kernels
directly; torch runs its nn.Module + autograd + optim.

Run: pytest benchmarks/test_bench_train.py --benchmark-only
"""

from __future__ import annotations

from typing import Callable

from fastnn.bench.cases import Case

FAMILY = "train"


def test_train(run_bench: Callable[[Case, str], None], case: Case, backend: str) -> None:
    run_bench(case, backend)
