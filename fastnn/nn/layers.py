"""Layers: Conv2d, Linear, pooling, activations, Flatten, Dropout, BatchNorm2d,
Sequential, and the two loss modules.

Shapes follow PyTorch: images NCHW, conv weights (O, C/groups, KH, KW), linear
weights (out_features, in_features). Parameters are float32 unless ``dtype``
says otherwise, and initialised like torch's defaults from ``rng`` (a
``numpy.random.Generator``, an int seed, or None for the global generator of
:mod:`fastnn.nn.init`, see ``manual_seed``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np

from fastnn import autograd as ag
from fastnn.autograd import Tensor
from fastnn.geometry import as_pair
from fastnn.nn import init
from fastnn.nn.module import Module, Parameter

__all__ = [
    "AvgPool2d",
    "BatchNorm2d",
    "Conv2d",
    "CrossEntropyLoss",
    "Dropout",
    "Flatten",
    "Identity",
    "Linear",
    "LogSoftmax",
    "MSELoss",
    "MaxPool2d",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
]


def _positive_int(v: Any, owner: str, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")
    return int(v)


def _float_dtype(dtype: Any, owner: str) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"{owner}: dtype must be float32 or float64, got {dt}")
    return dt


def _as_tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)


def _reset_fan_in(weight: Parameter, bias: Parameter | None, rng: Any) -> None:
    """torch's Linear/Conv2d default: kaiming_uniform_(a=sqrt(5)) for the weight,
    which is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), then the same bound for the bias."""
    rng = init._rng(rng)
    init.kaiming_uniform_(weight, a=math.sqrt(5), rng=rng)
    if bias is not None:
        fan_in = init._fans(weight)[0]
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        init.uniform_(bias, -bound, bound, rng=rng)


class Linear(Module):
    """``y = x @ weight.T + bias``: x (..., in_features) -> (..., out_features)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True,
        dtype: Any = np.float32, rng: Any = None,
    ) -> None:
        super().__init__()
        self.in_features = _positive_int(in_features, "Linear", "in_features")
        self.out_features = _positive_int(out_features, "Linear", "out_features")
        dt = _float_dtype(dtype, "Linear")
        self.weight = Parameter(np.empty((out_features, in_features), dtype=dt))
        if bias:
            self.bias = Parameter(np.empty((out_features,), dtype=dt))
        else:
            self.register_parameter("bias", None)
        _reset_fan_in(self.weight, self.bias, rng)

    def forward(self, x: Any) -> Tensor:
        return ag.Linear.apply(x, self.weight, self.bias)

    def _forward_relu(self, x: Any) -> Tensor:
        """``relu(self(x))`` as one fused node (see ``F.linear_relu``)."""
        return ag.LinearReLU.apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Conv2d(Module):
    """2-D convolution: (N, C_in, H, W) -> (N, C_out, OH, OW).

    ``padding`` is an int, a pair, ``"same"`` (stride 1) or ``"valid"``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
        padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
        dtype: Any = np.float32, rng: Any = None,
    ) -> None:
        super().__init__()
        self.in_channels = _positive_int(in_channels, "Conv2d", "in_channels")
        self.out_channels = _positive_int(out_channels, "Conv2d", "out_channels")
        self.groups = _positive_int(groups, "Conv2d", "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"Conv2d: in_channels ({in_channels}) and out_channels ({out_channels}) "
                f"must be divisible by groups ({groups})"
            )
        self.kernel_size = as_pair(kernel_size, "Conv2d", "kernel_size", 1)
        self.stride = as_pair(stride, "Conv2d", "stride", 1)
        self.padding = padding if isinstance(padding, str) else as_pair(
            padding, "Conv2d", "padding", 0)
        self.dilation = as_pair(dilation, "Conv2d", "dilation", 1)
        dt = _float_dtype(dtype, "Conv2d")
        kh, kw = self.kernel_size
        self.weight = Parameter(np.empty((out_channels, in_channels // groups, kh, kw), dtype=dt))
        if bias:
            self.bias = Parameter(np.empty((out_channels,), dtype=dt))
        else:
            self.register_parameter("bias", None)
        _reset_fan_in(self.weight, self.bias, rng)

    def forward(self, x: Any) -> Tensor:
        return ag.Conv2d.apply(x, self.weight, self.bias, stride=self.stride,
                               padding=self.padding, dilation=self.dilation, groups=self.groups)

    def _forward_relu_max_pool(self, x: Any, pool: MaxPool2d) -> Tensor:
        """``pool(relu(self(x)))`` as one fused node (see ``F.conv2d_relu_max_pool2d``)."""
        return ag.Conv2dReLUMaxPool2d.apply(
            x, self.weight, self.bias, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, pool_kernel_size=pool.kernel_size,
            pool_stride=pool.stride, pool_padding=pool.padding, pool_dilation=pool.dilation,
            pool_ceil_mode=pool.ceil_mode,
        )

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")


class MaxPool2d(Module):
    """Max pooling (stride defaults to kernel_size). With ``return_indices`` the
    call returns ``(out, indices)`` as :func:`fastnn.functional.max_pool2d` does
    (keyword it: torch puts it before ``ceil_mode``, fastnn after)."""

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0,
                 dilation: Any = 1, ceil_mode: bool = False,
                 return_indices: bool = False) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.ceil_mode = dilation, ceil_mode
        self.return_indices = return_indices

    def forward(self, x: Any) -> Any:
        return ag.MaxPool2d.apply(x, kernel_size=self.kernel_size, stride=self.stride,
                                  padding=self.padding, dilation=self.dilation,
                                  ceil_mode=self.ceil_mode, return_indices=self.return_indices)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}"
                + (", return_indices=True" if self.return_indices else ""))


class AvgPool2d(Module):
    """Average pooling (stride defaults to kernel_size)."""

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0,
                 ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: int | None = None) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad
        self.divisor_override = divisor_override

    def forward(self, x: Any) -> Tensor:
        return ag.AvgPool2d.apply(x, kernel_size=self.kernel_size, stride=self.stride,
                                  padding=self.padding, ceil_mode=self.ceil_mode,
                                  count_include_pad=self.count_include_pad,
                                  divisor_override=self.divisor_override)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class ReLU(Module):
    def forward(self, x: Any) -> Tensor:
        return ag.ReLU.apply(x)


class Sigmoid(Module):
    def forward(self, x: Any) -> Tensor:
        return ag.Sigmoid.apply(x)


class Tanh(Module):
    def forward(self, x: Any) -> Tensor:
        return ag.Tanh.apply(x)


class LogSoftmax(Module):
    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Any) -> Tensor:
        return ag.LogSoftmax.apply(x, dim=self.dim)


class Identity(Module):
    def forward(self, x: Any) -> Any:
        return x


class Flatten(Module):
    """Merge dims ``start_dim..end_dim``; by default (N, ...) -> (N, prod(...))."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x: Any) -> Tensor:
        return _as_tensor(x).flatten(self.start_dim, self.end_dim)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class Dropout(Module):
    """Inverted dropout while training (zero with probability p, scale by 1/(1-p));
    the identity in eval mode. Masks come from ``rng`` (default: the global
    generator of :mod:`fastnn.nn.init`; CuPy inputs use CuPy's generator)."""

    def __init__(self, p: float = 0.5, rng: Any = None) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"Dropout: p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)
        self._rng = None if rng is None else init._rng(rng)

    def forward(self, x: Any) -> Tensor:
        if not self.training or self.p == 0:
            return _as_tensor(x)
        rng = self._rng if self._rng is not None else init.default_generator()
        return ag.Dropout.apply(x, p=self.p, training=True, rng=rng)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class BatchNorm2d(Module):
    """Per-channel batch normalisation of NCHW input, as ``torch.nn.BatchNorm2d``.

    Training: normalise with the batch mean and biased variance over (N, H, W),
    and update ``running_mean``/``running_var`` with ``momentum`` (running_var
    from the unbiased variance, like torch). Eval: use the running stats.
    Buffers ``running_mean``, ``running_var`` and ``num_batches_tracked`` are in
    ``state_dict()``.
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = True, dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        self.num_features = _positive_int(num_features, "BatchNorm2d", "num_features")
        self.eps, self.momentum = float(eps), momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        dt = _float_dtype(dtype, "BatchNorm2d")
        if affine:
            self.weight = Parameter(np.ones(num_features, dtype=dt))
            self.bias = Parameter(np.zeros(num_features, dtype=dt))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", np.zeros(num_features, dtype=dt))
            self.register_buffer("running_var", np.ones(num_features, dtype=dt))
            self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def forward(self, x: Any) -> Tensor:
        return self._run(ag.BatchNorm2d, x)

    def _forward_relu(self, x: Any) -> Tensor:
        """``relu(self(x))`` as one fused node (see ``F.batch_norm2d_relu``)."""
        return self._run(ag.BatchNorm2dReLU, x)

    def _forward_relu_max_pool(self, x: Any, pool: MaxPool2d) -> Tensor:
        """``pool(relu(self(x)))`` as one fused node (see ``F.batch_norm2d_relu_max_pool2d``)."""
        return self._run(ag.BatchNorm2dReLUMaxPool2d, x, pool_kernel_size=pool.kernel_size,
                         pool_stride=pool.stride, pool_padding=pool.padding,
                         pool_dilation=pool.dilation, pool_ceil_mode=pool.ceil_mode)

    def _run(self, node: Any, x: Any, **pool: Any) -> Tensor:
        # The autograd node directly, as Conv2d does: F's Tensor dispatch would
        # bind these keywords to its signature on every call.
        x = _as_tensor(x)
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(
                f"BatchNorm2d: expected input of shape (N, {self.num_features}, H, W), "
                f"got {x.shape}"
            )
        return node.apply(
            x, self.weight, self.bias, running_mean=self.running_mean,
            running_var=self.running_var, training=self.training or not self.track_running_stats,
            momentum=self.momentum, eps=self.eps,
            num_batches_tracked=self.num_batches_tracked, **pool,
        )

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class Sequential(Module):
    """Run modules in order: ``Sequential(m0, m1, ...)`` or ``Sequential(OrderedDict)``."""

    def __init__(self, *modules: Any) -> None:
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], (dict, OrderedDict)):
            items = list(modules[0].items())
        else:
            items = [(str(i), m) for i, m in enumerate(modules)]
        for name, m in items:
            if not isinstance(m, Module):
                raise TypeError(f"Sequential: element {name!r} is {type(m).__name__}, "
                                "not a Module")
            self.add_module(name, m)

    def _layers(self) -> list[Module]:
        # Read from the registry each time so that reassigning ``seq.<name>`` sticks.
        d = self.__dict__
        return [d[n] for n in d["_module_names"] if d[n] is not None]

    #: Run Conv2d -> ReLU -> MaxPool2d, BatchNorm2d -> ReLU -> MaxPool2d, BatchNorm2d ->
    #: ReLU and Linear -> ReLU runs as one fused op each (same forward values bit for
    #: bit on cpu, within rounding elsewhere; gradients up to summation order); set
    #: False on an instance to run them apart. (A MaxPool2d with return_indices is
    #: never fused.)
    fuse = True

    def forward(self, x: Any) -> Any:
        layers = self._layers()
        n = len(layers)
        i = 0
        while i < n:
            m = layers[i]
            # Exact types only: a subclass may override forward and must then run as written.
            if (
                (type(m) is Conv2d or type(m) is BatchNorm2d) and i + 2 < n
                and type(layers[i + 1]) is ReLU and type(layers[i + 2]) is MaxPool2d
                and not layers[i + 2].return_indices and self.fuse
            ):
                x = m._forward_relu_max_pool(x, layers[i + 2])
                i += 3
                continue
            if (type(m) is BatchNorm2d or type(m) is Linear) and i + 1 < n and type(
                    layers[i + 1]) is ReLU and self.fuse:
                x = m._forward_relu(x)
                i += 2
                continue
            x = m(x)
            i += 1
        return x

    def __getitem__(self, i: int) -> Module:
        return self._layers()[i]

    def __len__(self) -> int:
        return len(self._layers())

    def __iter__(self) -> Iterator[Module]:
        return iter(self._layers())

    def append(self, module: Module) -> Sequential:
        """Add ``module`` at the end (named by its position); returns self."""
        self.add_module(str(len(self.__dict__["_module_names"])), module)
        return self


class CrossEntropyLoss(Module):
    """Mean softmax cross-entropy of (N, K) logits against (N,) integer labels."""

    def forward(self, logits: Any, labels: Any) -> Tensor:
        if isinstance(labels, Tensor):
            labels = labels.data
        return ag.CrossEntropy.apply(logits, labels)


class MSELoss(Module):
    """Mean squared error over all elements."""

    def forward(self, input: Any, target: Any) -> Tensor:  # noqa: A002 - torch's name
        return ag.MSELoss.apply(input, target)
