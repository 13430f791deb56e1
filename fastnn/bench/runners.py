"""Where cases run: in this process, or in a worker process per peer.

A peer in its own process keeps its threads to itself: torch's OpenMP/MKL pool
and fastnn's pool never share a process (and idle pools never spin against the
one being timed), and a child's environment can differ, e.g. NumPy measured with
``OPENBLAS_CORETYPE`` removed. :func:`run_cases` alternates the backends round
by round on each case, so slow drifts of a shared machine hit every peer alike.

Worker protocol (``python -m fastnn.bench.worker BACKEND``): one JSON object per
line on stdin, one reply per line on the worker's private stdout.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastnn.bench import machine
from fastnn.bench.cases import Case, Prepared, Unsupported, prepare
from fastnn.bench.timing import Timing, measure


class WorkerError(RuntimeError):
    """A worker process failed or died."""


def backend_status(name: str) -> tuple[bool, str]:
    """Whether ``name`` can run here, and why not."""
    if name == "torch":
        from fastnn.bench import torch_peer

        return (True, "") if torch_peer.available() else (False, "torch is not installed")
    if name == "cuda":
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() < 1:
                return False, "no CUDA device"
        except Exception as exc:  # noqa: BLE001 - no cupy, no driver
            return False, f"cupy/CUDA unavailable ({type(exc).__name__})"
    if name not in ("numpy", "cpu", "cuda"):
        return False, f"unknown backend {name!r}"
    try:
        from fastnn.backends import get_backend

        mod = get_backend(name)
        check = getattr(mod, "is_available", None)
        if check is not None and not check():
            return False, f"fastnn backend {name!r} reports unavailable"
    except Exception as exc:  # noqa: BLE001 - e.g. fastnn._C not built
        return False, f"fastnn backend {name!r} does not import ({exc})"
    return True, ""


class InProcessRunner:
    """Runs cases for one backend in this process, keeping the last case's inputs so
    alternating rounds do not rebuild them."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._key: tuple | None = None
        self._prepared: Prepared | None = None

    def _get(self, case: Case, dtype: str) -> Prepared:
        key = (case.op, case.shape, json.dumps(case.params, sort_keys=True), dtype)
        if key != self._key:
            self._prepared = self._key = None  # free the old inputs first
            self._prepared = prepare(case, self.backend, dtype)
            self._key = key
        return self._prepared

    def measure(self, case: Case, dtype: str = "float32", **opts: Any) -> tuple[Timing, str]:
        """Time ``case``; returns the timing and the case's note (e.g. data source)."""
        prepared = self._get(case, dtype)
        return measure(prepared, **opts), prepared.note

    def info(self) -> dict[str, Any]:
        return {"threads": machine.backend_threads(self.backend), "pid": os.getpid(),
                "blas": machine.blas_info(),
                "openblas_env": {v: os.environ[v] for v in machine.OPENBLAS_VARS
                                 if os.environ.get(v)}}

    def ceilings(self, mode: str = "full") -> dict[str, Any]:
        return machine.measure_ceilings(mode)

    def env(self, names: Iterable[str]) -> dict[str, str | None]:
        return {n: os.environ.get(n) for n in names}

    def release(self) -> None:
        self._prepared = self._key = None

    def close(self) -> None:
        self.release()


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


class WorkerRunner:
    """Runs cases for one backend in a child process (``python -m fastnn.bench.worker``).

    ``drop_env`` names environment variables removed from the child's environment
    (only there). A call that gets no answer within ``timeout_s`` kills the worker.
    """

    def __init__(self, backend: str, drop_env: Iterable[str] = (),
                 timeout_s: float = 900.0) -> None:
        self.backend, self.timeout_s = backend, timeout_s
        env = {k: v for k, v in os.environ.items() if k not in set(drop_env)}
        # The child must import this same fastnn source tree.
        root = _package_root()
        env["PYTHONPATH"] = os.pathsep.join(
            [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root])
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "fastnn.bench.worker", backend],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, env=env, bufsize=1,
        )

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(msg) + "\n")
            proc.stdin.flush()
            # One request, one reply line: nothing is left buffered between calls,
            # so waiting on the pipe's fd is reliable.
            ready, _, _ = select.select([proc.stdout], [], [], self.timeout_s)
            if not ready:
                proc.kill()
                raise WorkerError(f"{self.backend} worker gave no answer in {self.timeout_s} s")
            line = proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            proc.wait(timeout=10)
            self._stderr.seek(0)
            tail = self._stderr.read()[-2000:]
            raise WorkerError(f"{self.backend} worker exited ({proc.returncode}): {tail}")
        reply = json.loads(line)
        if reply.get("unsupported"):
            raise Unsupported(reply["error"])
        if "error" in reply:
            raise WorkerError(f"{self.backend} worker: {reply['error']}")
        return reply

    def measure(self, case: Case, dtype: str = "float32", **opts: Any) -> tuple[Timing, str]:
        r = self._call({"cmd": "measure", "case": case.to_dict(), "dtype": dtype, "opts": opts})
        return Timing(r["samples"], r["inner"]), r.get("note", "")

    def info(self) -> dict[str, Any]:
        return self._call({"cmd": "info"})["info"]

    def ceilings(self, mode: str = "full") -> dict[str, Any]:
        return self._call({"cmd": "ceilings", "mode": mode})["ceilings"]

    def env(self, names: Iterable[str]) -> dict[str, str | None]:
        """The child's values of these environment variables."""
        return self._call({"cmd": "env", "names": list(names)})["env"]

    def release(self) -> None:
        self._call({"cmd": "release"})

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._call({"cmd": "quit"})
            except (WorkerError, json.JSONDecodeError):
                pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._stderr.close()


