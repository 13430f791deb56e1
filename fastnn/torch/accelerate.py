"""``accelerate(model)``: put fastnn's kernels into an existing torch model, in place.

Modules are converted by changing their class to the fastnn subclass: the
module object, its parameters, buffers, hooks and ``state_dict`` keys stay the
same, so optimizers built before the call keep working. Inside an
``nn.Sequential``, a Conv2d -> ReLU -> MaxPool2d run becomes one
:class:`~fastnn.torch.nn.Conv2dReLUMaxPool2d` (the conv's object) followed by
two ``nn.Identity`` (the Sequential's length and indices, hence its
``state_dict`` keys, are unchanged). Only exact instances of the torch classes
are converted: a subclass may override ``forward``.

``accelerate(model, optimizer=opt)`` also changes a ``torch.optim.Adam`` or
``AdamW`` (exact classes) into :class:`fastnn.torch.optim.Adam`/``AdamW`` the same
way: the object, its param groups, state and hooks stay; only ``step`` runs on
fastnn's kernel (see :mod:`fastnn.torch.optim`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastnn.torch import nn as fnn
from fastnn.torch import optim as fopt

__all__ = ["AccelerateReport", "accelerate"]

# torch class -> fastnn class
_SWAPS: dict[type, type] = {
    torch.nn.Conv2d: fnn.Conv2d,
    torch.nn.MaxPool2d: fnn.MaxPool2d,
    torch.nn.AvgPool2d: fnn.AvgPool2d,
    torch.nn.Linear: fnn.Linear,
    torch.nn.CrossEntropyLoss: fnn.CrossEntropyLoss,
}
_FLOATS = (torch.float32, torch.float64)
_OPTIM_SWAPS: dict[type, type] = {
    torch.optim.Adam: fopt.Adam,
    torch.optim.AdamW: fopt.AdamW,
}


@dataclass
class AccelerateReport:
    """What :func:`accelerate` did: ``swapped`` (name, torch class, fastnn class),
    ``fused`` (names of the conv, ReLU and pool), ``fused_linear_relu`` (names of
    the Linear and ReLU), ``skipped`` (name, reason), ``optimizer``."""

    swapped: list[tuple[str, str, str]] = field(default_factory=list)
    fused: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    fused_linear_relu: list[tuple[str, str]] = field(default_factory=list)
    optimizer: str | None = None  # what became of the optimizer argument, if any

    def __str__(self) -> str:
        lines = [f"fastnn.torch.accelerate: {len(self.swapped)} swapped, "
                 f"{len(self.fused)} fused, {len(self.fused_linear_relu)} Linear+ReLU fused, "
                 f"{len(self.skipped)} left to torch"]
        lines += [f"  fused    {c} + {r} + {p} -> Conv2dReLUMaxPool2d" for c, r, p in self.fused]
        lines += [f"  fused    {n} + {r} -> Linear(fused_relu=True)"
                  for n, r in self.fused_linear_relu]
        lines += [f"  swapped  {n or '<model>'}: {a} -> fastnn.torch.nn.{b}"
                  for n, a, b in self.swapped]
        lines += [f"  skipped  {n or '<model>'}: {why}" for n, why in self.skipped]
        if self.optimizer:
            lines.append(f"  optimizer {self.optimizer}")
        return "\n".join(lines)


def _why_not(module: torch.nn.Module) -> str | None:
    """Why fastnn cannot run ``module`` (an exact instance of a supported class), or None."""
    params = list(module.parameters(recurse=False))
    bad = [p.dtype for p in params if p.dtype not in _FLOATS]
    if bad:
        return f"dtype {bad[0]} (fastnn runs float32 and float64)"
    if any(p.device.type not in ("cpu", "cuda") for p in params):
        return f"device {params[0].device}"
    if isinstance(module, torch.nn.Conv2d) and fnn.conv_padding(module) is None:
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (fastnn pads with zeros)"
        return "padding='same' with an even dilated kernel (asymmetric padding)"
    return None


def _has_hooks(m: torch.nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _fuse_sequentials(model: torch.nn.Module, report: AccelerateReport) -> None:
    for name, seq in model.named_modules():
        if not isinstance(seq, torch.nn.Sequential):
            continue
        keys = list(seq._modules)
        i = 0
        while i + 2 < len(keys):
            conv, relu, pool = (seq._modules[k] for k in keys[i:i + 3])
            if (type(conv) in (torch.nn.Conv2d, fnn.Conv2d) and type(relu) is torch.nn.ReLU
                    and type(pool) is torch.nn.MaxPool2d and not pool.return_indices
                    and _why_not(conv) is None and not _has_hooks(relu)
                    and not _has_hooks(pool)):
                conv.__class__ = fnn.Conv2dReLUMaxPool2d
                conv.set_pool(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                              pool.ceil_mode)
                seq._modules[keys[i + 1]] = torch.nn.Identity()
                seq._modules[keys[i + 2]] = torch.nn.Identity()
                report.fused.append(tuple(f"{name}.{k}" if name else k for k in keys[i:i + 3]))
                i += 3
            else:
                i += 1


def _swap_optimizer(opt: object) -> str:
    """Change ``opt``'s class to fastnn's step (in place); say what happened."""
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"accelerate: optimizer must be a torch.optim.Optimizer, got "
                        f"{type(opt).__name__}")
    name = type(opt).__name__
    if type(opt) in _OPTIM_SWAPS.values():
        return f"{name}: already fastnn.torch.optim.{name}"
    target = _OPTIM_SWAPS.get(type(opt))
    if target is None:
        return f"{name}: left to torch (fastnn steps Adam and AdamW)"
    if "step" in vars(opt):
        # An LR scheduler (or other wrapper) bound torch's step to this object;
        # a class change would not reach it.
        return (f"{name}: left to torch (its step is wrapped, e.g. by an LR scheduler "
                "created before accelerate)")
    opt.__class__ = target
    opt._patch_step_function()  # step hooks and profiling, as torch's __init__ does
    return f"{name} -> fastnn.torch.optim.{target.__name__}"


def _fuse_linear_relu(model: torch.nn.Module, report: AccelerateReport) -> None:
    """Linear (already fastnn's) -> ReLU inside a Sequential: the ReLU moves into the op."""
    for name, seq in model.named_modules():
        if not isinstance(seq, torch.nn.Sequential):
            continue
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:]):
            lin, relu = seq._modules[a], seq._modules[b]
            if (type(lin) is fnn.Linear and not lin.fused_relu and type(relu) is torch.nn.ReLU
                    and not _has_hooks(lin) and not _has_hooks(relu)):
                lin.fused_relu = True
                seq._modules[b] = torch.nn.Identity()
                report.fused_linear_relu.append(
                    tuple(f"{name}.{k}" if name else k for k in (a, b)))


