"""Timing: warm-up, then the median of repeated samples.

Warm-up is by time as well as by count: thread pools that went to sleep while
another process was being timed (OpenMP, OpenBLAS, fastnn's own) can take
milliseconds per call to wake on a virtual machine, for the first ~100 ms of
renewed activity, so a couple of warm-up calls are not enough.

Each sample times ``inner`` back-to-back calls and divides, where ``inner`` is
chosen so a sample lasts at least ``min_sample_s`` (microsecond ops would
otherwise measure the clock). Host backends use :func:`time.perf_counter`;
CuPy work is timed with CUDA events recorded on the current stream around the
calls, then synchronized, so a sample is GPU time, not launch time. Garbage
collection is off while sampling, as in :mod:`timeit`.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from fastnn.bench.cases import Prepared


@dataclass
class Timing:
    """Seconds per call for each sample (each sample averages ``inner`` calls)."""

    samples: list[float] = field(default_factory=list)
    inner: int = 1

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def best(self) -> float:
        return min(self.samples) if self.samples else math.nan

    def extend(self, other: Timing) -> None:
        self.samples.extend(other.samples)
        self.inner = max(self.inner, other.inner)


def _clock(timer: str) -> Callable[[Callable[[], Any], int], float]:
    """A function (fn, n) -> seconds per call for ``n`` back-to-back calls: ``wall``
    (perf_counter) or ``cupy`` (CUDA events on the current stream)."""
    if timer == "wall":

        def wall(fn: Callable[[], Any], n: int) -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t0) / n

        return wall
    if timer == "cupy":
        import cupy

        start, end = cupy.cuda.Event(), cupy.cuda.Event()

        def cupy_events(fn: Callable[[], Any], n: int) -> float:
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return cupy.cuda.get_elapsed_time(start, end) / 1e3 / n

        return cupy_events
    raise ValueError(f"timer must be wall or cupy, got {timer!r}")


def measure(
    prepared: Prepared,
    *,
    warmup: int = 1,
    warmup_s: float = 0.1,
    target_s: float = 0.3,
    min_repeats: int = 3,
    max_repeats: int = 100,
    min_sample_s: float = 1e-3,
    max_inner: int = 10000,
) -> Timing:
    """Time ``prepared.fn``: untimed calls until at least ``warmup`` calls and
    ``warmup_s`` seconds are done, one calibration call, then enough samples to
    fill about ``target_s`` (between ``min_repeats`` and ``max_repeats``).
    Single-shot cases (whole training runs) run their own warm-up and are timed
    once.
    """
    clock = _clock(prepared.timer)
    fn = prepared.fn
    if prepared.single_shot:
        if warmup and prepared.warmup_fn is not None:
            clock(prepared.warmup_fn, 1)
        return Timing([clock(fn, 1)], 1)
    spent, calls = 0.0, 0
    while calls < warmup or spent < warmup_s:
        spent += clock(fn, 1)
        calls += 1
    t1 = max(clock(fn, 1), 1e-9)
    inner = 1 if t1 >= min_sample_s else min(max_inner, math.ceil(min_sample_s / t1))
    repeats = int(min(max_repeats, max(min_repeats, round(target_s / (t1 * inner)))))
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        samples = [clock(fn, inner) for _ in range(repeats)]
    finally:
        if was_enabled:
            gc.enable()
    return Timing(samples, inner)
