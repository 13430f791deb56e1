"""The C++ kernels under concurrency: Python threads and fork().

* Several Python threads calling kernels at once (the bindings release the GIL,
  so they really do run concurrently and contend for fastnn's thread pool) get
  the same results as serial calls.
* Changing the thread count from one thread while others run kernels is safe.
* ``fork()`` after the pool has run, or while another thread is in the middle
  of a kernel, gives a child whose kernels work; ``multiprocessing`` with the
  'fork' start method works. These run in a subprocess with a timeout, so a
  hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import NATIVE, PKG_ROOT

import fastnn
import fastnn.functional as F

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not NATIVE, reason="fastnn._C is not built")

THREADS = 4
ROUNDS = 16


def _cases(dtype) -> list[tuple[str, Callable[[], object]]]:
    """(name, thunk) pairs big enough that each kernel uses the thread pool."""
    rng = np.random.default_rng(11)

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    x, w, b = r(4, 8, 18, 18), r(16, 8, 3, 3), r(16)
    gy = r(4, 16, 16, 16)
    a, bm = r(96, 80), r(80, 72)
    a3, b3 = r(3, 40, 24), r(3, 24, 36)
    big = r(200_000)
    px = r(4, 8, 32, 32)
    logits, labels = r(256, 10), rng.integers(0, 10, 256)
    return [
        ("conv2d", lambda: F.conv2d(x, w, b, padding=1)),
        ("conv2d_grouped", lambda: F.conv2d(x, w[:, :4], None, stride=2, groups=2)),
        ("conv2d_backward", lambda: F.conv2d_backward(gy, x, w)),
        ("matmul", lambda: F.matmul(a, bm)),
        ("matmul_batched", lambda: F.matmul(a3, b3)),
        ("linear", lambda: F.linear(a, bm.T.copy(), None)),
        ("relu", lambda: F.relu(big)),
        ("max_pool2d", lambda: F.max_pool2d(px, 3, 2, 1)),
        ("max_pool2d_backward",
         lambda: F.max_pool2d_backward(np.ones((4, 8, 16, 16), dtype), px, 2)),
        ("avg_pool2d", lambda: F.avg_pool2d(px, 2)),
        ("softmax_cross_entropy", lambda: F.softmax_cross_entropy(logits, labels)),
    ]


def _flat(out) -> list[np.ndarray]:
    return [np.asarray(o) for o in (out if isinstance(out, tuple) else (out,))]


def _same(got, want, dtype, name: str) -> None:
    # Rounding only: a different thread count may split a reduction differently
    # (e.g. conv's weight gradient over N*OH*OW), so scale by the output's size.
    eps = 1e-5 if dtype == np.float32 else 1e-12
    for g, w in zip(_flat(got), _flat(want)):
        scale = max(1.0, float(np.abs(w).max())) if w.size else 1.0
        np.testing.assert_allclose(g, w, rtol=eps, atol=eps * scale, err_msg=name)


def _hammer(cases, expected, dtype, extra: Callable[[], None] | None = None) -> None:
    """Run every case from THREADS threads at once, ROUNDS times, in different orders."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS + (extra is not None))
    stop = threading.Event()

    def worker(seed: int) -> None:
        order = np.random.default_rng(seed)
        try:
            barrier.wait()
            with fastnn.backend("cpu"):
                for _ in range(ROUNDS):
                    for i in order.permutation(len(cases)):
                        name, fn = cases[i]
                        _same(fn(), expected[name], dtype, name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def side() -> None:
        try:
            barrier.wait()
            while not stop.is_set():
                extra()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(THREADS)]
    side_thread = threading.Thread(target=side) if extra is not None else None
    for t in threads + ([side_thread] if side_thread else []):
        t.start()
    for t in threads:
        t.join(timeout=300)
        assert not t.is_alive(), "a kernel thread hung"
    stop.set()
    if side_thread:
        side_thread.join(timeout=60)
    if errors:
        raise errors[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threads_get_serial_results(dtype) -> None:
    cases = _cases(dtype)
    with fastnn.backend("cpu"):
        expected = {name: fn() for name, fn in cases}
    _hammer(cases, expected, dtype)


def test_set_num_threads_while_kernels_run() -> None:
    cases = _cases(np.float32)
    before = fastnn.get_num_threads()
    with fastnn.backend("cpu"):
        expected = {name: fn() for name, fn in cases}
    counts = itertools.cycle(np.random.default_rng(3).integers(1, 5, 997).tolist())
    try:
        _hammer(cases, expected, np.float32,
                extra=lambda: fastnn.set_num_threads(int(next(counts))))
    finally:
        fastnn.set_num_threads(before)
    assert fastnn.get_num_threads() == before


def test_concurrent_optimizer_steps_on_separate_arrays() -> None:
    rng = np.random.default_rng(5)
    n = 100_000
    params = [rng.standard_normal(n).astype(np.float32) for _ in range(THREADS)]
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(THREADS)]

    def run(backend: str, i: int) -> np.ndarray:
        p, m, v = params[i].copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
        buf = np.zeros(n, np.float32)
        with fastnn.backend(backend):
            for step in range(1, 21):
                F.adam_step(p, grads[i], m, v, step, 1e-2, weight_decay=0.01)
                F.sgd_step(p, grads[i], buf, 1e-2, momentum=0.9, nesterov=True)
        return p

    want = [run("numpy", i) for i in range(THREADS)]
    got: list[np.ndarray | None] = [None] * THREADS

    def worker(i: int) -> None:
        got[i] = run("cpu", i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# fork
# --------------------------------------------------------------------------

_FORK_PRELUDE = textwrap.dedent(
    """
    import os, sys, threading, time
    import numpy as np
    import fastnn, fastnn.functional as F

    fastnn.set_num_threads(4)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 8, 24, 24)).astype(np.float32)
    W = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    A = rng.standard_normal((128, 128)).astype(np.float32)

    def work():
        with fastnn.backend("cpu"):
            return F.conv2d(X, W, None, padding=1), F.matmul(A, A)

    WANT = work()  # the pool has run in the parent

    def check():
        y, c = work()
        return np.allclose(y, WANT[0], rtol=1e-5, atol=1e-4) and np.allclose(
            c, WANT[1], rtol=1e-5, atol=1e-4)

    def fork_and_check(timeout=30.0):
        pid = os.fork()
        if pid == 0:
            try:
                ok = check() and check()
                fastnn.set_num_threads(2)
                ok = ok and check()
            except BaseException:
                ok = False
            os._exit(0 if ok else 1)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                return "hang"
            time.sleep(0.01)
    """
)


def _run_script(body: str, timeout: float = 180) -> subprocess.CompletedProcess:
    code = _FORK_PRELUDE + textwrap.dedent(body)
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=PKG_ROOT, capture_output=True,
                           text=True, timeout=timeout,
                           env={**__import__("os").environ, "PYTHONPATH": str(PKG_ROOT)})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"fork test hung (>{timeout}s): {exc.stderr!r}")
    assert r.returncode == 0, f"stdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def test_fork_after_pool_has_run() -> None:
    r = _run_script(
        """
        codes = [fork_and_check() for _ in range(3)]
        print(codes)
        assert codes == [0, 0, 0], codes
        assert check()  # and the parent's pool still works
        """
    )
    assert "[0, 0, 0]" in r.stdout