def accelerate(
    model: torch.nn.Module, verbose: bool = False, optimizer: torch.optim.Optimizer | None = None
) -> AccelerateReport:
    """Swap every supported module of ``model`` for its fastnn version, in place.

    Supported: ``Conv2d``, ``MaxPool2d``, ``AvgPool2d``, ``Linear``,
    ``CrossEntropyLoss`` (exact classes, float32/float64 parameters, zero
    padding; a loss module is accelerated by passing it as ``model``); Conv2d -> ReLU ->
    MaxPool2d and Linear -> ReLU runs inside ``nn.Sequential`` are fused.
    Everything else is left to torch and listed in the report's ``skipped``
    with the reason. Calls the
    swapped modules cannot run exactly (other dtypes or devices at run time)
    still fall back to torch's forward. Returns the report (printed when
    ``verbose``). Calling it twice changes nothing more.

    ``optimizer``: a ``torch.optim.Adam``/``AdamW`` (exact class) over the model's
    parameters also steps on fastnn's kernel from then on (same object, state
    and ``state_dict``; see :mod:`fastnn.torch.optim`); another optimizer is
    left as it is and the report says so.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"accelerate: model must be a torch.nn.Module, got {type(model).__name__}")
    report = AccelerateReport()
    if optimizer is not None:
        report.optimizer = _swap_optimizer(optimizer)
    _fuse_sequentials(model, report)
    for name, m in model.named_modules():
        target = _SWAPS.get(type(m))
        if target is None:
            if type(m).__module__ != fnn.__name__ and isinstance(m, tuple(_SWAPS)):
                report.skipped.append((name, f"{type(m).__name__} subclasses a torch module "
                                             "and may override forward"))
            continue
        why = _why_not(m)
        if why is not None:
            report.skipped.append((name, f"{type(m).__name__}: {why}"))
            continue
        report.swapped.append((name, type(m).__name__, target.__name__))
        m.__class__ = target
    _fuse_linear_relu(model, report)
    if verbose:
        print(report)
    return report
