"""PyTorch (CPU) as a benchmark peer: the same cases, on the ATen kernels torch's
autograd calls in training.

Only imported when the ``torch`` backend is asked for; torch is never a dependency.
The CLI runs it in its own worker process so torch's OpenMP/MKL threads cannot
interfere with fastnn's or OpenBLAS's. Torch's thread count is left as installed.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from fastnn.bench.cases import (
    SEED_FEATURES,
    SEED_HIDDEN,
    Case,
    Prepared,
    Unsupported,
    _rand,
    conv_arrays,
    matmul_arrays,
    pool_arrays,
)
from fastnn.bench.train_cases import case_model, mnist_train_arrays, model_weights, step_batch
from fastnn.data.loader import MNIST_MEAN, MNIST_STD


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise Unsupported("torch is not installed") from exc
    return torch


def available() -> bool:
    """torch is importable (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def prepare(case: Case, dtype: str = "float32") -> Prepared:
    """The torch callable for ``case`` (CPU tensors, no autograd except in training)."""
    torch = _torch()
    torch.set_grad_enabled(case.family == "train")
    builders: dict[str, Callable[[Any, Case, str], Callable[[], Any]]] = {
        "conv2d": _conv, "matmul": _matmul, "max_pool2d": _pool, "avg_pool2d": _pool,
        "elementwise": _elementwise,
    }
    if case.family == "train":
        return _train(torch, case, dtype)
    return Prepared(builders[case.family](torch, case, dtype), "wall")


def _conv(torch: Any, case: Case, dtype: str) -> Callable[[], Any]:
    p = case.params
    a = {k: torch.from_numpy(v) for k, v in conv_arrays(p, dtype).items()}
    s, pad, d = [p["stride"]] * 2, [p["padding"]] * 2, [1, 1]
    if case.op == "conv2d_fwd":
        f = torch.nn.functional.conv2d
        return lambda: f(a["x"], a["w"], a["b"], s, pad, d, 1)
    # The kernel autograd runs for a conv's backward, asking for one gradient only.
    mask = [True, False, False] if case.op == "conv2d_bwd_input" else [False, True, False]
    bwd = torch.ops.aten.convolution_backward
    return lambda: bwd(a["gy"], a["x"], a["w"], None, s, pad, d, False, [0, 0], 1, mask)


def _matmul(torch: Any, case: Case, dtype: str) -> Callable[[], Any]:
    a, b = (torch.from_numpy(v) for v in matmul_arrays(case.params, dtype))
    # Transposed views: torch passes the transpose flag to its BLAS, no copy.
    a = a.T if case.params["ta"] else a
    b = b.T if case.params["tb"] else b
    return lambda: torch.matmul(a, b)


def _pool(torch: Any, case: Case, dtype: str) -> Callable[[], Any]:
    p = case.params
    arr = pool_arrays(p, dtype)
    x, gy = torch.from_numpy(arr["x"]), torch.from_numpy(arr["gy"])
    k, s, pad = [p["K"]] * 2, [p["stride"]] * 2, [p["padding"]] * 2
    aten = torch.ops.aten
    if case.op == "max_pool2d_fwd":
        # Training's forward: the variant that also returns argmax indices for backward.
        return lambda: aten.max_pool2d_with_indices(x, k, s, pad, [1, 1], False)
    if case.op == "max_pool2d_bwd":
        _, idx = aten.max_pool2d_with_indices(x, k, s, pad, [1, 1], False)
        return lambda: aten.max_pool2d_with_indices_backward(gy, x, k, s, pad, [1, 1], False, idx)
    if case.op == "avg_pool2d_fwd":
        return lambda: aten.avg_pool2d(x, k, s, pad, False, True, None)
    return lambda: aten.avg_pool2d_backward(gy, x, k, s, pad, False, True, None)


def _elementwise(torch: Any, case: Case, dtype: str) -> Callable[[], Any]:
    shape = tuple(case.params["shape"])
    x = torch.from_numpy(_rand(shape, dtype, 9))
    g = torch.from_numpy(_rand(shape, dtype, 10))
    aten = torch.ops.aten
    if case.op == "relu_fwd":
        return lambda: torch.relu(x)
    if case.op == "relu_bwd":
        return lambda: aten.threshold_backward(g, x, 0)
    if case.op == "softmax_xent":
        labels = torch.from_numpy(
            np.random.default_rng(11).integers(0, shape[1], shape[0]).astype(np.int64))
        one = torch.ones((), dtype=x.dtype)

        def xent() -> Any:
            # What autograd runs for F.cross_entropy: log_softmax + nll_loss, and back.
            ls = aten._log_softmax(x, 1, False)
            loss, total = aten.nll_loss_forward(ls, labels, None, 1, -100)
            gls = aten.nll_loss_backward(one, ls, labels, None, 1, -100, total)
            return loss, aten._log_softmax_backward_data(gls, ls, 1, x.dtype)

        return xent
    param = torch.nn.Parameter(x)
    param.grad = g * 1e-3
    if case.op == "sgd_step":
        opt = torch.optim.SGD([param], lr=0.01, momentum=0.9)
    else:
        opt = torch.optim.Adam([param], lr=1e-3)
    return opt.step


def _strong_layers(nn: Any) -> list[Any]:
    """fastnn.models' ``strong`` preset, layer for layer (same indices)."""
    def block(c_in: int, c_out: int) -> list[Any]:
        return [nn.Conv2d(c_in, c_out, 3, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return [*block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ReLU(),
            nn.Dropout(0.4), nn.Linear(256, 10)]


def seed_model(torch: Any, dtype: str) -> Any:
    """The seed model in torch: :func:`preset_model` of ``seed``."""
    return preset_model(torch, dtype, "seed")


def preset_model(torch: Any, dtype: str, name: str) -> Any:
    """Preset ``name`` (the seed model, or ``strong``) in torch, starting from the same
    weights and buffers as fastnn's training cases (the layer indices match fastnn's
    ``state_dict`` keys)."""
    nn = torch.nn
    if name == "strong":
        layers = _strong_layers(nn)
    else:
        layers = [nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                  nn.Linear(SEED_FEATURES, SEED_HIDDEN), nn.ReLU(), nn.Linear(SEED_HIDDEN, 10)]
    model = nn.Sequential(*layers).to(getattr(torch, dtype))
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=v.dtype if v.ndim == 0
                                                          else dtype))
                           for k, v in model_weights(name).items()})
    return model