def test_fork_while_another_thread_runs_kernels() -> None:
    _run_script(
        """
        stop = threading.Event()
        errs = []
        def busy():
            try:
                while not stop.is_set():
                    assert check()
            except BaseException as e:
                errs.append(e)
        t = threading.Thread(target=busy)
        t.start()
        time.sleep(0.05)
        codes = []
        for _ in range(6):
            codes.append(fork_and_check())
            time.sleep(0.01)
        stop.set()
        t.join(60)
        print(codes)
        assert not errs, errs
        assert codes == [0] * 6, codes
        """
    )


def test_multiprocessing_fork_pool() -> None:
    _run_script(
        """
        import multiprocessing as mp

        def task(i):
            return bool(check())

        ctx = mp.get_context("fork")
        with ctx.Pool(2) as pool:
            res = pool.map_async(task, range(4)).get(timeout=60)
        print(res)
        assert res == [True] * 4, res
        """
    )


def test_park_threads_ends_the_workers_polling() -> None:
    # Workers poll for FASTNN_SPIN_US after a job (here its 1 s cap, so it cannot end on its
    # own during the test); park_threads() puts them to sleep at once. The process's
    # CPU time while the main thread sleeps shows which: ~0.4 s of polling vs ~0
    # (the bound leaves room for a busy machine to delay the poller).
    code = textwrap.dedent(
        """
        import time, numpy as np, fastnn
        from fastnn.backends import cpu
        fastnn.set_num_threads(2)
        x = np.random.default_rng(0).standard_normal((1 << 20,), dtype=np.float32)
        want = cpu.relu(x)

        def idle_cpu(park):
            cpu.relu(x)  # a parallel job: the worker polls after it
            if park:
                fastnn.park_threads()
            t = time.process_time()
            time.sleep(0.4)
            return time.process_time() - t

        polling, parked = idle_cpu(False), idle_cpu(True)
        assert np.array_equal(cpu.relu(x), want)  # the next job wakes them
        print(polling, parked)
        assert polling > 0.1 and parked < 0.05, (polling, parked)  # ~0.4 vs ~0 when idle
        """
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=PKG_ROOT, capture_output=True,
                       text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(PKG_ROOT),
                            "FASTNN_SPIN_US": "5000000"})
    assert r.returncode == 0, f"stdout: {r.stdout}\nstderr: {r.stderr}"


