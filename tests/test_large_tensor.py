"""64-bit index arithmetic: kernels on a tensor of more than 2**31 elements.

Slow and memory-hungry (one 8.6 GB float32 input, mostly never-written zero
pages, so little of it becomes resident), so these run only with
``FASTNN_RUN_SLOW=1`` or ``pytest -m slow``. Every op reads the same buffer in a
different shape and spot values are planted past flat index 2**31, where an
``int`` (32-bit) offset would wrap negative: the kernel then reads the wrong
element or crashes. Failing to allocate is acceptable (a clean MemoryError);
anything else is a bug.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import NATIVE

import fastnn
import fastnn.functional as F

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not NATIVE, reason="fastnn._C is not built"),
]

H, W = 2**16 + 1, 2**15  # H * W = 2**31 + 2**15 elements
ROW_PAST_2POW31 = 2**16  # flat index of its first element is exactly 2**31


@pytest.fixture(autouse=True)
def _only_when_asked(request: pytest.FixtureRequest) -> None:
    if os.environ.get("FASTNN_RUN_SLOW") != "1" and "slow" not in (
        request.config.option.markexpr or ""
    ):
        pytest.skip("slow: set FASTNN_RUN_SLOW=1 or run with -m slow")


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def big() -> tuple[np.ndarray, dict[tuple[int, int], float]]:
    """(H, W) float32 zeros with a few planted values, most of them past 2**31."""
    try:
        x = np.zeros((H, W), np.float32)  # calloc: untouched pages stay unallocated
    except MemoryError:
        pytest.skip("cannot allocate the 8.6 GB test tensor here")
    spots = {
        (0, 5): 3.0,
        (ROW_PAST_2POW31 - 1, W - 1): 7.0,  # flat index 2**31 - 1
        (ROW_PAST_2POW31, 0): 11.0,  # flat index 2**31
        (ROW_PAST_2POW31, 12345): -2.0,
        (H - 1, W - 1): 13.0,  # the very last element
        (H - 1, 77): 2.0 * W * 5,  # makes an average of exactly 5
    }
    for (r, c), v in spots.items():
        x[r, c] = v
    return x, spots


def _row_max(spots):
    want = {}
    for (r, _), v in spots.items():
        want[r] = max(want.get(r, 0.0), v)
    return want


def _check_rows(out: np.ndarray, want_rows: dict[int, float], default: float = 0.0) -> None:
    out = out.reshape(-1)
    assert out.shape == (H,)
    for r, v in want_rows.items():
        assert out[r] == v, f"row {r}: got {out[r]}, want {v}"
    rest = np.ones(H, bool)
    rest[list(want_rows)] = False
    wrong = np.flatnonzero((out != default) & rest)
    assert not wrong.size, f"unexpected values at rows {wrong[:5].tolist()}"


def _run(fn):
    try:
        with fastnn.backend("cpu"):
            return fn()
    except MemoryError as exc:
        pytest.skip(f"kernel could not allocate: {exc}")


def test_max_pool2d_rows(big) -> None:
    x, spots = big
    y = _run(lambda: F.max_pool2d(x.reshape(1, 1, H, W), (1, W)))
    assert y.shape == (1, 1, H, 1)
    _check_rows(y, _row_max(spots))


def test_avg_pool2d_rows(big) -> None:
    x, spots = big
    y = _run(lambda: F.avg_pool2d(x.reshape(1, 1, H, W), (1, W)))
    want = {}
    for (r, _), v in spots.items():
        want[r] = want.get(r, 0.0) + v
    want = {r: np.float32(v / W) for r, v in want.items()}
    out = y.reshape(-1)
    for r, v in want.items():
        assert out[r] == pytest.approx(v, rel=1e-6), (r, out[r], v)


def test_matmul_row_sums(big) -> None:
    x, spots = big
    ones = np.ones((W, 1), np.float32)
    y = _run(lambda: F.matmul(x, ones))
    want = {}
    for (r, _), v in spots.items():
        want[r] = want.get(r, 0.0) + v
    _check_rows(y, {r: np.float32(v) for r, v in want.items()})


def test_conv2d_large_batch(big) -> None:
    """N = 2**16 + 1 images of 1 x W: batch offsets pass 2**31.

    A strided 1x1 kernel samples columns 0, 12345 and 24690 of every image (a
    full-width kernel works too but takes minutes on 2 cores).
    """
    x, _ = big
    w = np.full((1, 1, 1, 1), 2.0, np.float32)
    y = _run(lambda: F.conv2d(x.reshape(H, 1, 1, W), w, stride=(1, 12345)))
    assert y.shape == (H, 1, 1, 3)
    want = 2.0 * x[:, ::12345]
    np.testing.assert_array_equal(y.reshape(H, 3), want)
    assert y[ROW_PAST_2POW31, 0, 0, 0] == 22.0 and y[ROW_PAST_2POW31, 0, 0, 1] == -4.0


def test_relu_over_2pow31_elements(big) -> None:
    x, spots = big
    if _mem_available() < 12 * 2**30:
        pytest.skip("relu writes an 8.6 GB output; not enough free memory now")
    y = _run(lambda: F.relu(x.reshape(-1)))
    assert y.shape == (H * W,)
    for (r, c), v in spots.items():
        assert y[r * W + c] == max(v, 0.0), (r, c)
    del y
