"""Model presets, classification metrics, and short training runs that must learn."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

import fastnn
from fastnn import nn
from fastnn.autograd import Tensor
from fastnn.data import DataLoader
from fastnn.metrics import (
    accuracy,
    classification_report,
    confusion_matrix,
    format_confusion_matrix,
    precision_recall_fscore_support,
)
from fastnn.models import MODELS, build_model, reseed_dropout
from fastnn.train import (
    DeviceError,
    TrainConfig,
    build_optimizer,
    resolve_device,
    run_epoch,
    train,
    train_step,
)

NATIVE = "cpu" in fastnn.available_backends()


# --- models ---------------------------------------------------------------------------------
def test_seed_model_architecture() -> None:
    model = build_model("seed", 0)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU", "Linear"]
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {
        "0.weight": (32, 1, 3, 3),
        "0.bias": (32,),
        "4.weight": (128, 5408),
        "4.bias": (128,),
        "6.weight": (10, 128),
        "6.bias": (10,),
    }
    assert all(p.dtype == np.float32 for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_map_images_to_logits(name: str) -> None:
    model = build_model(name, 0).eval()
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    with fastnn.backend("numpy"):
        y = model(Tensor(x))
    assert y.shape == (3, 10) and y.dtype == np.float32 and np.isfinite(y.data).all()


def test_strong_model_has_batchnorm_and_dropout() -> None:
    mods = list(build_model("strong", 0).modules())
    assert sum(isinstance(m, nn.Conv2d) for m in mods) >= 2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in mods) >= 2
    assert any(isinstance(m, nn.Dropout) for m in mods)


def test_init_is_seeded() -> None:
    a, b, c = (build_model("seed", s).state_dict() for s in (1, 1, 2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["0.weight"], c["0.weight"])
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("resnet", 0)
    with pytest.raises(ValueError, match="seed"):
        build_model("seed", -1)


def test_dropout_reseed_per_epoch() -> None:
    model = build_model("strong", 0)
    x = Tensor(np.ones((2, 1, 28, 28), np.float32))

    def out(epoch: int) -> np.ndarray:
        reseed_dropout(model, 5, epoch)
        with fastnn.backend("numpy"):
            return model(x).data  # training mode: dropout active

    e0, e1, e0_again = out(0), out(1), out(0)
    assert not np.array_equal(e0, e1)
    # BatchNorm running stats moved between calls but train-mode output uses batch stats.
    np.testing.assert_array_equal(e0, e0_again)


# --- metrics ----------------------------------------------------------------------------------
# sklearn.metrics.classification_report(y_true, y_pred) for the example in its docs.
_SKLEARN_EXAMPLE = """\
              precision    recall  f1-score   support

           0       0.50      1.00      0.67         1
           1       0.00      0.00      0.00         1
           2       1.00      0.67      0.80         3

    accuracy                           0.60         5
   macro avg       0.50      0.56      0.49         5
