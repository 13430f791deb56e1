"""The ``lookup_u8`` op (a data loader's gather and normalisation in one pass) on
every host backend: against direct loops, NumPy's indexing, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import NATIVE

from fastnn.backends import get_backend


def _loop(images: np.ndarray, rows: np.ndarray | None, table: np.ndarray) -> np.ndarray:
    """out[b] = table[images[rows[b]]], element by element."""
    picked = list(range(images.shape[0])) if rows is None else [int(r) for r in rows]
    out = np.empty((len(picked), *images.shape[1:]), table.dtype)
    row_len = int(np.prod(images.shape[1:]))
    src, dst = images.reshape(images.shape[0], row_len), out.reshape(len(picked), row_len)
    for b, r in enumerate(picked):
        for i in range(row_len):
            dst[b, i] = table[src[r, i]]
    return out


def _table(dtype: type, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(256).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "rows"),
    [
        ((5, 3, 4), [4, 0, 0, 2]),  # repeated and out-of-order rows
        ((5, 3, 4), None),
        ((1, 7), [0]),  # batch 1, 2-D images
        ((6,), [5, 1]),  # scalar "images"
        ((4, 2, 3, 5), [3, 1, 2]),  # NCHW
        ((3, 0, 2), [1, 2]),  # empty rows
        ((4, 2, 2), []),  # empty batch
        ((0, 2, 2), None),  # empty dataset
    ],
)
def test_matches_loops(host_backend, rng, dtype, shape, rows) -> None:
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    table = _table(dtype, rng)
    r = None if rows is None else np.array(rows, np.int64)
    got = get_backend(host_backend).lookup_u8(images, r, table)
    want = _loop(images, r, table)
    assert got.dtype == dtype and got.shape == want.shape and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
    assert not np.shares_memory(got, table)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_batches_match_numpy_bit_for_bit(host_backend, rng, dtype) -> None:
    """MNIST-sized batches (every pixel value, odd batch sizes, shuffled rows)."""
    images = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8)
    images[0] = np.arange(784).reshape(28, 28) % 256  # every table entry is used
    table = ((np.arange(256) / 255.0 - 0.1307) / 0.3081).astype(dtype)
    op = get_backend(host_backend).lookup_u8
    for batch in (1, 37, 128, 300):
        rows = rng.permutation(300)[:batch].astype(np.int64)
        rows[0] = 0
        np.testing.assert_array_equal(op(images, rows, table), table[images[rows]])
    np.testing.assert_array_equal(op(images, None, table), table[images])


def test_large_batch_on_several_threads(rng) -> None:
    """More rows than one thread's share: every row written, in its place."""
    if not NATIVE:
        pytest.skip("needs the native extension")
    import fastnn

    images = rng.integers(0, 256, (2000, 300), dtype=np.uint8)
    rows = rng.integers(0, 2000, 1500).astype(np.int64)
    table = _table(np.float32, rng)
    old = fastnn.get_num_threads()
    try:
        for threads in (1, 2, 3):
            fastnn.set_num_threads(threads)
            got = get_backend("cpu").lookup_u8(images, rows, table)
            np.testing.assert_array_equal(got, table[images[rows]])
    finally:
        fastnn.set_num_threads(old)


@pytest.mark.skipif(not NATIVE, reason="needs the native extension")
@pytest.mark.parametrize(
    ("images", "rows", "table", "exc", "match"),
    [
        (np.zeros((3, 4), np.int8), None, np.zeros(256, np.float32), TypeError,
         "images must be uint8"),
        ([[1, 2]], None, np.zeros(256, np.float32), TypeError, "images must be a numpy.ndarray"),
        (np.zeros((), np.uint8), None, np.zeros(256, np.float32), ValueError, "images must have"),
        (np.zeros((4, 6), np.uint8)[:, ::2], None, np.zeros(256, np.float32), ValueError,
         "images must be C-contiguous"),
        (np.zeros((3, 4), np.uint8), None, np.zeros(255, np.float32), ValueError,
         r"table must have shape \(256,\)"),
        (np.zeros((3, 4), np.uint8), None, np.zeros((2, 128), np.float32), ValueError, "table"),
        (np.zeros((3, 4), np.uint8), None, np.zeros(256, np.int32), TypeError,
         "table must be float32 or float64"),
        (np.zeros((3, 4), np.uint8), np.array([0, 3]), np.zeros(256, np.float32), ValueError,
         r"rows must be in \[0, 3\), got 3 at index 1"),
        (np.zeros((3, 4), np.uint8), np.array([-1]), np.zeros(256, np.float32), ValueError,
         r"rows must be in \[0, 3\), got -1"),
        (np.zeros((3, 4), np.uint8), np.array([0], np.int32), np.zeros(256, np.float32),
         TypeError, "rows must be int64"),
        (np.zeros((3, 4), np.uint8), np.zeros((1, 1), np.int64), np.zeros(256, np.float32),
         ValueError, r"rows must have shape \(B,\)"),
        (np.zeros((0, 4), np.uint8), np.array([0]), np.zeros(256, np.float32), ValueError,
         r"rows must be in \[0, 0\)"),
    ],
)
def test_native_rejects_bad_input(images, rows, table, exc, match) -> None:
    with pytest.raises(exc, match=f"lookup_u8: {match}"):
        get_backend("cpu").lookup_u8(images, rows, table)

