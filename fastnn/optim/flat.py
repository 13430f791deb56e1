"""Flat parameter buffers: one multi-tensor optimizer launch per parameter group
on the cuda backend.

On the first :meth:`Optimizer.step` under the cuda backend, :class:`FlatLayout`
copies every parameter into one flat buffer (the optimizer's parameters must
share one float dtype) and makes ``param.data`` a view into it; gradients and
optimizer state (``exp_avg``, ``momentum_buffer``, ...) get flat buffers of
their own, with per-parameter views in ``optimizer.state`` so ``state_dict``
and checkpoints are unchanged. Each group is a contiguous range, updated by
one kernel launch (:mod:`fastnn.backends._cuda.multi_tensor`).

Gradients written straight into the flat gradient buffer (the fused training
step does that, :mod:`fastnn.training.cuda_step`) cost nothing; gradients that
autograd left as separate arrays are copied into it first (one copy each).
A group falls back to the per-parameter kernels for a step when one of its
parameters has no gradient (torch skips such a parameter) or when its
parameters' step counts differ. Anything that replaced a flat view (a
``load_state_dict`` of the optimizer, ``model.to(...)``) is copied back into
the flat buffers and re-viewed before the next launch.

The CPU backends never get here: their semantics and arrays are unchanged.
"""

from __future__ import annotations

from typing import Any

from fastnn._array import is_cupy
from fastnn.backends import forced_backend

__all__ = ["FlatLayout", "wanted"]


def wanted(sample: Any) -> bool:
    """Whether a step on arrays like ``sample`` runs on the cuda backend."""
    forced = forced_backend()
    if forced is not None:
        return forced == "cuda"
    return is_cupy(sample)


class _Group:
    __slots__ = ("start", "stop", "params", "hyper", "hyper_host", "counter", "step",
                 "launch", "key")

    def __init__(self, start: int, stop: int, params: list[Any]) -> None:
        self.start, self.stop, self.params = start, stop, params
        self.hyper: Any = None
        self.hyper_host: tuple | None = None
        self.counter: Any = None
        self.step = 0  # host mirror of counter[0]
        self.launch: Any = None
        self.key: tuple | None = None  # compile-time flags of ``launch``


class FlatLayout:
    """Flat parameter, gradient and state buffers of one optimizer (see the module doc).

    Attributes: ``param`` and ``grad`` (1-D, one dtype), ``state`` (name -> 1-D
    buffer), ``views`` (param -> (param view, grad view, {name: state view})).
    """

    def __init__(self, opt: Any, state_names: tuple[str, ...]) -> None:
        from fastnn.backends._cuda.launch import runtime

        rt = runtime()
        params = opt._all_params()
        self.dtype = params[0].dtype
        self.xp = rt.xp
        sizes = [int(p.data.size) for p in params]
        total = sum(sizes)
        xp = self.xp
        self.param = xp.empty(total, self.dtype)
        self.grad = xp.zeros(total, self.dtype)
        self.state = {name: xp.zeros(total, self.dtype) for name in state_names}
        self.views: dict[Any, tuple[Any, Any, dict[str, Any]]] = {}
        self.groups: list[_Group] = []
        self.launching = True  # False: bookkeeping only (a CUDA graph replays the launch)
        off = 0
        for g in opt.param_groups:
            start = off
            for p in g["params"]:
                n = int(p.data.size)
                sl = slice(off, off + n)
                self.views[p] = (self.param[sl].reshape(p.shape), self.grad[sl].reshape(p.shape),
                                 {k: b[sl].reshape(p.shape) for k, b in self.state.items()})
                off += n
            grp = _Group(start, off, list(g["params"]))
            grp.hyper = xp.zeros(8, "float64")
            grp.counter = xp.zeros(2, "int64")
            self.groups.append(grp)
        self.repair(opt)

    @staticmethod
    def build(opt: Any, state_names: tuple[str, ...]) -> FlatLayout | None:
        """The layout, or None when the parameters cannot share one flat buffer."""
        params = opt._all_params()
        if len({p.dtype for p in params}) != 1 or any(p.shape is None for p in params):
            return None
        return FlatLayout(opt, state_names)

    def repair(self, opt: Any) -> None:
        """Copy any parameter or state array that is not its flat view into the view."""
        for p, (pv, _, sv) in self.views.items():
            if p.data is not pv:
                pv[...] = p.data
                p.data = pv
            st = opt.state.get(p)
            if st is None:
                continue
            for name, v in sv.items():
                cur = st.get(name)
                if cur is not v:
                    if cur is None:
                        v[...] = 0
                    else:
                        v[...] = cur
                    st[name] = v

    def is_intact(self, opt: Any) -> bool:
        """Whether every parameter and state entry is still its flat view."""
        state = opt.state
        for p, (pv, _, sv) in self.views.items():
            if p.data is not pv:
                return False
            st = state.get(p)
            if st is not None and any(st.get(k) is not v for k, v in sv.items()):
                return False
        return True

    def gather_grads(self, group: _Group) -> bool:
        """Put the group's gradients in the flat buffer; False if one is missing."""
        views = self.views
        for p in group.params:
            g = p.grad
            if g is None:
                return False
            gv = views[p][1]
            if g is not gv:
                gv[...] = g
                p.grad = gv
        return True

    def set_hyper(self, group: _Group, values: tuple[float, ...]) -> None:
        """Write the group's hyper-parameters to the device when they changed."""
        if values != group.hyper_host:
            import numpy as np

            group.hyper[: len(values)] = self.xp.asarray(np.array(values, dtype=np.float64))
            group.hyper_host = values

    def sync_step(self, group: _Group, step: int) -> None:
        """Make the device step counter ``step`` (after a load or a per-parameter step)."""
        if step != group.step:
            group.counter[0] = step
            group.step = step

    def run(self, group: _Group, key: tuple, make_launch: Any) -> None:
        """Launch the group's kernel, (re)binding it when its flags changed."""
        if group.launch is None or group.key != key:
            group.launch = make_launch(group)
            group.key = key
        if self.launching:
            group.launch()

    def slices(self, group: _Group) -> tuple[Any, Any, dict[str, Any]]:
        """The group's ranges of the flat buffers (param, grad, state)."""
        sl = slice(group.start, group.stop)
        return self.param[sl], self.grad[sl], {k: b[sl] for k, b in self.state.items()}
