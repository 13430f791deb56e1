"""Where a training step's time goes: each backend op's share of the step next to its
own floor, and the epoch against the epoch's floor (``fastnn bench --ops train``).

Every op of the backend module (``fastnn.backends.cpu``: the ``_C`` kernels) is
wrapped in a timer for the profiled steps only; what the step spends outside the
ops is the Python, autograd and NumPy glue between them. That glue is also timed
alone: steps in which every op returns the output it gave in a recorded step (no
kernel runs), so the gap between the two is the glue running with cold caches
between kernels. Floors come from the same
run's ceilings (:mod:`fastnn.bench.machine`): an op's floor is the larger of its
FLOPs at NumPy's sgemm rate and its bytes at the large-copy bandwidth, so a
kernel at 1.0x its floor runs as fast as NumPy's best GEMM (or a plain copy)
would. The epoch floor is the step's FLOPs times the steps of an epoch at the
sgemm rate.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from fastnn.geometry import conv_out_size

__all__ = ["OpStats", "StepProfile", "format_profile", "op_cost", "profile_train_step",
           "replayed_backend", "timed_backend", "to_json"]

#: Ops that update their first arrays in place (counted as read and written).
_IN_PLACE = {"adam_step": 4, "sgd_step": 3}
#: The multi-tensor steps: their list arguments updated in place (grads are read).
_IN_PLACE_LISTS = {"adam_step_multi": (0, 2, 3), "sgd_step_multi": (0, 2)}


def _arrays(values: Any) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for v in values if isinstance(values, (tuple, list)) else (values,):
        if isinstance(v, np.ndarray):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out.extend(_arrays(v))
    return out


def _conv_flops(x: np.ndarray, w: np.ndarray, stride: Any, padding: Any, dilation: Any) -> float:
    """2 * N * O * OH * OW * (C/groups) * KH * KW for x (N,C,H,W), w (O,C/g,KH,KW)."""
    oh = conv_out_size(x.shape[2], w.shape[2], stride[0], padding[0], dilation[0])
    ow = conv_out_size(x.shape[3], w.shape[3], stride[1], padding[1], dilation[1])
    return 2.0 * x.shape[0] * w.shape[0] * oh * ow * w.shape[1] * w.shape[2] * w.shape[3]


def op_cost(name: str, args: tuple, result: Any) -> tuple[float, float]:
    """(FLOPs, bytes moved) of one backend call ``name(*args) -> result``: the FLOPs
    of the products (GEMMs and convolutions, 2 per multiply-add); bytes are every
    array argument and result once, in-place updates twice."""
    flops = 0.0
    if name == "matmul":
        a, b, ta, tb = args[:4]
        m, k = (a.shape[-1], a.shape[-2]) if ta else (a.shape[-2], a.shape[-1])
        n = b.shape[-2] if tb else b.shape[-1]
        batch = max(a.shape[0] if a.ndim == 3 else 1, b.shape[0] if b.ndim == 3 else 1)
        flops = 2.0 * batch * m * n * k
    elif name == "linear_relu":
        x, w = args[0], args[1]
        flops = 2.0 * x.shape[0] * w.shape[0] * w.shape[1]
    elif name == "linear_relu_backward":
        x, w = args[1], args[2]
        need_x, need_w = (args[4:6] + (True, True))[:2]
        flops = (int(bool(need_x)) + int(bool(need_w))) * 2.0 * x.shape[0] * w.shape[0] * w.shape[1]
    elif name in ("conv2d", "conv2d_relu_max_pool2d"):
        flops = _conv_flops(args[0], args[1], *args[3:6])
    elif name == "conv2d_relu_max_pool2d_backward":
        passes = int(bool(args[12])) + int(bool(args[13]))  # need_x, need_w
        flops = passes * _conv_flops(args[1], args[2], *args[4:7])
    elif name == "conv2d_backward_weight":
        gy, x = args[0], args[1]
        kh, kw = args[2]
        flops = 2.0 * gy.size * x.shape[1] // max(int(args[6]), 1) * kh * kw
    elif name == "conv2d_backward_input":
        gy, w = args[0], args[1]
        flops = 2.0 * gy.size * w.shape[1] * w.shape[2] * w.shape[3]
    inputs = _arrays(args)
    moved = sum(a.nbytes for a in inputs) + sum(a.nbytes for a in _arrays(result))
    moved += sum(a.nbytes for a in inputs[: _IN_PLACE.get(name, 0)])
    moved += sum(a.nbytes for i in _IN_PLACE_LISTS.get(name, ()) for a in _arrays(args[i]))
    return flops, float(moved)


@dataclass
class OpStats:
    """One op's totals over the profiled steps."""

    calls: int = 0
    seconds: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    #: The timer's own bookkeeping around the calls (cost accounting), which is
    #: neither the op nor the step's glue.
    bookkeeping: float = 0.0


