"""The MPI world a process runs in: who launched it, its rank and size, and the
few collectives fastnn needs (all through mpi4py; MPI is imported only when a
launcher started more than one rank, or when a communicator is passed in)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "INSTALL_HINT",
    "DistributedError",
    "World",
    "init",
    "launched_size",
    "rank",
    "size",
]

INSTALL_HINT = 'pip install "fastnn[distributed]" (mpi4py + MPICH), or mpi4py built on your MPI'

# World-size variables that MPI launchers export to every rank: MPICH / Intel MPI
# (hydra), Open MPI, MVAPICH.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class DistributedError(RuntimeError):
    """MPI is missing, or the ranks of a job disagree or stopped answering.

    ``collective``: every rank raised it at the same point (a check on gathered
    values), so no rank waits in a collective and the job can end normally.
    """

    def __init__(self, message: str, *, collective: bool = False) -> None:
        super().__init__(message)
        self.collective = collective


def launched_size() -> int | None:
    """World size announced by an MPI launcher in the environment, else None."""
    for var in _SIZE_VARS:
        v = os.environ.get(var)
        if v is not None and v.strip().isdigit():
            return int(v)
    return None


def import_mpi() -> Any:
    """``mpi4py.MPI``, or a :class:`DistributedError` saying what to install."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DistributedError(f"MPI support needs mpi4py ({exc}): {INSTALL_HINT}") from None
    return MPI


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel job.

    ``comm`` is an mpi4py communicator (None for a single process, where every
    collective below is the identity). ``local_rank``/``local_size``: ranks on
    this machine (to share its cores or pick its GPU).
    """

    rank: int = 0
    size: int = 1
    comm: Any = None
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_sum(self, values: Any) -> np.ndarray:
        """Element-wise sum over ranks of a host float64 vector (a copy)."""
        out = np.array(values, dtype=np.float64)
        if self.comm is not None:
            from mpi4py import MPI

            self.comm.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
        return out

    def allgather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (pickled), in rank order."""
        return [obj] if self.comm is None else self.comm.allgather(obj)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Rank ``root``'s ``obj`` (pickled) on every rank."""
        return obj if self.comm is None else self.comm.bcast(obj, root=root)

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (after this rank printed why)."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.comm is not None:
            # MPI_Abort has the launcher kill every rank, its own output
            # forwarding too: give it a moment to pass on the line just written
            # (on a busy machine the kill won that race now and then).
            time.sleep(0.3)
            self.comm.Abort(code)
        raise SystemExit(code)

    def check_same(self, what: str, values: dict[str, Any]) -> None:
        """Raise :class:`DistributedError` on every rank, naming each key and the
        rank values, unless all ranks passed equal ``values``."""
        every = self.allgather(values)
        diffs = []
        for key in sorted({k for v in every for k in v}):
            seen = [v.get(key) for v in every]
            if any(s != seen[0] for s in seen[1:]):
                per_rank = ", ".join(f"rank {r}: {s!r}" for r, s in enumerate(seen))
                diffs.append(f"{key} ({per_rank})")
        if diffs:
            raise DistributedError(
                f"the {self.size} ranks were started with different {what}: " + "; ".join(diffs),
                collective=True,
            )


_WORLD: list[World | None] = [None]


def _from_comm(comm: Any) -> World:
    MPI = import_mpi()  # noqa: N806 - mpi4py's name
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return World(comm.Get_rank(), comm.Get_size(), comm, local.Get_rank(), local.Get_size())
    finally:
        local.Free()


def init(comm: Any = None) -> World:
    """The world of this process (cached after the first call).

    ``comm``: an mpi4py communicator to train over (e.g. a sub-communicator).
    Without it, a process started by ``mpiexec -n N`` (N > 1) joins
    ``COMM_WORLD``; anything else is a single-process world that never imports
    MPI. Raises :class:`DistributedError` when a launcher started several ranks
    but mpi4py is not installed.
    """
    if comm is not None:
        _WORLD[0] = _from_comm(comm) if comm.Get_size() > 1 else World()
        return _WORLD[0]
    if _WORLD[0] is None:
        n = launched_size()
        if n is not None and n > 1:
            try:
                MPI = import_mpi()  # noqa: N806
            except DistributedError as exc:
                raise DistributedError(
                    f"started by an MPI launcher with {n} ranks, but {exc}"
                ) from None
            _WORLD[0] = _from_comm(MPI.COMM_WORLD)
        else:
            _WORLD[0] = World()
    return _WORLD[0]


def rank() -> int:
    """This process's rank (0 outside MPI)."""
    return init().rank


def size() -> int:
    """Number of ranks in the job (1 outside MPI)."""
    return init().size
