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

``opt = model.shard_optimizer(opt)`` before the loop makes each rank update only
its slice of the parameters (ZeRO stage 1, :mod:`fastnn.distributed.zero`).

``pip install "fastnn[distributed]"`` brings mpi4py and MPICH. Nothing here
imports MPI until a launcher started more than one rank, so the package works
without it. CuPy parameters are reduced on the GPUs with NCCL
(:mod:`fastnn.distributed.nccl`).
"""

from __future__ import annotations

from fastnn.data.loader import share_bounds
from fastnn.distributed.ddp import PHASES, DistributedDataParallel, broadcast_parameters
from fastnn.distributed.world import (
    INSTALL_HINT,
    DistributedError,
    World,
    init,
    launched_size,
    rank,
    size,
)
from fastnn.distributed.zero import ShardedOptimizer

__all__ = [
    "INSTALL_HINT",
    "PHASES",
    "DistributedDataParallel",
    "DistributedError",
    "ShardedOptimizer",
    "World",
    "broadcast_parameters",
    "init",
    "launched_size",
    "rank",
    "share_bounds",
    "size",
]
