"""CUDA graph replay of the fused cuda training step (``fastnn train --cuda-graph``).

:class:`GraphStep` wraps a :class:`~fastnn.training.cuda_step.FusedStep`. The
first step of each batch size runs eagerly (it compiles the kernels and
writes the optimizer's hyper-parameters to the device); the second is
captured on a CuPy stream -- the plan's bound launches (forward, backward)
and the optimizer's multi-tensor launch, all Numba kernels launched on that
stream -- and every step from then on is: copy the batch's row indices into
the plan's static index buffer, do the optimizer's host bookkeeping (step
counts, hyper-parameters when an lr schedule changed them), replay the graph.
Everything the graph reads per step lives at a fixed address: the static
index buffer, the flat parameter/gradient/state buffers, the device-side
hyper-parameters and Adam step counter (:mod:`fastnn.backends._cuda.
multi_tensor`). If the optimizer re-binds its launch (its options changed
compile-time flags), the graph is captured again.

Where capture is not possible (Numba's simulator, a CuPy without stream
capture, a capture that fails) it prints one line saying why and runs the
fused step eagerly. The capture API is an object (:class:`CupyCapture`) so a
test can substitute one that records and replays launches in the simulator.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

__all__ = ["CupyCapture", "GraphStep", "fused_graph_step"]


class CupyCapture:
    """Stream capture with CuPy: ``unavailable()`` says why not (or None)."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt

    def unavailable(self) -> str | None:
        if self.rt.sim:
            return "CUDA graphs need a GPU (Numba's simulator cannot capture)"
        import cupy

        if not hasattr(cupy.cuda.Stream, "begin_capture"):
            return f"CuPy {cupy.__version__} has no stream capture"
        return None

    def new_stream(self) -> Any:
        import cupy

        return cupy.cuda.Stream(non_blocking=True)

    def on(self, stream: Any) -> Any:
        return stream  # a CuPy stream is a context manager making it current

    def begin(self, stream: Any) -> None:
        stream.begin_capture()

    def end(self, stream: Any) -> Any:
        return stream.end_capture()

    def replay(self, graph: Any, stream: Any) -> None:
        graph.launch(stream)


class GraphStep:
    """Call with a batch's row indices; see the module doc."""

    def __init__(self, fused: Any, api: Any = None, out: Any = None) -> None:
        self.fused = fused
        self.api = api if api is not None else CupyCapture(fused.rt)
        self.out = out if out is not None else sys.stderr
        self.reason = self.api.unavailable()
        self.stream = None if self.reason else self.api.new_stream()
        self._graphs: dict[int, tuple[Any, tuple]] = {}
        self._seen: set[int] = set()
        self.replays = 0
        if self.reason:
            self._note(self.reason)

    def _note(self, why: str) -> None:
        print(f"note: --cuda-graph: {why}; running the fused step without a graph",
              file=self.out, flush=True)

    def _opt_launches(self) -> tuple:
        return tuple(g.launch for g in self.fused.layout.groups)

    def _capture(self, plan: Any) -> Any:
        api, stream = self.api, self.stream
        api.begin(stream)
        try:
            for f in plan.launches:
                f()
            for f in self._opt_launches():
                f()
        except BaseException:
            with contextlib.suppress(Exception):
                api.end(stream)
            raise
        return api.end(stream)

    def __call__(self, idx: Any) -> None:
        fused = self.fused
        if self.reason:
            fused.run_indices(idx)
            return
        n = int(idx.shape[0])
        with self.api.on(self.stream):
            plan = fused.plan(n, (), True)
            fused.rt.copy_into(plan.idx, idx)
            if n not in self._seen:  # warm-up: compile, allocate, set hyper-parameters
                self._seen.add(n)
                fused.launch(plan)
                return
            for p, g in fused.grads:
                p.grad = g
            fused.opt._flat_step(launch=False)  # host bookkeeping; the graph launches
            entry = self._graphs.get(n)
            if entry is None or entry[1] != self._opt_launches():
                try:
                    graph = self._capture(plan)
                except Exception as exc:  # noqa: BLE001 - any capture failure: run eagerly
                    self.reason = f"capture failed ({type(exc).__name__}: {exc})"
                    self._note(self.reason)
                    for f in (*plan.launches, *self._opt_launches()):
                        f()
                    return
                entry = self._graphs[n] = (graph, self._opt_launches())
            self.api.replay(entry[0], self.stream)
            self.replays += 1


def fused_graph_step(fused: Any, api: Any = None) -> GraphStep:
    """A :class:`GraphStep` over ``fused`` (one per fused step, reused across epochs)."""
    g = getattr(fused, "_graph_step", None)
    if g is None or (api is not None and g.api is not api):
        g = fused._graph_step = GraphStep(fused, api)
    return g
