"""``fastnn bench --ops train --backends cuda --count-launches``: kernel launches
and host time per seed-model training step on the cuda backend.

The step is :func:`fastnn.training.train_step` on the ``seed`` preset with
``fastnn train``'s default optimizer (Adam), batch ``n``, inside
:meth:`~fastnn.backends._cuda.launch.Runtime.recording`. Under Numba's
simulator the launches are counted but not executed, so the host time is
fastnn's own Python per step (plan, bookkeeping, launch recording), without
Numba's or the driver's launch cost; on a GPU they are counted and executed,
and the host time is the time to queue a step (nothing waits for the device).
Both the fused step and the autograd path (``FASTNN_FUSED_STEP=0``) are
measured. CuPy's own kernels (the autograd path's bias adds and reductions)
are not Numba launches and are not counted: the fused step has none.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import numpy as np

__all__ = ["count_train_launches", "format_counts"]


def _measure(n: int, steps: int, fused: bool) -> dict[str, Any]:
    import fastnn
    from fastnn.backends._cuda.launch import runtime
    from fastnn.bench.train_cases import step_batch
    from fastnn.models import build_model
    from fastnn.training import TrainConfig, build_optimizer, train_step

    rt = runtime()
    arrays = "cpu" if rt.sim else "cuda"
    model = build_model("seed", 0).to(arrays)
    model.train()
    opt = build_optimizer(TrainConfig(), model.parameters())
    x, y = step_batch(n, "float32")
    x, y = rt.xp.asarray(x), rt.xp.asarray(y)
    execute = not rt.sim
    old = os.environ.get("FASTNN_FUSED_STEP")
    os.environ["FASTNN_FUSED_STEP"] = "1" if fused else "0"
    try:
        # Under the simulator the autograd path's array ops run on unset buffers.
        with fastnn.backend("cuda"), np.errstate(all="ignore"):
            with rt.recording(execute=execute):  # first step: plans, compiles, flat buffers
                train_step(model, opt, x, y)
            with rt.recording(execute=execute) as rec:
                t0 = time.perf_counter()
                for _ in range(steps):
                    train_step(model, opt, x, y)
                host = (time.perf_counter() - t0) / steps
    finally:
        if old is None:
            del os.environ["FASTNN_FUSED_STEP"]
        else:
            os.environ["FASTNN_FUSED_STEP"] = old
    kernels = Counter(name for name, _, _ in rec)
    return {
        "path": "fused" if fused else "autograd",
        "launches_per_step": len(rec) / steps,
        "copies_per_step": rec.copies / steps,
        "host_us_per_step": host * 1e6,
        "executed": execute,
        "kernels": {k: v / steps for k, v in sorted(kernels.items())},
    }


def count_train_launches(n: int = 128, steps: int = 50) -> dict[str, Any]:
    """Launches, device copies and host microseconds per seed-model step (batch ``n``),
    for the fused step and the autograd path; see the module doc."""
    from fastnn.backends._cuda.launch import runtime

    rt = runtime()
    return {
        "batch": n,
        "runtime": "simulator (launches counted, not executed)" if rt.sim
        else "gpu (launches counted and executed)",
        "paths": [_measure(n, steps, True), _measure(n, max(2, steps // 10), False)],
    }


def format_counts(doc: dict[str, Any]) -> str:
    lines = [f"seed-model training step, batch {doc['batch']}, cuda backend: {doc['runtime']}",
             f"{'path':10s} {'launches/step':>14s} {'copies/step':>12s} {'host us/step':>13s}"]
    for r in doc["paths"]:
        lines.append(f"{r['path']:10s} {r['launches_per_step']:14.1f} {r['copies_per_step']:12.1f} "
                     f"{r['host_us_per_step']:13.1f}")
    for r in doc["paths"]:
        ks = ", ".join(f"{k} x{v:g}" for k, v in r["kernels"].items())
        lines.append(f"  {r['path']}: {ks}")
    return "\n".join(lines)



