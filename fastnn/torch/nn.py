"""Drop-in torch modules that run on fastnn's kernels.

Each class subclasses its ``torch.nn`` namesake and adds no parameter, buffer
or attribute to the ``state_dict``, so a checkpoint loads into either. A call
fastnn cannot run exactly (a dtype other than float32/float64, a device other
than the CPU or a CUDA GPU with fastnn's CUDA backend, ``padding_mode`` other
than ``'zeros'``, an asymmetric ``padding='same'``) runs torch's own forward:
never a different answer, only torch's speed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastnn.torch import _ops  # noqa: F401 - registers torch.ops.fastnn.*

__all__ = ["AvgPool2d", "Conv2d", "Conv2dReLUMaxPool2d", "CrossEntropyLoss", "Linear",
           "MaxPool2d"]

_FLOATS = (torch.float32, torch.float64)
_cuda_ok: bool | None = None


def _cuda_backend() -> bool:
    """fastnn's CUDA backend is usable here (asked once)."""
    global _cuda_ok
    if _cuda_ok is None:
        from fastnn.backends import available_backends

        _cuda_ok = "cuda" in available_backends()
    return _cuda_ok


def runs_on_fastnn(*tensors: Tensor | None) -> bool:
    """True when fastnn's ops compute exactly what torch's would for these tensors:
    one float32/float64 dtype, on the CPU or (with fastnn's CUDA backend) CUDA."""
    ts = [t for t in tensors if t is not None]
    dtype, device = ts[0].dtype, ts[0].device
    if dtype not in _FLOATS or any(t.dtype != dtype or t.device != device for t in ts):
        return False
    return device.type == "cpu" or (device.type == "cuda" and _cuda_backend())


def as_list(v: Any) -> list[int]:
    """A torch module's int-or-tuple geometry attribute as a list of ints."""
    return [v, v] if isinstance(v, int) else [int(i) for i in v]


def conv_padding(conv: torch.nn.Conv2d) -> list[int] | None:
    """The conv's padding as symmetric ints, or None when fastnn's op cannot take it
    (a non-zeros ``padding_mode`` or a 'same' padding with an odd total)."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return [0, 0]
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return None if any(t % 2 for t in totals) else [t // 2 for t in totals]
    return as_list(conv.padding)


class Conv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` on ``torch.ops.fastnn.conv2d``."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's name
        padding = conv_padding(self)
        if padding is None or not runs_on_fastnn(input, self.weight, self.bias):
            return super().forward(input)
        return torch.ops.fastnn.conv2d(input, self.weight, self.bias, as_list(self.stride),
                                       padding, as_list(self.dilation), self.groups)


class Conv2dReLUMaxPool2d(Conv2d):
    """``MaxPool2d(ReLU(Conv2d(x)))`` on the fused op; the parameters (and
    ``state_dict`` keys) are the conv's, the pool's settings are attributes."""

    def __init__(
        self, *args: Any, pool_kernel_size: Any = 2, pool_stride: Any = None,
        pool_padding: Any = 0, pool_dilation: Any = 1, pool_ceil_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.set_pool(pool_kernel_size, pool_stride, pool_padding, pool_dilation,
                      pool_ceil_mode)

    def set_pool(self, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
                 ceil_mode: bool) -> None:
        """The max pool that follows the ReLU (``stride`` None means ``kernel_size``)."""
        self.pool_kernel_size = as_list(kernel_size)
        self.pool_stride = as_list(kernel_size if stride is None or stride == [] else stride)
        self.pool_padding, self.pool_dilation = as_list(padding), as_list(dilation)
        self.pool_ceil_mode = bool(ceil_mode)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's name
        pool = (self.pool_kernel_size, self.pool_stride, self.pool_padding,
                self.pool_dilation, self.pool_ceil_mode)
        padding = conv_padding(self)
        if padding is None or not runs_on_fastnn(input, self.weight, self.bias):
            y = torch.relu(torch.nn.Conv2d.forward(self, input))
            return torch.nn.functional.max_pool2d(y, *pool)
        return torch.ops.fastnn.conv2d_relu_max_pool2d(
            input, self.weight, self.bias, as_list(self.stride), padding,
            as_list(self.dilation), self.groups, *pool)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, pool_kernel_size={self.pool_kernel_size}, "
                f"pool_stride={self.pool_stride}, pool_padding={self.pool_padding}, "
                f"pool_dilation={self.pool_dilation}, pool_ceil_mode={self.pool_ceil_mode}")


class MaxPool2d(torch.nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` on ``torch.ops.fastnn.max_pool2d(_with_indices)``."""

    def forward(self, input: Tensor) -> Any:  # noqa: A002 - torch's name
        if not runs_on_fastnn(input):
            return super().forward(input)
        args = (input, as_list(self.kernel_size), as_list(self.stride or self.kernel_size),
                as_list(self.padding), as_list(self.dilation), bool(self.ceil_mode))
        if self.return_indices:
            return torch.ops.fastnn.max_pool2d_with_indices(*args)
        return torch.ops.fastnn.max_pool2d(*args)


class AvgPool2d(torch.nn.AvgPool2d):
    """``torch.nn.AvgPool2d`` on ``torch.ops.fastnn.avg_pool2d``."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's name
        if not runs_on_fastnn(input):
            return super().forward(input)
        return torch.ops.fastnn.avg_pool2d(
            input, as_list(self.kernel_size), as_list(self.stride or self.kernel_size),
            as_list(self.padding), bool(self.ceil_mode), bool(self.count_include_pad),
            self.divisor_override)


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` on ``torch.ops.fastnn.linear``.

    ``fused_relu`` (False unless :func:`~fastnn.torch.accelerate` fused the
    ``nn.ReLU`` that followed it) applies that ReLU too, in the same op
    (``torch.ops.fastnn.linear_relu``): one op and one autograd node instead of
    two, and no elementwise kernel of torch's (or inductor's, which starts an
    OpenMP region even for a 128x128 ReLU) between fastnn's ops. It is an
    attribute, not a parameter or buffer: the ``state_dict`` is torch's.
    """

    fused_relu = False

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's name
        if not runs_on_fastnn(input, self.weight, self.bias):
            y = super().forward(input)
            return torch.relu(y) if self.fused_relu else y
        op = torch.ops.fastnn.linear_relu if self.fused_relu else torch.ops.fastnn.linear
        return op(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", fused_relu=True" if self.fused_relu else "")


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` on ``torch.ops.fastnn.cross_entropy`` (softmax,
    NLL and the gradient in one pass) for its common case: (N, C) logits, (N,)
    int64 class indices in [0, C), no ``weight``, ``reduction='mean'``, no label
    smoothing. Anything else (class-probability targets, other shapes, a target
    equal to ``ignore_index``) runs torch's forward. Under ``torch.compile`` the
    targets are not inspected: one outside [0, C) raises fastnn's ValueError
    there instead of falling back."""

    def _on_fastnn(self, input: Tensor, target: Tensor) -> bool:  # noqa: A002
        if (self.weight is not None or self.reduction != "mean" or self.label_smoothing != 0
                or input.dim() != 2 or target.dim() != 1 or target.dtype != torch.int64
                or target.device != input.device or not runs_on_fastnn(input)
                or input.shape[0] != target.shape[0] or 0 in input.shape):
            return False
        if torch.compiler.is_compiling():
            return True
        t = target.numpy() if target.device.type == "cpu" else target
        return bool(t.min() >= 0) and bool(t.max() < input.shape[1])

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # noqa: A002
        if not self._on_fastnn(input, target):
            return super().forward(input, target)
        return torch.ops.fastnn.cross_entropy(input, target)[0]
