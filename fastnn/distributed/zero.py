"""A sharded optimizer step (ZeRO stage 1) for :class:`DistributedDataParallel`.

``opt = ddp.shard_optimizer(opt)``: instead of an Allreduce of every gradient
bucket, each bucket is reduce-scattered (``MPI_Ireduce_scatter``, started by
backward's hooks as before), so rank ``r`` receives the summed gradient of its
``1/N`` slice of every bucket only. :meth:`ShardedOptimizer.step` runs the
wrapped optimizer's own update (its class, options and kernels) on those
slices, then an in-place ``MPI_Iallgatherv`` per bucket hands every rank the
whole updated parameters. The communication volume equals a ring Allreduce's;
the optimizer work and its state per rank shrink to ``1/N``.

The update of each element is the same arithmetic as on one process (the
optimizers are element-wise and the sum over ranks is MPI's, as for the
Allreduce), so the trajectory stays the single-process one.
:meth:`ShardedOptimizer.state_dict` gathers the full state (every rank gets it,
in the wrapped optimizer's format), so checkpoints load on any number of ranks,
and :meth:`ShardedOptimizer.load_state_dict` takes a full one.

After a sharded step each parameter's ``.grad`` holds this rank's local
gradient (possibly scaled by its share), not the average: the averaged gradient
exists only as the slices. Options (``lr`` from a scheduler, ...) are read from the wrapped
optimizer's ``param_groups`` at every step, so schedulers built on it keep working.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastnn.autograd import Tensor
from fastnn.data import share_bounds
from fastnn.distributed.world import DistributedError

__all__ = ["ShardedOptimizer"]


class _Shard:
    """One bucket's parameters as one flat range, and this rank's slice of it."""

    __slots__ = ("bucket", "group", "lo", "hi", "counts", "displs", "flat", "tensor")

    def __init__(self, bucket: Any, group: int, rank: int, size: int) -> None:
        self.bucket, self.group = bucket, group
        bounds = [share_bounds(bucket.numel, q, size) for q in range(size)]
        self.lo, self.hi = bounds[rank]
        self.counts = [hi - lo for lo, hi in bounds]
        self.displs = [lo for lo, _ in bounds]
        bucket.counts = self.counts
        bucket.shard = np.zeros(self.counts[rank], dtype=bucket.dtype)
        # A bucket of one parameter is updated and gathered in place; several
        # parameters share a flat copy, filled before the step and spread after.
        in_place = len(bucket.params) == 1
        self.flat = None if in_place else np.empty(bucket.numel, bucket.dtype)
        self.tensor = Tensor(bucket.shard.copy())

    def params_flat(self) -> Any:
        """The flat parameter range, this rank's slice current."""
        b = self.bucket
        if self.flat is None:
            p = b.params[0]
            if not p.data.flags.c_contiguous:
                p.data = np.ascontiguousarray(p.data)
            return p.data.reshape(-1)
        for p in b.params:
            off = b.offsets[id(p)]
            lo, hi = max(off, self.lo), min(off + p.data.size, self.hi)
            if lo < hi:
                self.flat[lo:hi] = p.data.reshape(-1)[lo - off:hi - off]
        return self.flat

    def spread(self) -> None:
        """Copy the gathered flat range back into the parameters."""
        if self.flat is None:
            return
        b = self.bucket
        for p in b.params:
            off = b.offsets[id(p)]
            p.data[...] = self.flat[off:off + p.data.size].reshape(p.data.shape)


