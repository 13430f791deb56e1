"""Setup of the training cases (``train_step``, ``train_mnist``) on fastnn's backends.

Both time what ``fastnn train`` runs: the seed model (``train_step`` also the
``strong`` preset, its case's ``model``) from ``models.build_model(name, 0)``,
the optimizer ``fastnn train`` builds by default (Adam, lr 1e-3), and
:func:`fastnn.training.train_step` --
``train_mnist`` through :func:`fastnn.training.run_epoch` over a shuffled
:class:`~fastnn.data.DataLoader`, as an epoch runs. The torch peer
(:mod:`fastnn.bench.torch_peer`) starts from the same weights and data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fastnn.bench.cases import Case, Prepared, Unsupported, _rand

__all__ = ["case_model", "mnist_train_arrays", "model_weights", "prepare", "seed_weights",
           "step_batch"]

#: The checkout's sibling data directory (``<repo>/../shared/data/mnist``), the
#: development layout; searched after fastnn's own places.
_SIBLING_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"


def mnist_train_arrays(limit: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """uint8 images (n, 28, 28), int64 labels (n,) and a source note: real MNIST when
    :func:`fastnn.data.find_mnist_dir` finds it (``$FASTNN_DATA_DIR``, the user cache,
    then ``<repo>/../shared/data/mnist``; never downloaded here), else seeded random
    data of the same shape."""
    from fastnn.data.mnist import find_mnist_dir, load_mnist

    d = find_mnist_dir() or find_mnist_dir(_SIBLING_DATA)
    if d is not None:
        data = load_mnist(d, download=False)
        images, labels = data.train_images, data.train_labels.astype(np.int64)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        return images, labels, "mnist"
    n = 60000 if limit is None else limit
    rng = np.random.default_rng(13)
    return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int64), "random")


def case_model(case: Case) -> str:
    """The preset a training case runs (``seed`` for cases saved before ``model``)."""
    return case.params.get("model", "seed")


def model_weights(name: str = "seed") -> dict[str, np.ndarray]:
    """Preset ``name``'s initial parameters and buffers as the training cases build it
    (``build_model(name, 0)``), keyed like ``state_dict`` (``0.weight``, ...)."""
    from fastnn.models import build_model

    return build_model(name, 0).state_dict()


def seed_weights() -> dict[str, np.ndarray]:
    """:func:`model_weights` of the seed model."""
    return model_weights("seed")


def step_batch(n: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed batch ``train_step`` repeats: x (n, 1, 28, 28), int64 labels (n,)."""
    return _rand((n, 1, 28, 28), dtype, 14), np.random.default_rng(15).integers(0, 10, n)


def prepare(case: Case, backend: str, dtype: str) -> Prepared:
    """``case`` (family ``train``) on fastnn backend ``backend``, under
    ``fastnn.backend(backend)``."""
    try:
        import fastnn
        from fastnn.data.loader import DataLoader
        from fastnn.models import build_model
        from fastnn.training import TrainConfig, build_optimizer, run_epoch, train_step
    except ImportError as exc:
        raise Unsupported(f"fastnn's training stack does not import: {exc}") from exc
    if dtype != "float32":
        raise Unsupported("the model presets train in float32")
    arrays = "cuda" if backend == "cuda" else "cpu"
    model = build_model(case_model(case), 0).to(arrays)
    model.train()
    opt = build_optimizer(TrainConfig(), model.parameters())  # fastnn train's default
    timer = "cupy" if backend == "cuda" else "wall"
    n = case.params["N"]

    if case.op == "train_step":
        x, y = step_batch(n, dtype)
        if arrays == "cuda":
            import cupy

            x, y = cupy.asarray(x), cupy.asarray(y)

        def one_step() -> Any:
            with fastnn.backend(backend):
                return train_step(model, opt, x, y)

        return Prepared(one_step, timer)

    images, labels, source = mnist_train_arrays()
    loader = DataLoader(images, labels, n, shuffle=True, seed=0, drop_last=True, device=arrays,
                        prefetch=0)  # as fastnn train's loader
    epoch = [0]

    def run(steps: int) -> Any:
        # Each call starts an epoch (its own shuffle), as fastnn train's epochs do.
        stats = run_epoch(model, opt, loader, backend, epoch=epoch[0], max_steps=steps)
        epoch[0] += 1
        return stats.loss

    return Prepared(lambda: run(case.params["steps"]), timer, note=source, single_shot=True,
                    warmup_fn=lambda: run(3))
