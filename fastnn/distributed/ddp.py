"""Data-parallel gradient averaging: :class:`DistributedDataParallel`.

Every rank holds the same model. Backward hooks (the autograd engine's
post-accumulate hooks) copy each gradient, scaled by this rank's share of the
global batch, into a flat bucket as soon as it is final; a full bucket starts a
nonblocking sum-Allreduce while backward goes on with the layers below. The
hook of the last gradient waits for the buckets and hands every parameter its
reduced gradient, so ``loss.backward()`` returns with the global-batch
gradient on every rank.

With :meth:`DistributedDataParallel.shard_optimizer` the buckets are
reduce-scattered instead (each rank receives the summed gradient of its
1/N slice of every bucket) and the optimizer runs on that slice only
(:mod:`fastnn.distributed.zero`). A bucket of one parameter (on the seed
model, the 2.8 MB weight of the first Linear) is then sent from that
parameter's gradient array, without a copy, when the ranks' shares are equal.

``times`` splits each rank's wall time into phases (forward, backward,
reduction calls, waits, optimizer, parameter allgather, the rest) so a
benchmark can say where a step goes.

Why weight by share: each rank's loss is the mean over its ``n_r`` samples, so
``sum_r (n_r / N) * grad_r`` is the gradient of the mean over all ``N`` samples,
also for a last batch whose shares differ in size.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from fastnn._array import array_module, is_cupy
from fastnn.distributed.world import DistributedError, World, import_mpi, init

__all__ = ["DistributedDataParallel", "broadcast_parameters"]

_DEFAULT_TIMEOUT = 300.0

#: The phases of ``DistributedDataParallel.times``: the module's forward; the loss
#: and backward compute (hooks excluded); the hooks' bucket fills and reduction
#: calls; waiting for reductions; the sharded optimizer step; its parameter
#: allgather; everything else (the optimizer when not sharded, data, the loop).
PHASES = ("forward", "backward", "reduce", "wait", "optimizer", "allgather", "other")


def _timeout_from_env() -> float | None:
    v = os.environ.get("FASTNN_DIST_TIMEOUT", "")
    if not v:
        return _DEFAULT_TIMEOUT
    try:
        t = float(v)
    except ValueError:
        raise ValueError(f"FASTNN_DIST_TIMEOUT must be a number of seconds, got {v!r}") from None
    return None if t <= 0 else t


_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


class _MPIReducer:
    """Sum-Allreduce of host (NumPy) buffers through MPI."""

    def __init__(self, world: World) -> None:
        self.MPI = import_mpi()
        self.comm = world.comm

    def start(self, buf: Any) -> Any:
        return self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def start_scatter(self, buf: Any, out: Any, counts: list[int]) -> Any:
        """Sum ``buf`` over ranks; this rank receives its ``counts[rank]`` part in ``out``."""
        return self.comm.Ireduce_scatter(buf, out, counts, op=self.MPI.SUM)

    def poke(self, reqs: list[Any]) -> None:
        # MPICH progresses nonblocking collectives only inside MPI calls: a test
        # between layers lets a bucket move while backward computes the next one.
        self.MPI.Request.Testall(reqs)

    def wait(self, reqs: list[Any], timeout: float | None) -> None:
        if timeout is None:
            self.MPI.Request.Waitall(reqs)
            return
        deadline = time.perf_counter() + timeout
        while not self.MPI.Request.Testall(reqs):
            # Give the core away between polls: where ranks share cores with each
            # other (or other jobs), spinning would delay the rank we wait for.
            _yield()
            if time.perf_counter() > deadline:
                raise DistributedError(
                    f"gradient Allreduce did not complete within {timeout:g} s: another "
                    "rank died or stopped (FASTNN_DIST_TIMEOUT sets the limit)"
                )


def broadcast_parameters(module: Any, world: World | None = None, root: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank ``root``'s, in place."""
    world = world if world is not None else init()
    if world.comm is None:
        return
    arrays = [p.data for p in module.parameters()] + [
        b for b in module.buffers() if b is not None
    ]
    if any(is_cupy(a) for a in arrays):
        from fastnn.distributed.nccl import broadcast_device

        broadcast_device(arrays, world, root)
        return
    for a in arrays:
        world.comm.Bcast(a, root=root)


