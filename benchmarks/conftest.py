"""pytest-benchmark suite for fastnn: one group per op and pass, parametrized over
the cases of :mod:`fastnn.bench.cases` and over backends (``numpy`` reference,
``cpu``, ``cuda`` when a GPU is present, ``torch`` as a peer when installed).

Each test module sets ``FAMILY`` (a case family: ``conv2d``, ``matmul``, ...) and
defines ``test_...(run_bench, case, backend)``; :func:`pytest_generate_tests`
fills in the cases and backends. Sweep shapes are marked ``sweep`` and skipped
unless ``--bench-sweep`` is given, so the default run stays within minutes.

    pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only -k "conv2d and cpu"
    pytest benchmarks/ --benchmark-only --bench-sweep --benchmark-json out.json
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
import pytest

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # the suite needs the plugin: pip install 'fastnn[bench]'
    collect_ignore_glob = ["test_bench_*.py"]

from fastnn.bench.cases import (
    BACKENDS,
    Case,
    Unsupported,
    output_arrays,
    prepare,
    standard_cases,
    sweep_cases,
)
from fastnn.bench.runners import backend_status
from fastnn.bench.timing import measure

#: train_mnist is a long end-to-end run: it belongs to `fastnn bench`, not here.
SUITE_EXCLUDE = ("train_mnist",)
_STATUS = {b: backend_status(b) for b in BACKENDS}
_REFERENCE: dict[tuple[str, str], list[np.ndarray]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastnn-bench")
    group.addoption("--bench-sweep", action="store_true",
                    help="also run the sweep shapes (minutes more)")
    group.addoption("--bench-time", type=float, default=0.5,
                    help="seconds of timed rounds per benchmark (default 0.5)")
    group.addoption("--bench-no-check", action="store_true",
                    help="skip checking each backend's result against the numpy reference")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sweep: a sweep shape (run with --bench-sweep)")


def _ident(case: Case) -> str:
    """A -k friendly id: 'N128 1->32 3x3 28x28' -> 'N128_1to32_3x3_28x28'."""
    shape = case.shape.replace("->", "to").replace("^T", "T")
    return re.sub(r"[^A-Za-z0-9]+", "_", shape).strip("_")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    family = getattr(metafunc.module, "FAMILY", None)
    if family is None:
        return
    if "case" in metafunc.fixturenames:
        params = []
        for c in standard_cases():
            if c.family == family and c.op not in SUITE_EXCLUDE:
                params.append(pytest.param(c, id=f"{c.op}-{_ident(c)}"))
        for c in sweep_cases():
            if c.family == family:
                params.append(pytest.param(c, id=f"{c.op}-{_ident(c)}", marks=pytest.mark.sweep))
        metafunc.parametrize("case", params)
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", [
            pytest.param(b, marks=() if ok else pytest.mark.skip(reason=why))
            for b, (ok, why) in _STATUS.items()])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--bench-sweep"):
        return
    skip = pytest.mark.skip(reason="sweep shape: run with --bench-sweep")
    for item in items:
        if "sweep" in item.keywords:
            item.add_marker(skip)


def _reference(case: Case) -> list[np.ndarray]:
    if case.key not in _REFERENCE:
        _REFERENCE[case.key] = output_arrays(prepare(case, "numpy").fn())
    return _REFERENCE[case.key]


def _check(case: Case, backend: str, out: Any) -> None:
    """The peer must compute what the reference computes, or its time means nothing."""
    if backend == "numpy" or case.family == "train" or case.op in ("sgd_step", "adam_step"):
        return
    ref, got = _reference(case), output_arrays(out)
    for r, g in zip(ref, got):
        scale = float(np.abs(r).max()) if r.size else 1.0
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-3 * max(scale, 1.0),
                                   err_msg=f"{case.op} {case.shape} on {backend}")


@pytest.fixture
def run_bench(benchmark: Any, request: pytest.FixtureRequest) -> Callable[[Case, str], None]:
    """Time ``case`` on ``backend`` with pytest-benchmark, recording FLOPs, bytes and
    throughput in ``extra_info``. CUDA runs are synchronized with a CUDA event after
    each round, and the CUDA-event median is recorded as well."""
    seconds = request.config.getoption("--bench-time")
    check = not request.config.getoption("--bench-no-check")

    def run(case: Case, backend: str) -> None:
        if backend == "numpy" and "heavy" in case.tags:
            pytest.skip("the numpy reference is too slow at this shape")
        try:
            prepared = prepare(case, backend)
        except Unsupported as exc:
            pytest.skip(str(exc))
        if check:
            _check(case, backend, prepared.fn())
        # Warm up (by time: sleeping thread pools wake slowly) and calibrate.
        cal = measure(prepared, warmup_s=0.1, target_s=0.0, min_repeats=1, max_repeats=1)
        rounds = int(min(200, max(5, seconds / (cal.median * cal.inner))))
        target = prepared.fn
        info = benchmark.extra_info
        if prepared.timer == "cupy":
            import cupy

            done = cupy.cuda.Event()

            def target() -> None:
                prepared.fn()
                done.record()
                done.synchronize()

            events = measure(prepared, warmup_s=0.0, target_s=seconds / 4)
            info["cuda_event_median_s"] = events.median
        benchmark.group = case.op
        info.update(op=case.op, shape=case.shape, backend=backend, flops=case.flops,
                    bytes=case.bytes, metric=case.metric)
        benchmark.pedantic(target, rounds=rounds, iterations=cal.inner, warmup_rounds=1)
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable
            return
        t = info.get("cuda_event_median_s") or stats.stats.median
        if case.metric == "gb_s":
            info["gb_s"] = case.bytes / t / 1e9
        else:
            info["gflops"] = case.flops / t / 1e9
        if case.metric == "images_s":
            info["images_s"] = case.images / t

    return run