def _train(torch: Any, case: Case, dtype: str) -> Prepared:
    n = case.params["N"]
    model = preset_model(torch, dtype, case_model(case))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xent = torch.nn.functional.cross_entropy

    def step(x: Any, y: Any) -> Any:
        opt.zero_grad(set_to_none=True)
        loss = xent(model(x), y)
        loss.backward()
        opt.step()
        return loss

    if case.op == "train_step":
        x, y = (torch.from_numpy(a) for a in step_batch(n, dtype))
        return Prepared(lambda: step(x, y), "wall")
    images, labels, source = mnist_train_arrays()
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels)
    order = torch.from_numpy(np.random.default_rng(16).permutation(images.shape[0]))
    mean, std = MNIST_MEAN * 255, MNIST_STD * 255  # on raw 0..255 pixels
    cursor = [0]

    def run(n_steps: int) -> Any:
        loss = None
        for _ in range(n_steps):
            i = cursor[0] if cursor[0] + n <= order.numel() else 0
            idx = order[i:i + n]
            cursor[0] = i + n
            xb = ((images_t[idx].to(getattr(torch, dtype)) - mean) / std).reshape(n, 1, 28, 28)
            loss = step(xb, labels_t[idx])
        return loss

    return Prepared(lambda: run(case.params["steps"]), "wall", note=source, single_shot=True,
                    warmup_fn=lambda: run(3))
