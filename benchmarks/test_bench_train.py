"""One seed-model training step at batch 128 with Adam (lr 1e-3): conv, relu, maxpool, two
linears, cross-entropy, backward and update. Group train_step runs
fastnn.training.train_step, the step ``fastnn train`` runs (torch: nn.Module + autograd +
optim).

Run: pytest benchmarks/test_bench_train.py --benchmark-only
"""

from __future__ import annotations

from typing import Callable

from fastnn.bench.cases import Case

FAMILY = "train"


def test_train(run_bench: Callable[[Case, str], None], case: Case, backend: str) -> None:
    run_bench(case, backend)