weighted avg       0.70      0.60      0.61         5
"""


def test_classification_report_matches_sklearn_format() -> None:
    assert classification_report([0, 1, 2, 2, 2], [0, 0, 2, 2, 1]) == _SKLEARN_EXAMPLE
    names = classification_report(
        [0, 1, 2, 2, 2], [0, 0, 2, 2, 1], target_names=["class 0", "class 1", "class 2"]
    )
    assert names.splitlines()[2].startswith("     class 0       0.50")


def test_report_with_label_subset_uses_micro_avg() -> None:
    rep = classification_report([0, 1, 2, 2, 2], [0, 0, 2, 2, 1], labels=[0, 2], digits=3)
    assert "micro avg" in rep and "accuracy" not in rep
    micro = rep.splitlines()[-3].split()
    assert micro[:2] == ["micro", "avg"] and micro[-1] == "4"
    assert [float(v) for v in micro[2:5]] == [0.75, 0.75, 0.75]


def test_metrics_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 10, 500), rng.integers(0, 10, 500)
    p[:250] = t[:250]
    cm = confusion_matrix(t, p, labels=list(range(10)))
    for i in range(10):
        for j in range(10):
            assert cm[i, j] == np.sum((t == i) & (p == j))
    prec, rec, f1, sup = precision_recall_fscore_support(t, p, labels=list(range(10)))
    np.testing.assert_allclose(prec, np.diag(cm) / cm.sum(axis=0))
    np.testing.assert_allclose(rec, np.diag(cm) / cm.sum(axis=1))
    np.testing.assert_allclose(f1, 2 * prec * rec / (prec + rec))
    assert sup.tolist() == cm.sum(axis=1).tolist()
    assert accuracy(t, p) == pytest.approx(np.trace(cm) / 500)
    text = format_confusion_matrix(cm)
    assert len(text.splitlines()) == 11 and text.splitlines()[0].split()[0] == "true\\pred"


def test_metrics_edge_cases() -> None:
    # A class never predicted: precision is 0 (sklearn's zero_division=0), not NaN.
    prec, rec, f1, _ = precision_recall_fscore_support([0, 1], [0, 0], labels=[0, 1])
    assert prec.tolist() == [0.5, 0.0] and rec.tolist() == [1.0, 0.0] and np.isfinite(f1).all()
    assert confusion_matrix([0, 5], [5, 7], labels=[5, 0]).tolist() == [[0, 0], [1, 0]]
    with pytest.raises(ValueError, match="lengths differ"):
        accuracy([0, 1], [0])
    with pytest.raises(TypeError, match="integer"):
        accuracy([0.5], [0])


# --- devices and training ------------------------------------------------------------------------
def test_device_resolution() -> None:
    assert resolve_device("numpy").backend == "numpy"
    if not NATIVE:
        with pytest.raises(DeviceError, match="fastnn._C"):
            resolve_device("cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")


def test_config_validation() -> None:
    for bad in (
        {"epochs": 0},
        {"lr": 0.0},
        {"lr": float("nan")},
        {"optimizer": "rmsprop"},
        {"model": "big"},
        {"augment": -1},
        {"limit_train": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad).validate()


def _run(mnist_dir: Path, **kw) -> float:
    cfg = TrainConfig(data_dir=str(mnist_dir), epochs=1, seed=0, **kw)
    return train(cfg, progress=False, out=io.StringIO()).test_accuracy


@pytest.mark.mnist
@pytest.mark.skipif(not NATIVE, reason="needs the C++ extension fastnn._C (tools/dev_build.sh)")
def test_cpu_backend_learns(mnist_dir: Path) -> None:
    acc = _run(mnist_dir, model="seed", device="cpu", limit_train=6000, limit_test=1000)
    assert acc > 0.85


@pytest.mark.mnist
def test_numpy_backend_learns(mnist_dir: Path) -> None:
    acc = _run(
        mnist_dir, model="seed", device="numpy", limit_train=1000, limit_test=300, batch_size=32
    )
    assert acc > 0.7  # chance is 0.1


@pytest.mark.gpu
@pytest.mark.mnist
def test_cuda_learns(mnist_dir: Path) -> None:
    acc = _run(mnist_dir, model="seed", device="cuda", limit_train=6000, limit_test=1000)
    assert acc > 0.85


# --- the step and the epoch runner (what fastnn train and fastnn bench both run) ---------------
def _toy_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable toy data: the label is which quarter of the image is bright."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, lab in enumerate(labels):
        r, c = divmod(int(lab), 2)
        images[i, 14 * r : 14 * r + 14, 14 * c : 14 * c + 14] += 200
    return images, labels


def test_train_step_updates_and_lowers_the_loss(host_backend: str) -> None:
    model = build_model("seed", 0)
    opt = build_optimizer(TrainConfig(), model.parameters())
    images, labels = _toy_images(32)
    x, y = next(iter(DataLoader(images, labels, 32)))
    before = model.state_dict()["0.weight"].copy()
    with fastnn.backend(host_backend):
        losses = [float(train_step(model, opt, x, y).data) for _ in range(5)]
    assert not np.array_equal(before, model.state_dict()["0.weight"])
    assert losses[-1] < losses[0]


def test_run_epoch_counts_and_reseeds(host_backend: str) -> None:
    images, labels = _toy_images(40)
    loader = DataLoader(images, labels, 16, shuffle=True, seed=3)

    def epoch_of(seed_model: int, **kw) -> tuple:
        model = build_model("seed", seed_model)
        opt = build_optimizer(TrainConfig(), model.parameters())
        stats = run_epoch(model, opt, loader, host_backend, **kw)
        return stats, model.state_dict()["4.weight"]

    full, w_full = epoch_of(0, epoch=2)
    assert (full.steps, full.images) == (3, 40) and full.seconds > 0 and full.loss > 0
    assert full.images_per_second == pytest.approx(40 / full.seconds)
    short, _ = epoch_of(0, epoch=2, max_steps=2)
    assert (short.steps, short.images) == (2, 32)
    # epoch=2 again: the same shuffle, so the same weights; another epoch shuffles otherwise.
    again, w_again = epoch_of(0, epoch=2)
    other, w_other = epoch_of(0, epoch=5)
    np.testing.assert_array_equal(w_full, w_again)
    assert again.loss == full.loss and not np.array_equal(w_full, w_other)
    with pytest.raises(ValueError, match="max_steps"):
        model = build_model("seed", 0)
        run_epoch(model, build_optimizer(TrainConfig(), model.parameters()), loader,
                  host_backend, max_steps=0)


def test_retain_freed_memory_keeps_steps_from_faulting() -> None:
    """fastnn train (and a user, through fastnn.retain_freed_memory) asks glibc to
    keep freed pages: a step that frees and reallocates ~100 MB of activations then
    faults nothing back in; without it, every step faults its pages in again
    (checked in a child process each way)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import resource, sys
        import numpy as np
        import fastnn  # the public name, as a user's own training loop calls it
        ok = fastnn.retain_freed_memory() if sys.argv[1] == "1" else True
        def step():
            arrs = [np.ones(1_000_000) for _ in range(12)]  # 12 x 8 MB live, then freed
            return sum(float(a[-1]) for a in arrs)
        for _ in range(3):
            step()
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            step()
        print(ok, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 10)
    """)

    def faults(retain: bool) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", code, "1" if retain else "0"],
                             capture_output=True, text=True, check=True, timeout=120)
        ok, n = out.stdout.split()
        return ok, float(n)

    ok, with_it = faults(True)
    if ok != "True":
        pytest.skip("not glibc: mallopt is unavailable and nothing changes")
    _, without = faults(False)
    assert with_it < 100 < without  # ~6,000 faults per step without it here
