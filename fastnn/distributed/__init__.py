"""Data-parallel training across processes and machines, on MPI (mpi4py).

Launch N copies with ``mpiexec -n N``; each is one rank. For a loop of your own::

    import fastnn.distributed as dist

    world = dist.init()                    # rank/size from the launcher; 1 without one
    model = dist.DistributedDataParallel(build_model("seed"))   # rank 0's weights
    for x, y in DataLoader(..., shuffle=True, shard=(world.rank, world.size)):
        loss = F.cross_entropy(model(Tensor(x)), y)
        opt.zero_grad()
        loss.backward()                     # gradients come back averaged
        opt.step()

``pip install "fastnn[distributed]"`` brings mpi4py and MPICH. Nothing here
imports MPI until a launcher started more than one rank, so the package works
without it. CuPy parameters are reduced on the GPUs with NCCL
(:mod:`fastnn.distributed.nccl`).
"""

from __future__ import annotations

from fastnn.data.loader import share_bounds
from fastnn.distributed.ddp import DistributedDataParallel, broadcast_parameters
from fastnn.distributed.world import (
    INSTALL_HINT,
    DistributedError,
    World,
    init,
    launched_size,
    rank,
    size,
)

__all__ = [
    "INSTALL_HINT",
    "DistributedDataParallel",
    "DistributedError",
    "World",
    "broadcast_parameters",
    "init",
    "launched_size",
    "rank",
    "share_bounds",
    "size",
]
