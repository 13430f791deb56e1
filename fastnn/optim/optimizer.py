"""The :class:`Optimizer` base class and the :func:`l1_penalty` helper.

Optimizers update ``param.data`` in place from ``param.grad`` (raw arrays, see
:mod:`fastnn.autograd`) through ``fastnn.functional.sgd_step``/``adam_step``,
which run on the fast backend for the arrays' type.

``state_dict()`` is a flat dict of name -> NumPy array or Python scalar, so
``numpy.savez(path, **opt.state_dict())`` stores it and
``opt.load_state_dict(dict(numpy.load(path)))`` restores it. Keys:
``param_groups.<g>.<option>`` (lr, momentum, betas, ...),
``param_groups.<g>.num_params`` and ``state.<i>.<name>`` where ``i`` counts
parameters across groups in order.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np

from fastnn._array import to_host
from fastnn.autograd import Tensor
from fastnn.optim import flat

__all__ = ["Optimizer", "l1_penalty"]


class Optimizer:
    """Base class. ``params``: an iterable of Tensors, or of dicts
    ``{"params": [...], <option>: value}`` (parameter groups with their own
    options; missing options take the constructor's values)."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self.defaults = dict(defaults)
        if isinstance(params, Tensor):
            raise TypeError(f"{type(self).__name__}: params must be an iterable of Tensors, "
                            "got a single Tensor")
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[Tensor, dict[str, Any]] = {}
        for g in groups:
            self.add_param_group(g)

    def add_param_group(self, group: dict[str, Any]) -> None:
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"{type(self).__name__}: a parameter group must be a dict with "
                            "a 'params' entry")
        ps = group["params"]
        ps = [ps] if isinstance(ps, Tensor) else list(ps)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(ps):
            if not isinstance(p, Tensor):
                raise TypeError(f"{type(self).__name__}: params[{i}] is "
                                f"{type(p).__name__}, not a Tensor")
            if not p.is_leaf:
                raise ValueError(f"{type(self).__name__}: params[{i}] is not a leaf Tensor")
            if p.dtype.kind != "f":
                raise TypeError(f"{type(self).__name__}: params[{i}] has dtype {p.dtype}")
            if id(p) in seen:
                raise ValueError(f"{type(self).__name__}: params[{i}] appears in more than "
                                 "one parameter group (or twice)")
            seen.add(id(p))
        unknown = set(group) - set(self.defaults) - {"params", "initial_lr"}
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown options {sorted(unknown)}")
        new = {"params": ps}
        for k, v in self.defaults.items():
            new[k] = group.get(k, v)
        if "initial_lr" in group:
            new["initial_lr"] = group["initial_lr"]
        self._check_group(new)
        self.param_groups.append(new)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate a group's options (subclasses extend this)."""
        lr = group["lr"]
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or lr < 0:
            raise ValueError(f"{type(self).__name__}: lr must be a non-negative number, "
                             f"got {lr!r}")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every parameter's ``.grad`` (or zero it in place)."""
        for g in self.param_groups:
            for p in g["params"]:
                p.zero_grad(set_to_none)

    def step(self) -> None:
        """Update every parameter that has a gradient, in place: one multi-tensor
        launch per group on the cuda backend (:mod:`fastnn.optim.flat`), else
        the per-parameter kernels."""
        if self._flat_step():
            return
        for g in self.param_groups:
            self._param_step(g)

    #: names of the per-parameter state arrays the flat layout keeps (subclasses).
    _flat_state: tuple[str, ...] = ()

    def _param_step(self, group: dict[str, Any]) -> None:
        """One step of ``group`` with the per-parameter kernels (subclasses)."""
        raise NotImplementedError

    def _flat_group_step(self, layout: flat.FlatLayout, grp: Any, group: dict[str, Any]) -> bool:
        """One multi-tensor step of ``group``; False: use :meth:`_param_step` (subclasses)."""
        return False

    def flat_layout(self) -> flat.FlatLayout | None:
        """The flat buffers on the cuda backend (built on first use), or None where the
        parameters cannot share one (mixed dtypes) or the arrays are not on it."""
        params = self._all_params()
        if not flat.wanted(params[0].data) or type(self)._flat_group_step is \
                Optimizer._flat_group_step:
            return None
        layout = self.__dict__.get("_flat")
        if layout is None or (layout and len(layout.views) != len(params)):
            layout = flat.FlatLayout.build(self, self._flat_state) or False
            self._flat = layout
        if not layout:
            return None
        if not layout.is_intact(self):
            layout.repair(self)
        return layout

    def _flat_step(self, launch: bool = True) -> bool:
        """The multi-tensor step; ``launch=False`` does its host bookkeeping (state,
        step counts, hyper-parameters on the device) without launching, for a
        CUDA graph that replays the launch. False: not on the flat path."""
        layout = self.flat_layout()
        if layout is None:
            return False
        layout.launching = launch
        try:
            for grp, g in zip(layout.groups, self.param_groups):
                if not (layout.gather_grads(grp) and self._flat_group_step(layout, grp, g)):
                    if not launch:
                        raise RuntimeError("the flat optimizer step cannot be replayed: "
                                           "a group needs the per-parameter path")
                    self._param_step(g)
        finally:
            layout.launching = True
        return True

    # ---- state ------------------------------------------------------------

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """A flat dict of NumPy arrays and scalars (see the module docstring)."""
        out: dict[str, Any] = {}
        for gi, g in enumerate(self.param_groups):
            out[f"param_groups.{gi}.num_params"] = len(g["params"])
            for k, v in g.items():
                if k == "params":
                    continue
                out[f"param_groups.{gi}.{k}"] = np.asarray(v) if isinstance(v, tuple) else v
        for i, p in enumerate(self._all_params()):
            for k, v in self.state.get(p, {}).items():
                if v is None:
                    continue
                out[f"state.{i}.{k}"] = v if isinstance(v, (int, float)) else np.array(to_host(v))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore options and per-parameter state saved by :meth:`state_dict`.

        The optimizer must hold the same number of groups and parameters, with
        the same shapes; raises ValueError (nothing changed) otherwise.
        """
        sd = dict(state_dict)
        params = self._all_params()
        n_groups = len({k.split(".")[1] for k in sd if k.startswith("param_groups.")})
        if n_groups != len(self.param_groups):
            raise ValueError(f"load_state_dict: checkpoint has {n_groups} parameter groups, "
                             f"optimizer has {len(self.param_groups)}")
        new_groups = []
        for gi, g in enumerate(self.param_groups):
            key = f"param_groups.{gi}.num_params"
            if key not in sd or int(sd[key]) != len(g["params"]):
                got = int(sd[key]) if key in sd else "no"
                raise ValueError(f"load_state_dict: group {gi} has {len(g['params'])} "
                                 f"parameters, checkpoint has {got}")
            opts = {}
            prefix = f"param_groups.{gi}."
            for k, v in sd.items():
                if not k.startswith(prefix) or k == key:
                    continue
                name = k[len(prefix):]
                cur = g.get(name, self.defaults.get(name))
                opts[name] = _restore_scalar(v, cur)
            new_groups.append(opts)
        new_state: dict[Tensor, dict[str, Any]] = {}
        for k, v in sd.items():
            if not k.startswith("state."):
                continue
            _, idx, name = k.split(".", 2)
            i = int(idx)
            if i >= len(params):
                raise ValueError(f"load_state_dict: {k!r} refers to parameter {i}, but the "
                                 f"optimizer has {len(params)}")
            p = params[i]
            if name == "step":
                new_state.setdefault(p, {})[name] = int(v)
                continue
            arr = np.asarray(v) if not hasattr(v, "shape") else v
            if tuple(arr.shape) != p.shape:
                raise ValueError(f"load_state_dict: {k!r} has shape {tuple(arr.shape)}, "
                                 f"parameter {i} has shape {p.shape}")
            xp = np if isinstance(p.data, np.ndarray) else __import__("cupy")
            new_state.setdefault(p, {})[name] = xp.array(arr, dtype=p.dtype)  # a private copy
        for g, opts in zip(self.param_groups, new_groups):
            g.update(opts)
        self.state = new_state

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            opts = ", ".join(f"{k}={v}" for k, v in g.items() if k != "params")
            lines.append(f"  group {i}: {len(g['params'])} params, {opts}")
        return "\n".join(lines) + "\n)"


def _restore_scalar(v: Any, like: Any) -> Any:
    """Undo npz's 0-d array wrapping, using the current option's type as a guide."""
    if isinstance(like, tuple) or (hasattr(v, "ndim") and v.ndim == 1):
        return tuple(float(x) for x in np.asarray(v).reshape(-1))
    if isinstance(like, bool):
        return bool(v)
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(like, float) and isinstance(v, (int, float)):
        return float(v)
    return v


def l1_penalty(params: Iterable[Tensor], weight: float) -> Tensor:
    """``weight * sum(|p|)`` over all parameters, as a differentiable 0-d Tensor.

    Add it to the loss: ``loss = F.cross_entropy(out, y) + l1_penalty(model.parameters(), 1e-5)``.
    """
    total = None
    for p in params:
        term = p.abs().sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("l1_penalty: params is empty")
    return total * weight