def test_park_threads_without_work_is_harmless() -> None:
    fastnn.park_threads()
    fastnn.park_threads()
    x = np.arange(-3, 3, dtype=np.float32)
    assert np.array_equal(F.relu(x), np.maximum(x, 0))


def _index_cases() -> list[tuple[str, Callable[[np.ndarray], object], np.ndarray]]:
    """(name, call taking the index array, a valid index array): kernels whose
    index arguments a second thread may write to while they run."""
    from fastnn import _C

    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (64, 2048), dtype=np.uint8)
    table = rng.standard_normal(256).astype(np.float32)
    logits = rng.standard_normal((300_000, 10)).astype(np.float32)
    return [
        ("lookup_u8 rows", lambda rows: _C.lookup_u8(images, rows, table),
         np.full(4096, 3, np.int64)),
        ("softmax_cross_entropy labels", lambda labels: _C.softmax_cross_entropy(logits, labels),
         np.full(300_000, 3, np.int64)),
    ]


@pytest.mark.parametrize("case", range(2))
def test_index_arrays_written_by_another_thread_stay_in_bounds(case: int) -> None:
    """The kernel reads the indices it checked (a copy taken with the GIL held): a
    thread writing out-of-range values into the array while the kernel runs (the
    call has released the GIL) cannot make it read out of bounds. Reading the
    array itself, both kernels crashed (SIGSEGV) on every run of this test."""
    import time

    name, call, valid = _index_cases()[case]
    want = call(valid.copy())
    ran = 0
    for _ in range(10):
        idx = valid.copy()
        go = threading.Event()

        def scribble(idx: np.ndarray = idx, go: threading.Event = go) -> None:
            go.wait()
            time.sleep(0.001)  # past the check, inside the kernel (a few ms of work)
            idx[:] = 1 << 40

        t = threading.Thread(target=scribble)
        t.start()
        try:
            go.set()
            got = call(idx)
        except ValueError:
            continue  # the check already saw the written values: refused
        finally:
            t.join()
        assert idx[0] == 1 << 40, name  # the thread wrote while the call ran
        for g, w in zip(got if isinstance(got, tuple) else (got,),
                        want if isinstance(want, tuple) else (want,)):
            np.testing.assert_array_equal(g, w, err_msg=name)
        ran += 1
    assert ran >= 5, name  # the check passed and the kernel ran, most of the time