Runner = Any  # InProcessRunner | WorkerRunner


@dataclass
class Result:
    """The outcome of one case on one backend: pooled samples of all rounds, or the
    error that stopped it."""

    case: Case
    backend: str
    dtype: str
    timing: Timing | None = None
    error: str | None = None
    note: str = ""


def run_cases(
    cases: Sequence[Case],
    runners: dict[str, Runner],
    *,
    dtype: str = "float32",
    rounds: int = 3,
    target_s: float = 0.3,
    warmup_s: float = 0.1,
    numpy_heavy: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    """Time every case on every runner, alternating backends round by round (the
    order rotates each round) and pooling the samples. Each measurement warms up
    for ``warmup_s`` and samples for about ``target_s / rounds``. ``heavy`` cases skip the
    ``numpy`` reference unless ``numpy_heavy``. ``progress(desc)`` is called after
    each measurement. Errors are recorded per case and backend, never raised.
    """
    results: list[Result] = []
    per_round = target_s / max(rounds, 1)
    for case in cases:
        names = participants(case, runners, numpy_heavy)
        by_backend = {b: Result(case, b, dtype) for b in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)] if names else []
            for b in order:
                res = by_backend[b]
                if res.error is None:
                    try:
                        # Whole training runs are long: timed once, in the first round.
                        if r == 0 or case.op != "train_mnist":
                            timing, res.note = runners[b].measure(
                                case, dtype, target_s=per_round, warmup_s=warmup_s)
                            if res.timing is None:
                                res.timing = timing
                            else:
                                res.timing.extend(timing)
                    except Unsupported as exc:
                        res.error = f"unsupported: {exc}"
                    except Exception as exc:  # noqa: BLE001 - report and carry on
                        res.error = f"{type(exc).__name__}: {exc}"
                if progress is not None:
                    progress(f"{case.op} {b}")
        for b in names:
            try:
                runners[b].release()
            except Exception:  # noqa: BLE001 - a dead worker already reported its error
                pass
            results.append(by_backend[b])
    return results


def participants(case: Case, backends: Iterable[str], numpy_heavy: bool = False) -> list[str]:
    """The backends that run ``case``: all, except the slow ``numpy`` reference on
    ``heavy`` cases unless ``numpy_heavy``."""
    return [b for b in backends if numpy_heavy or b != "numpy" or "heavy" not in case.tags]


def make_runners(
    backends: Sequence[str], isolate: str = "peers", numpy_drop_env: Iterable[str] = (),
) -> dict[str, Runner]:
    """Runners for ``backends``: ``isolate`` is ``none`` (all in this process),
    ``peers`` (torch in a worker, fastnn backends here) or ``all`` (a worker each).
    ``numpy_drop_env`` applies to a ``numpy`` worker only."""
    if isolate not in ("none", "peers", "all"):
        raise ValueError(f"isolate must be none, peers or all, got {isolate!r}")
    runners: dict[str, Runner] = {}
    for b in backends:
        own_process = isolate == "all" or (isolate == "peers" and b == "torch")
        if own_process:
            runners[b] = WorkerRunner(b, numpy_drop_env if b == "numpy" else ())
        else:
            runners[b] = InProcessRunner(b)
    return runners


def close_all(runners: dict[str, Runner]) -> None:
    for r in runners.values():
        r.close()
