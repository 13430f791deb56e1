"""Shared fixtures: the backends present here, GPU skipping, MNIST location."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import fastnn

REPO = Path(__file__).resolve().parents[1]
# Where the fastnn under test lives: the checkout in a development tree, or
# site-packages after `pip install .`. Subprocesses get it on PYTHONPATH and run
# from it, never from the checkout, whose fastnn/ has no built extension.
PKG_ROOT = Path(fastnn.__file__).resolve().parents[1]


def _native_available() -> bool:
    try:
        import fastnn._C  # noqa: F401
    except ImportError:
        return False
    return True


def _gpu_available() -> bool:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no cupy, no driver, no device
        return False


NATIVE = _native_available()
GPU = _gpu_available()

# HYPOTHESIS_PROFILE=ci (set by .ci/run): every property test draws the same
# examples on every run, so a commit's CI result does not depend on the run;
# a plain `pytest` keeps drawing fresh examples. test_fuzz.py reads the same
# variable for its own profiles (its "ci" one is derandomized too).
try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # not installed (it comes with the test extra): nothing to set
    pass
else:
    _hypothesis_settings.register_profile("ci", derandomize=True, database=None)
    if os.environ.get("HYPOTHESIS_PROFILE") == "ci":
        _hypothesis_settings.load_profile("ci")

# Backends that take NumPy arrays. CI sets FASTNN_REQUIRE_NATIVE=1 so that a
# missing extension fails loudly instead of silently testing only the reference.
HOST_BACKENDS = ["numpy"] + (["cpu"] if NATIVE else [])


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("FASTNN_REQUIRE_NATIVE") == "1" and not NATIVE:
        raise pytest.UsageError(
            "FASTNN_REQUIRE_NATIVE=1 but fastnn._C does not import: the C++ extension "
            "was not built/installed"
        )
    if os.environ.get("FASTNN_REQUIRE_TORCH") == "1":
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise pytest.UsageError(
                "FASTNN_REQUIRE_TORCH=1 but torch is not installed: fastnn.torch's tests "
                "would skip (install torch==2.13.0)"
            )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with CuPy (none found)")
    in_sim = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    keep, dropped = [], []
    for item in items:
        # Markers, not item.keywords: keywords also hold the names of the parent
        # directories, so a checkout in a folder called "gpu" would skip everything.
        if item.get_closest_marker("gpu") is not None and not GPU:
            item.add_marker(skip_gpu)
        # Simulator tests need NUMBA_ENABLE_CUDASIM=1 before numba's import; in an
        # ordinary run test_cuda_sim.py::test_simulator_suite runs them in a child.
        sim_only = item.get_closest_marker("sim_only") is not None
        (dropped if sim_only and not in_sim else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(params=HOST_BACKENDS)
def host_backend(request: pytest.FixtureRequest) -> str:
    """Each backend that runs on NumPy arrays here ("numpy", and "cpu" when built)."""
    return request.param


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# --- MNIST location (data/CLI tests) -------------------------------------------------
def find_mnist_dir() -> Path | None:
    """FASTNN_DATA_DIR, else ../shared/data/mnist beside the repo; None if absent.

    Unlike the product's search, never the user cache: tests must not depend on
    (or download into) a developer's own files.
    """
    from fastnn.data.mnist import has_mnist_files

    candidates = []
    if os.environ.get("FASTNN_DATA_DIR"):
        candidates.append(Path(os.environ["FASTNN_DATA_DIR"]))
    candidates.append(REPO.parent / "shared" / "data" / "mnist")
    return next((d for d in candidates if has_mnist_files(d)), None)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    d = find_mnist_dir()
    if d is None:
        pytest.skip("MNIST not found: set FASTNN_DATA_DIR or put it in ../shared/data/mnist")
    return d
# --- end MNIST location --------------------------------------------------------------
