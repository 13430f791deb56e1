"""The GPU path of fastnn.distributed: NCCL reductions of CuPy buffers.

Behind the ``gpu`` marker (skipped without an NVIDIA GPU and CuPy). The
single-GPU tests drive the NCCL calls on a one-rank communicator; the
DistributedDataParallel test needs two GPUs (NCCL refuses two ranks on one).
Not yet run on hardware from this repository.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import PKG_ROOT

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None,
                       reason='no mpi4py: pip install "fastnn[distributed]"'),
]


def _self_world():
    from mpi4py import MPI

    from fastnn.distributed import World

    # One rank, but a real communicator: the NCCL calls run (as a sum over one GPU).
    return World(0, 1, MPI.COMM_SELF)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nccl_allreduce_and_broadcast_on_one_gpu(dtype):
    import cupy

    from fastnn.distributed.nccl import allreduce_device, broadcast_device

    world = _self_world()
    a = cupy.arange(1000, dtype=dtype)
    allreduce_device(a, world)
    np.testing.assert_array_equal(cupy.asnumpy(a), np.arange(1000, dtype=dtype))
    b = cupy.full(7, 3, dtype=dtype)
    broadcast_device([a, b], world)
    np.testing.assert_array_equal(cupy.asnumpy(b), np.full(7, 3, dtype=dtype))


def test_nccl_reducer_overlaps_and_waits():
    import cupy

    from fastnn.distributed.nccl import NcclReducer

    reducer = NcclReducer(_self_world())
    bufs = [cupy.full(n, 2.0, dtype=cupy.float32) for n in (10, 1 << 20)]
    reqs = [reducer.start(b) for b in bufs]
    reducer.wait(reqs, timeout=60)
    for b in bufs:
        assert float(b.sum()) == 2.0 * b.size


_SCRIPT = r"""
import cupy, numpy as np
import fastnn, fastnn.distributed as dist
from fastnn import functional as F
from fastnn.autograd import Tensor
from fastnn.distributed.nccl import select_device
from fastnn.models import build_model

world = dist.init()
select_device(world)
model = build_model("seed", world.rank).to("cuda")   # differs per rank: DDP broadcasts
ref = build_model("seed", 0).to("cuda")
ddp = dist.DistributedDataParallel(model, world)
x = cupy.asarray(np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32))
y = cupy.arange(8) % 10
with fastnn.backend("cuda"):
    F.cross_entropy(ddp(Tensor(x[4 * world.rank:4 * world.rank + 4]), global_batch=8),
                    y[4 * world.rank:4 * world.rank + 4]).backward()
    F.cross_entropy(ref(Tensor(x)), y).backward()
for p, q in zip(ref.parameters(), ddp.parameters()):
    np.testing.assert_allclose(cupy.asnumpy(q.grad), cupy.asnumpy(p.grad), rtol=1e-4, atol=1e-6)
print("ok", world.rank)
"""


def test_ddp_on_two_gpus_gives_the_global_batch_gradient(tmp_path):
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 GPUs (NCCL allows one rank per GPU)")
    if shutil.which("mpiexec") is None:
        pytest.skip('no mpiexec: pip install "fastnn[distributed]"')
    script = tmp_path / "ddp_gpu.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(PKG_ROOT)}
    r = subprocess.run(["mpiexec", "-n", "2", sys.executable, str(script)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok") == 2