class ShardedOptimizer:
    """``optimizer``'s update, run by each rank on its slice of the parameters.

    Built by :meth:`DistributedDataParallel.shard_optimizer` (see the module
    doc). ``step``, ``zero_grad``, ``state_dict``, ``load_state_dict`` and
    ``param_groups`` behave as the wrapped optimizer's; ``state_dict`` and
    ``load_state_dict`` are collective (every rank calls them).
    """

    def __init__(self, ddp: Any, optimizer: Any) -> None:
        from fastnn.distributed.ddp import _MPIReducer

        if not isinstance(ddp._reducer, _MPIReducer):
            raise ValueError("shard_optimizer: needs host (NumPy) parameters reduced through MPI")
        params = ddp._params
        mine = optimizer._all_params()
        if {id(p) for p in mine} != {id(p) for p in params} or len(mine) != len(params):
            raise ValueError(
                "shard_optimizer: the optimizer must hold exactly the model's trainable "
                "parameters (those the DistributedDataParallel wrapper reduces)"
            )
        if ddp._armed:
            raise DistributedError("shard_optimizer: called between a forward and its step")
        self.ddp = ddp
        self.optimizer = optimizer
        self._index = {id(p): i for i, p in enumerate(mine)}
        group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
        buckets = ddp._make_buckets(params, ddp._cap, group_of)
        world = ddp.world
        self._shards = [
            _Shard(b, group_of[id(b.params[0])], world.rank, world.size) for b in buckets
        ]
        ddp._set_buckets(buckets)
        ddp._sharded = self
        # The same optimizer class over one Tensor per shard: its own checks,
        # kernels and state layout, on 1-D slices.
        inner = object.__new__(type(optimizer))
        inner.defaults = dict(optimizer.defaults)
        inner.param_groups = []
        inner.state = {}
        for sh in self._shards:
            inner.add_param_group({"params": [sh.tensor], **self._options(sh.group)})
        self._inner = inner
        self._fresh = False  # set by the wrapper when new summed slices arrived
        if optimizer.state:  # e.g. restored from a checkpoint before wrapping
            self._take_state()

    # ---- the optimizer interface --------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def _options(self, group: int) -> dict[str, Any]:
        return {k: v for k, v in self.optimizer.param_groups[group].items() if k != "params"}

    def step(self) -> None:
        """Update this rank's slices from the reduced gradients, then gather the
        whole parameters on every rank."""
        ddp = self.ddp
        if ddp._armed:
            raise DistributedError(
                "ShardedOptimizer.step: the gradients were not reduced (run backward, "
                "or synchronize() / reduce_without_batch(), before step)"
            )
        ddp._clock("other")
        flats = []
        inv = 1.0 / ddp.world.size  # the hooks scaled by share * N (see DDP._arm)
        fresh, self._fresh = self._fresh, False
        for sh, ig in zip(self._shards, self._inner.param_groups):
            if fresh:  # once per reduction: a second step reuses the same gradient
                sh.bucket.shard *= inv
            ig.update(self._options(sh.group))
            flat = sh.params_flat()
            flats.append(flat)
            sh.tensor.data = flat[sh.lo:sh.hi]
            sh.tensor.grad = sh.bucket.shard
        self._inner.step()
        ddp._clock("optimizer")
        reducer = ddp._reducer
        reqs = [
            reducer.comm.Iallgatherv(reducer.MPI.IN_PLACE, [flat, (sh.counts, sh.displs)])
            for sh, flat in zip(self._shards, flats)
        ]
        reducer.wait(reqs, ddp.timeout)
        for sh in self._shards:
            sh.spread()
        ddp.comm_seconds += ddp._clock("allgather")

    # ---- state ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict`` format, with every parameter's full
        state gathered from the ranks (collective; every rank gets it)."""
        out = {k: v for k, v in self.optimizer.state_dict().items()
               if k.startswith("param_groups.")}
        comm = self.ddp.world.comm
        for sh in self._shards:
            st = self._inner.state.get(sh.tensor, {})
            for name in sorted(st):
                v = st[name]
                b = sh.bucket
                if isinstance(v, np.ndarray):
                    full = np.empty(b.numel, v.dtype)
                    comm.Allgatherv(np.ascontiguousarray(v), [full, (sh.counts, sh.displs)])
                    for p in b.params:
                        off = b.offsets[id(p)]
                        part = full[off:off + p.data.size].reshape(p.data.shape)
                        out[f"state.{self._index[id(p)]}.{name}"] = part
                elif v is not None:
                    for p in b.params:
                        out[f"state.{self._index[id(p)]}.{name}"] = v
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a full ``state_dict`` (this class's or the wrapped optimizer's)."""
        self.optimizer.load_state_dict(state_dict)
        self._take_state()

    def _take_state(self) -> None:
        # Move the wrapped optimizer's per-parameter state into this rank's slices.
        state = self.optimizer.state
        for sh, ig in zip(self._shards, self._inner.param_groups):
            ig.update(self._options(sh.group))
            b = sh.bucket
            names = {k for p in b.params for k in state.get(p, {})}
            if not names:
                self._inner.state.pop(sh.tensor, None)
                continue
            new: dict[str, Any] = {}
            for name in names:
                vals = [state.get(p, {}).get(name) for p in b.params]
                if any(isinstance(v, np.ndarray) for v in vals):
                    flat = np.concatenate([
                        np.zeros(p.data.size, b.dtype) if v is None else
                        np.asarray(v, dtype=b.dtype).reshape(-1)
                        for p, v in zip(b.params, vals)
                    ])
                    new[name] = flat[sh.lo:sh.hi].copy()
                else:
                    new[name] = max((v for v in vals if v is not None), default=0)
            self._inner.state[sh.tensor] = new
        state.clear()

    def __repr__(self) -> str:
        return f"ShardedOptimizer({self.optimizer!r}, {len(self._shards)} shards)"
