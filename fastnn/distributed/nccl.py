"""Reductions of CuPy (device) buffers through NCCL (``cupy.cuda.nccl``).

MPI only carries the NCCL unique id from rank 0 to the others; the gradients
never leave the GPUs. Every rank must own a different GPU (NCCL refuses two
ranks on one device): :func:`select_device` picks ``local_rank % device_count``.
Written for the GPU path of :class:`~fastnn.distributed.DistributedDataParallel`;
it has not been run on hardware from this repository's CI (tests: ``gpu`` marker).
"""

from __future__ import annotations

import time
from typing import Any

from fastnn.distributed.world import DistributedError, World

__all__ = ["NcclReducer", "allreduce_device", "broadcast_device", "select_device"]

_COMMS: dict[int, Any] = {}


def _nccl() -> Any:
    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        raise DistributedError(
            f"reducing CuPy arrays across ranks needs CuPy built with NCCL ({exc})"
        ) from None
    if not getattr(nccl, "available", True):
        raise DistributedError("this CuPy build has no NCCL support (cupy.cuda.nccl)")
    return nccl


def select_device(world: World) -> int:
    """Make GPU ``local_rank % device_count`` current for this rank; returns its id."""
    import cupy

    n = cupy.cuda.runtime.getDeviceCount()
    if n < 1:
        raise DistributedError("no CUDA device visible to this rank")
    dev = world.local_rank % n
    cupy.cuda.Device(dev).use()
    return dev


def _communicator(world: World) -> Any:
    """One NCCL communicator per world, created collectively on first use."""
    key = id(world.comm)
    if key not in _COMMS:
        nccl = _nccl()
        uid = nccl.get_unique_id() if world.rank == 0 else None
        uid = world.bcast(uid)
        _COMMS[key] = nccl.NcclCommunicator(world.size, uid, world.rank)
    return _COMMS[key]


def _nccl_dtype(dtype: Any) -> int:
    nccl = _nccl()
    table = {
        "float16": nccl.NCCL_FLOAT16,
        "float32": nccl.NCCL_FLOAT32,
        "float64": nccl.NCCL_FLOAT64,
        "int32": nccl.NCCL_INT32,
        "int64": nccl.NCCL_INT64,
    }
    if str(dtype) not in table:
        raise TypeError(f"NCCL cannot reduce dtype {dtype}")
    return table[str(dtype)]


def allreduce_device(buf: Any, world: World, stream: Any = None) -> None:
    """In-place sum over ranks of the contiguous CuPy array ``buf`` (synchronous)."""
    import cupy

    stream = stream if stream is not None else cupy.cuda.get_current_stream()
    comm = _communicator(world)
    comm.allReduce(
        buf.data.ptr, buf.data.ptr, buf.size, _nccl_dtype(buf.dtype), _nccl().NCCL_SUM, stream.ptr
    )
    stream.synchronize()


def broadcast_device(arrays: list[Any], world: World, root: int = 0) -> None:
    """Overwrite each contiguous CuPy array with rank ``root``'s, in place."""
    import cupy

    comm = _communicator(world)
    stream = cupy.cuda.get_current_stream()
    for a in arrays:
        comm.bcast(a.data.ptr, a.size, _nccl_dtype(a.dtype), root, stream.ptr)
    stream.synchronize()


class NcclReducer:
    """Nonblocking sum-Allreduce of CuPy buffers on a dedicated stream.

    ``start`` orders the reduction after the work already queued on the current
    (compute) stream, so it overlaps the kernels backward queues next; ``wait``
    makes the compute stream wait for all reductions, then blocks the host until
    they are done (bounded by ``timeout``)."""

    def __init__(self, world: World) -> None:
        import cupy

        self.world = world
        self.comm = _communicator(world)
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def start(self, buf: Any) -> Any:
        import cupy

        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(cupy.cuda.get_current_stream())
        self.stream.wait_event(ready)
        self.comm.allReduce(
            buf.data.ptr, buf.data.ptr, buf.size, _nccl_dtype(buf.dtype), _nccl().NCCL_SUM,
            self.stream.ptr,
        )
        done = cupy.cuda.Event(disable_timing=True)
        done.record(self.stream)
        return done

    def poke(self, reqs: list[Any]) -> None:
        pass  # NCCL progresses on its own stream

    def wait(self, reqs: list[Any], timeout: float | None) -> None:
        import cupy

        current = cupy.cuda.get_current_stream()
        for ev in reqs:
            current.wait_event(ev)
        deadline = None if timeout is None else time.perf_counter() + timeout
        for ev in reqs:
            while not ev.done:
                if deadline is not None and time.perf_counter() > deadline:
                    raise DistributedError(
                        f"NCCL Allreduce did not complete within {timeout:g} s: another rank "
                        "died or stopped (FASTNN_DIST_TIMEOUT sets the limit)"
                    )
                time.sleep(0.0001)
