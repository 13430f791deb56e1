"""fastnn's benchmark suite: the ``fastnn bench`` CLI and the cases that
``benchmarks/`` (pytest-benchmark) and ``benchmarks/bench_cpu_targets.py`` time.

Modules: :mod:`~fastnn.bench.cases` (what is timed, FLOPs/bytes, setup per
backend), :mod:`~fastnn.bench.timing` (warm-up, median of repeats, CUDA events),
:mod:`~fastnn.bench.runners` (in-process and per-peer worker processes,
alternating rounds), :mod:`~fastnn.bench.machine` (machine details, sgemm peak
and copy bandwidth measured in the same run), :mod:`~fastnn.bench.report`
(tables, JSON, ``--compare``, ``--plot``) and :mod:`~fastnn.bench.cli`.
"""

from __future__ import annotations

from fastnn.bench.cli import main

__all__ = ["main"]
