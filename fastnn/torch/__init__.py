"""fastnn as a backend inside PyTorch code (needs the ``torch`` extra).

Importing this package registers fastnn's kernels as PyTorch custom ops,
``torch.ops.fastnn.{conv2d, conv2d_relu_max_pool2d, max_pool2d,
max_pool2d_with_indices, avg_pool2d, linear, linear_relu, matmul, cross_entropy}``
and their ``*_backward`` ops, with autograd and fake (meta) implementations, so
they work in eager mode, under autograd and under ``torch.compile(fullgraph=True)``.
CPU tensors reach the C++ kernels as zero-copy NumPy views; CUDA tensors reach
the CUDA backend through DLPack (also without a copy).

* :mod:`fastnn.torch.nn`: drop-in ``Conv2d``, ``MaxPool2d``, ``AvgPool2d``,
  ``Linear`` and ``CrossEntropyLoss`` (subclasses of torch's, same parameters
  and ``state_dict``) and the fused ``Conv2dReLUMaxPool2d``;
* :mod:`fastnn.torch.optim`: ``Adam`` and ``AdamW`` (subclasses of torch's, same
  state) whose step is fastnn's one-pass kernel;
* :func:`accelerate`: swaps those into an existing model (and optimizer) in place;
* :func:`set_release_openmp`: whether each fastnn op first ends the spin-wait of
  torch's idle OpenMP workers (on by default; :mod:`fastnn.torch._openmp`).

``import fastnn`` never imports torch; only this package does.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "fastnn.torch needs PyTorch: install it with `pip install \"fastnn[torch]\"`"
    ) from exc

from fastnn.torch import _ops as ops  # noqa: E402 - registers torch.ops.fastnn.*
from fastnn.torch import nn, optim  # noqa: E402
from fastnn.torch._openmp import set_enabled as set_release_openmp  # noqa: E402
from fastnn.torch.accelerate import AccelerateReport, accelerate  # noqa: E402

__all__ = ["AccelerateReport", "accelerate", "nn", "ops", "optim", "set_release_openmp"]