@dataclass
class StepProfile:
    """Per-step figures (ops summed over ``steps`` steps, then divided)."""

    model: str
    backend: str
    batch: int
    steps: int
    step_seconds: float
    ops: dict[str, OpStats] = field(default_factory=dict)
    #: Mean wall time of the op-timed steps themselves. The ops run inside them, so
    #: their sum never exceeds it; the difference is the time outside the ops.
    timed_step_seconds: float = 0.0
    #: Mean wall time of a step whose ops all replay a recorded step's outputs: the
    #: Python, autograd and NumPy glue alone, with hot caches (None: not measured).
    replayed_step_seconds: float | None = None

    def per_step(self, s: OpStats) -> OpStats:
        n = self.steps
        return OpStats(s.calls // n, s.seconds / n, s.flops / n, s.bytes / n)

    @property
    def flops_per_step(self) -> float:
        return sum(s.flops for s in self.ops.values()) / self.steps

    @property
    def op_seconds_per_step(self) -> float:
        return sum(s.seconds for s in self.ops.values()) / self.steps

    @property
    def outside_seconds_per_step(self) -> float:
        """Python, autograd and glue per step, from the same steps the ops were timed
        in (so two separately timed runs' noise cannot make it negative), less the
        timer's own bookkeeping."""
        kept = sum(s.bookkeeping for s in self.ops.values()) / self.steps
        return max(self.timed_step_seconds - self.op_seconds_per_step - kept, 0.0)


@contextlib.contextmanager
def _wrapped(module: ModuleType, names: list[str], wrap: Any) -> Iterator[None]:
    """``module.<name> = wrap(name, original)`` for each name while inside; the
    originals are restored on exit, also after an error."""
    originals = {n: getattr(module, n) for n in names}
    try:
        for n, fn in originals.items():
            setattr(module, n, wrap(n, fn))
        yield
    finally:
        for n, fn in originals.items():
            setattr(module, n, fn)


@contextlib.contextmanager
def timed_backend(module: ModuleType, names: list[str]) -> Iterator[dict[str, OpStats]]:
    """Replace ``module.<name>`` for each name by a timing wrapper while inside; yields
    the per-op totals. Restores the originals on exit, also after an error."""
    stats: dict[str, OpStats] = {}

    def wrap(name: str, fn: Any) -> Any:
        st = stats.setdefault(name, OpStats())
        clock = time.perf_counter

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            out = fn(*args, **kwargs)
            t1 = clock()
            st.seconds += t1 - t0
            st.calls += 1
            f, b = op_cost(name, args, out)
            st.flops += f
            st.bytes += b
            st.bookkeeping += clock() - t1
            return out

        return timed

    with _wrapped(module, names, wrap):
        yield stats


@contextlib.contextmanager
def replayed_backend(module: ModuleType, names: list[str]) -> Iterator[Any]:
    """While inside, ``module.<name>`` for each name records its calls (name and
    result) until ``replay()`` is called on the yielded object; from then on each call
    returns the next recorded result without running the op (in-place ops do
    nothing), cycling through the record. A call out of the recorded order raises
    RuntimeError. Restores the originals on exit, also after an error."""

    class Record:
        def __init__(self) -> None:
            self.calls: list[tuple[str, Any]] = []
            self.replaying = False
            self.at = 0

        def replay(self) -> None:
            if not self.calls:
                raise RuntimeError("replayed_backend: nothing was recorded")
            self.replaying, self.at = True, 0

    rec = Record()

    def wrap(name: str, fn: Any) -> Any:
        def op(*args: Any, **kwargs: Any) -> Any:
            if not rec.replaying:
                out = fn(*args, **kwargs)
                rec.calls.append((name, out))
                return out
            want, out = rec.calls[rec.at % len(rec.calls)]
            if want != name:
                raise RuntimeError(f"replayed_backend: {name} called where {want} was recorded")
            rec.at += 1
            return out

        return op

    with _wrapped(module, names, wrap):
        yield rec


def profile_train_step(model_name: str = "seed", backend: str = "cpu", batch: int = 128,
                       steps: int = 30, warmup: int = 5) -> StepProfile:
    """Profile :func:`fastnn.training.train_step` (what ``fastnn train`` runs) of
    preset ``model_name`` with ``fastnn train``'s default optimizer on a fixed batch.
    The step time is the median of ``steps`` untimed-op steps; the op times (and the
    time outside them) come from ``steps`` more steps with every op of the backend
    wrapped."""
    import fastnn
    from fastnn.backends import contract, get_backend
    from fastnn.bench.train_cases import step_batch
    from fastnn.models import build_model
    from fastnn.training import TrainConfig, build_optimizer, train_step

    if backend != "cpu":
        raise ValueError(f"backend must be 'cpu' (the profiled host kernels), got {backend!r}")
    model = build_model(model_name, 0)
    model.train()
    opt = build_optimizer(TrainConfig(model=model_name), model.parameters())
    x, y = step_batch(batch, "float32")
    module = get_backend(backend)
    names = [n for n in contract.ops() if callable(getattr(module, n, None))]
    with fastnn.backend(backend):
        for _ in range(warmup):
            train_step(model, opt, x, y)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            train_step(model, opt, x, y)
            times.append(time.perf_counter() - t0)
        with timed_backend(module, names) as stats:
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(model, opt, x, y)
            timed = (time.perf_counter() - t0) / steps
        # Last, as it leaves the model's gradients pointing at recorded arrays.
        with replayed_backend(module, names) as rec:
            train_step(model, opt, x, y)
            rec.replay()
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(model, opt, x, y)
            replayed = (time.perf_counter() - t0) / steps
    ops = {n: s for n, s in stats.items() if s.calls}
    return StepProfile(model_name, backend, batch, steps, statistics.median(times), ops, timed,
                       replayed)


def format_profile(p: StepProfile, sgemm_gflops: float, copy_gb_s: float,
                   epoch_steps: int = 469, epoch_seconds: float | None = None) -> str:
    """The profile as a table: per op, its calls, ms per step, share of the step, GFLOP,
    floor and time over floor; then the rest (Python, autograd, NumPy glue) and the
    epoch against its floor. ``epoch_seconds``: a measured epoch to compare (e.g.
    the same run's ``train_mnist`` row), else the step time times ``epoch_steps``."""
    step = p.step_seconds
    w = max([37, *map(len, p.ops)])  # the op column: the longest name
    lines = [
        f"step profile: {p.model} model, batch {p.batch}, {p.backend} backend, "
        f"{step * 1e3:.2f} ms/step (median of {p.steps}); floors at NumPy sgemm "
        f"{sgemm_gflops:.0f} GFLOP/s and copy {copy_gb_s:.0f} GB/s",
        f"{'op':{w}s} {'calls':>5s} {'ms/step':>8s} {'share':>6s} {'GFLOP':>7s} "
        f"{'floor ms':>8s} {'x floor':>8s}",
    ]
    rows = sorted(p.ops.items(), key=lambda kv: -kv[1].seconds)
    floor_total = 0.0
    for name, total in rows:
        s = p.per_step(total)
        floor = max(s.flops / (sgemm_gflops * 1e9), s.bytes / (copy_gb_s * 1e9))
        floor_total += floor
        ratio = f"{s.seconds / floor:7.2f}x" if floor > 0 else "       -"
        lines.append(f"{name:{w}s} {s.calls:5d} {s.seconds * 1e3:8.3f} "
                     f"{s.seconds / step:6.1%} {s.flops / 1e9:7.3f} {floor * 1e3:8.3f} {ratio}")
    rest = p.outside_seconds_per_step
    lines.append(f"{'(outside the ops: Python, autograd)':{w}s} {'':5s} {rest * 1e3:8.3f} "
                 f"{rest / step:6.1%}")
    if p.replayed_step_seconds is not None:
        glue = p.replayed_step_seconds
        lines.append(f"{'  (that Python alone, hot caches)':{w}s} {'':5s} {glue * 1e3:8.3f} "
                     f"{glue / step:6.1%}")
    flop_floor = p.flops_per_step / (sgemm_gflops * 1e9)
    lines.append(f"step: {step * 1e3:.2f} ms = {step / flop_floor:.2f}x its FLOP floor "
                 f"({p.flops_per_step / 1e9:.3f} GFLOP at {sgemm_gflops:.0f} GFLOP/s = "
                 f"{flop_floor * 1e3:.2f} ms; with memory-bound ops {floor_total * 1e3:.2f} ms)")
    epoch_floor = flop_floor * epoch_steps
    if epoch_seconds is None or not math.isfinite(epoch_seconds):
        epoch_seconds, how = step * epoch_steps, f"step x {epoch_steps}"
    else:
        how = "measured"
    lines.append(f"epoch ({epoch_steps} steps): {epoch_seconds:.2f} s ({how}) = "
                 f"{epoch_seconds / epoch_floor:.2f}x its floor of {epoch_floor:.2f} s "
                 f"({p.flops_per_step * epoch_steps / 1e9:.0f} GFLOP)")
    return "\n".join(lines)


def to_json(p: StepProfile, sgemm_gflops: float, copy_gb_s: float) -> dict[str, Any]:
    """The profile's per-step figures as JSON-ready data."""
    ops = {}
    for name, total in p.ops.items():
        s = p.per_step(total)
        floor = max(s.flops / (sgemm_gflops * 1e9), s.bytes / (copy_gb_s * 1e9))
        ops[name] = {"calls": s.calls, "ms": s.seconds * 1e3, "gflop": s.flops / 1e9,
                     "mbytes": s.bytes / 1e6, "floor_ms": floor * 1e3}
    return {"model": p.model, "backend": p.backend, "batch": p.batch, "steps": p.steps,
            "step_ms": p.step_seconds * 1e3, "gflop_per_step": p.flops_per_step / 1e9,
            "timed_step_ms": p.timed_step_seconds * 1e3,
            "outside_ops_ms": p.outside_seconds_per_step * 1e3,
            "python_alone_ms": (None if p.replayed_step_seconds is None
                                else p.replayed_step_seconds * 1e3),
            "ops": ops}