class _Bucket:
    __slots__ = ("params", "offsets", "numel", "buffer", "filled", "request", "xp", "dtype",
                 "target", "counts", "shard")

    def __init__(self, params: list[Any]) -> None:
        self.params = params
        self.offsets: dict[int, int] = {}
        n = 0
        for p in params:
            self.offsets[id(p)] = n
            n += p.data.size
        self.numel = n
        self.xp = array_module(params[0].data)
        self.dtype = params[0].data.dtype
        # One buffer for the wrapper's life (a fresh one per step costs page faults);
        # parameters' reduced .grad are views of it, valid until the next backward.
        self.buffer = self.xp.empty(n, dtype=self.dtype)
        self.filled: set[int] = set()
        self.request: Any = None
        # What this step reduces: ``buffer``, or (sharded, equal shares) the
        # gradient array of the bucket's only parameter, sent as it is.
        self.target: Any = self.buffer
        self.counts: list[int] | None = None  # sharded: every rank's slice length
        self.shard: Any = None  # sharded: this rank's summed gradient slice

    @property
    def ready(self) -> bool:
        return len(self.filled) == len(self.params)

    def view(self, p: Any) -> Any:
        off = self.offsets[id(p)]
        return self.buffer[off:off + p.data.size]


class DistributedDataParallel:
    """Wrap ``module`` so that ``loss.backward()`` leaves gradients averaged over ranks.

    ``DistributedDataParallel(module, world=None, bucket_mb=1.0, timeout=None)``:
    broadcasts rank 0's parameters and buffers, then registers one
    post-accumulate hook per parameter. Call the wrapper like the module;
    ``global_batch=N`` (keyword) says the samples of all ranks together, so
    unequal shares are weighted by size (default: every rank has an equal share).
    A rank whose share of a batch is empty calls :meth:`reduce_without_batch`
    instead of forward/backward. Parameters that got no gradient count as zero.

    With one rank the wrapper only forwards calls. ``timeout`` (seconds, default
    ``$FASTNN_DIST_TIMEOUT`` or 300; <= 0: none) bounds the wait for the other
    ranks. ``comm_seconds`` accumulates the time spent waiting for reductions
    (and for the sharded optimizer's parameter allgather) and ``reduced_bytes``
    the bytes reduced; ``times`` splits the wall time since the first call into
    :data:`PHASES` and ``steps`` counts reductions (:meth:`reset_times`).

    ``opt = ddp.shard_optimizer(opt)`` (host arrays): reduce-scatter instead of
    Allreduce, each rank updating its slice of the parameters (ZeRO stage 1,
    :mod:`fastnn.distributed.zero`); ``fastnn train`` does this on several ranks.

    BatchNorm statistics stay local to each rank (as torch's DDP without
    SyncBatchNorm); :meth:`average_buffers` averages running statistics.
    Attributes not defined here are the wrapped module's (``parameters``,
    ``state_dict``, ``train``, ...).
    """

    def __init__(
        self,
        module: Any,
        world: World | None = None,
        bucket_mb: float = 1.0,
        timeout: float | None = None,
    ) -> None:
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not (
            bucket_mb > 0
        ):
            raise ValueError(f"bucket_mb must be a positive number, got {bucket_mb!r}")
        if not callable(module) or not hasattr(module, "parameters"):
            raise TypeError(f"module must be a fastnn.nn.Module, got {type(module).__name__}")
        self.module = module
        self.world = world if world is not None else init()
        if timeout is None:
            self.timeout = _timeout_from_env()
        else:
            self.timeout = timeout if timeout > 0 else None
        self.comm_seconds = 0.0
        self.reduced_bytes = 0
        self.times = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self._mark: float | None = None
        self._sharded: Any = None
        self._weight = 1.0
        self._scale = 1.0  # what this rank multiplies its gradients by before the sum
        self._armed = False
        self._buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        self._handles: list[Any] = []
        if self.world.size == 1:
            self._reducer: Any = None
            return
        broadcast_parameters(module, self.world)
        params = [p for p in module.parameters() if p.requires_grad]
        if any(is_cupy(p.data) for p in params):
            from fastnn.distributed.nccl import NcclReducer

            self._reducer = NcclReducer(self.world)
        else:
            self._reducer = _MPIReducer(self.world)
        self._params = params
        self._cap = int(bucket_mb * 2**20)
        self._set_buckets(self._make_buckets(params, self._cap))
        for p in params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _set_buckets(self, buckets: list[_Bucket]) -> None:
        self._buckets = buckets
        self._bucket_of = {id(p): b for b in buckets for p in b.params}

    @staticmethod
    def _make_buckets(
        params: list[Any], cap: int, group_of: dict[int, int] | None = None
    ) -> list[_Bucket]:
        # Backward produces the last layer's gradients first: fill buckets in
        # reverse, so the first bucket is complete early and its reduction
        # overlaps the rest of backward. ``group_of`` (sharded optimizer): a bucket
        # never spans two parameter groups, so each shard has one set of options.
        def group(p: Any) -> int:
            return 0 if group_of is None else group_of[id(p)]

        buckets, cur, cur_bytes = [], [], 0
        for p in reversed(params):
            if cur and (
                cur_bytes + p.data.nbytes > cap
                or p.data.dtype != cur[0].data.dtype
                or is_cupy(p.data) != is_cupy(cur[0].data)
                or group(p) != group(cur[0])
            ):
                buckets.append(_Bucket(cur))
                cur, cur_bytes = [], 0
            cur.append(p)
            cur_bytes += p.data.nbytes
        if cur:
            buckets.append(_Bucket(cur))
        return buckets

    # ---- calling -----------------------------------------------------------

    def __call__(self, *args: Any, global_batch: int | None = None, **kwargs: Any) -> Any:
        if self._reducer is None:
            return self.module(*args, **kwargs)
        self._clock("other")
        local = len(args[0]) if args else None
        self._arm(local, global_batch)
        out = self.module(*args, **kwargs)
        self._clock("forward")
        return out

    # ---- where the time goes -------------------------------------------------

    def _clock(self, phase: str) -> float:
        """Charge the time since the last mark to ``phase`` and return it (the first
        call of an epoch only marks)."""
        now = time.perf_counter()
        dt = 0.0 if self._mark is None else now - self._mark
        self.times[phase] += dt
        self._mark = now
        return dt

    def reset_times(self) -> None:
        """Zero ``times``, ``steps`` and ``comm_seconds`` (e.g. at the start of an epoch)."""
        self.times = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self.comm_seconds = 0.0
        self._mark = None

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on the wrapper itself.
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.module)

    def _arm(self, local: int | None, global_batch: int | None) -> None:
        if self._armed and any(b.filled for b in self._buckets):
            raise DistributedError(
                "DistributedDataParallel: the previous step's gradients were not all "
                "reduced (call reduce_without_batch() or synchronize() after a partial backward)"
            )
        if global_batch is None:
            self._weight = 1.0 / self.world.size
        else:
            if isinstance(global_batch, bool) or not isinstance(global_batch, int) or (
                global_batch < 1
            ):
                raise ValueError(f"global_batch must be a positive int, got {global_batch!r}")
            if local is None or local > global_batch:
                raise ValueError(
                    f"global_batch ({global_batch}) must be at least this rank's batch ({local})"
                )
            self._weight = local / global_batch
        # Sharded: each rank scales by its share relative to an equal one and the
        # optimizer divides the summed slice by N, so equal shares (the usual case)
        # skip a pass over every gradient for a pass over the 1/N slice. The
        # same sum: the factors differ by N, exactly for a power of two.
        size = self.world.size
        if self._sharded is None:
            self._scale = self._weight
        elif global_batch is None or (local is not None and local * size == global_batch):
            self._scale = 1.0
        else:
            self._scale = self._weight * size
        for b in self._buckets:
            b.filled.clear()
            b.request = None
            b.target = b.buffer
        self._armed = True

    # ---- reduction ---------------------------------------------------------

    def _on_grad(self, p: Any) -> None:
        if not self._armed:
            return  # a backward that did not go through this wrapper's forward
        self._clock("backward")
        b = self._bucket_of[id(p)]
        g = p.grad
        if g is None:
            b.view(p)[...] = 0
        elif self._scale == 1.0 and b.counts is not None and self._sendable(g, b):
            # Sharded, equal shares: the reduce-scatter sends the gradient as it
            # is (read only: a gradient may alias one still flowing in backward).
            b.target = g.reshape(-1)
        else:
            b.xp.multiply(g.reshape(-1), self._scale, out=b.view(p))
        b.filled.add(id(p))
        if b.ready:
            self._start_ready()
        self._clock("reduce")

    @staticmethod
    def _sendable(g: Any, b: _Bucket) -> bool:
        return (
            len(b.params) == 1 and not is_cupy(g) and g.dtype == b.dtype
            and g.flags.c_contiguous and g.size == b.numel
        )

    def _start(self, b: _Bucket) -> Any:
        if b.counts is None:
            return self._reducer.start(b.target)
        return self._reducer.start_scatter(b.target, b.shard, b.counts)

    def _start_ready(self) -> None:
        # MPI matches collectives by call order, so every rank must start the
        # buckets in the same order (hooks may complete them out of order: a
        # Linear's weight before its bias, or all at once on a rank without data).
        started = []
        for x in self._buckets:
            if x.request is None:
                if not x.ready:
                    break
                x.request = self._start(x)
            started.append(x.request)
        if len(started) == len(self._buckets):
            self._finish()
        else:
            self._reducer.poke(started)

    def _finish(self) -> None:
        self._clock("reduce")
        self._reducer.wait([b.request for b in self._buckets], self.timeout)
        self.comm_seconds += self._clock("wait")
        for b in self._buckets:
            self.reduced_bytes += b.buffer.nbytes
            if b.counts is None:  # sharded: the optimizer reads b.shard
                for p in b.params:
                    p.grad = b.view(p).reshape(p.data.shape)
                    p._owned_grad = None
            b.request = None
            b.target = b.buffer
            b.filled.clear()
        self._armed = False
        self.steps += 1
        if self._sharded is not None:
            self._sharded._fresh = True

    def synchronize(self) -> None:
        """Finish this step's reduction: parameters whose hook did not run (not in
        the graph) count as zero. A no-op when the hooks already finished it."""
        if self._reducer is None or not self._armed:
            return
        self._clock("backward")
        for b in self._buckets:
            if b.request is None:
                for p in b.params:
                    if id(p) not in b.filled:
                        b.view(p)[...] = 0  # not in this step's graph: contributes 0
                b.request = self._start(b)
        self._finish()

    def reduce_without_batch(self) -> None:
        """Take part in a step's reduction with no samples (weight 0): for a rank
        whose share of a small last batch is empty."""
        if self._reducer is None:
            return
        self._arm(0, None)
        self.synchronize()

    def average_buffers(self) -> None:
        """Replace every floating-point buffer (BatchNorm running statistics) by its
        mean over ranks, so all ranks evaluate and save the same model."""
        if self._reducer is None:
            return
        for buf in self.module.buffers():
            if buf is None or buf.dtype.kind != "f":
                continue
            if is_cupy(buf):
                from fastnn.distributed.nccl import allreduce_device

                allreduce_device(buf, self.world)
            else:
                self.world.comm.Allreduce(import_mpi().IN_PLACE, buf, op=import_mpi().SUM)
            buf *= buf.dtype.type(1.0 / self.world.size)

    def shard_optimizer(self, optimizer: Any) -> Any:
        """``optimizer`` run sharded over the ranks (ZeRO stage 1): the gradients are
        reduce-scattered and each rank updates its ``1/N`` of the parameters, then
        gathers the rest (:class:`fastnn.distributed.zero.ShardedOptimizer`). Use the
        returned object as the optimizer. With one rank, ``optimizer`` itself."""
        if self._reducer is None:
            return optimizer
        from fastnn.distributed.zero import ShardedOptimizer

        return ShardedOptimizer(self, optimizer)

    def remove_hooks(self) -> None:
        """Unregister the hooks (the module then trains on this rank alone)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._reducer = None
