"""The cache that the C++ kernels' large outputs come from (csrc/memory_pool.cpp).

Outputs of at least 256 KiB are ordinary NumPy arrays whose memory comes from
fastnn's pool through NumPy's allocator interface, and goes back to it when
NumPy frees them. What must hold: such outputs reuse freed blocks, a reused
block's old contents never reach a result (every kernel writes every element of
its outputs), the limit is obeyed and 0 turns the pool off, bad settings are
refused with a clear error, and a training loop reaches a steady state in which
no output needs fresh memory.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import fastnn

_C = pytest.importorskip("fastnn._C", reason="fastnn._C is not built (run tools/dev_build.sh)")

if np.lib.NumpyVersion(np.__version__) < "1.22.0":
    pytest.skip("NumPy < 1.22 has no allocator interface", allow_module_level=True)

BIG = _C.memory_pool_stats()["min_bytes"]  # pool::kMinBytes: 256 KiB


def handler_name(a: np.ndarray) -> str:
    mu = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return mu.get_handler_name(a)


@pytest.fixture
def pool_on():
    """The pool with its limit at the import-time default, restored afterwards."""
    limit = _C.memory_pool_stats()["limit"] or 1 << 30
    _C.set_memory_pool_limit(limit)
    yield
    _C.set_memory_pool_limit(limit)


def rand(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_large_outputs_come_from_the_pool_and_small_ones_do_not(pool_on):
    big = _C.matmul(rand((256, 256)), rand((256, 256)))  # exactly 256 KiB
    small = _C.matmul(rand((8, 8)), rand((8, 8)))
    assert big.nbytes == BIG
    assert handler_name(big) == "fastnn_memory_pool"
    assert handler_name(small) != "fastnn_memory_pool"
    # Ordinary arrays: they own their memory, are writeable and aligned.
    assert big.base is None and big.flags.owndata and big.flags.writeable
    assert big.ctypes.data % 64 == 0
    # Arrays NumPy allocates itself are untouched.
    assert handler_name(np.empty(1 << 20)) != "fastnn_memory_pool"


def test_freed_output_memory_is_reused(pool_on):
    a, b = rand((512, 300)), rand((300, 512))
    first = _C.matmul(a, b)
    want = first.copy()
    address = first.ctypes.data
    del first
    hits = _C.memory_pool_stats()["hits"]
    again = _C.matmul(a, b)
    assert _C.memory_pool_stats()["hits"] == hits + 1
    assert again.ctypes.data == address
    np.testing.assert_array_equal(again, want)


def _ops(dtype):
    """(name, call) for every kernel with an output of at least 256 KiB here."""
    x, w = rand((4, 16, 41, 39), dtype, 1), rand((16, 16, 3, 3), dtype, 2)
    geo = ((1, 1), (1, 1), (1, 1), 1)
    gy = rand((4, 16, 41, 39), dtype, 3)
    img = rand((8, 16, 64, 64), dtype, 4)
    pooled = rand((8, 16, 32, 32), dtype, 5)
    m, k = rand((200, 300), dtype, 6), rand((400, 300), dtype, 7)
    bn_w, bn_b = rand((16,), dtype, 8), rand((16,), dtype, 9)
    one = rand((40, 1, 28, 28), dtype, 10)
    w1, b1 = rand((32, 1, 3, 3), dtype, 11), rand((32,), dtype, 12)
    pool_args = ((2, 2), (2, 2), (0, 0), (1, 1))
    return [
        ("conv2d", lambda: _C.conv2d(x, w, None, *geo)),
        ("conv2d_backward_input", lambda: _C.conv2d_backward_input(gy, w, (41, 39), *geo)),
        ("matmul", lambda: _C.matmul(m, k, False, True)),
        ("linear_relu", lambda: _C.linear_relu(m, k, None)),
        ("max_pool2d", lambda: _C.max_pool2d(img, *pool_args, (32, 32))),
        ("max_pool2d_with_indices", lambda: _C.max_pool2d_with_indices(img, *pool_args, (32, 32))),
        ("max_pool2d_backward", lambda: _C.max_pool2d_backward(pooled, img, *pool_args)),
        ("avg_pool2d_backward", lambda: _C.avg_pool2d_backward(
            pooled, (64, 64), (2, 2), (2, 2), (0, 0), True, None)),
        ("relu", lambda: _C.relu(img)),
        ("relu_backward", lambda: _C.relu_backward(img, img)),
        ("batch_norm2d_relu", lambda: _C.batch_norm2d_relu(
            img, bn_w, bn_b, None, None, 1e-5, True)),
        ("conv2d_relu_max_pool2d", lambda: _C.conv2d_relu_max_pool2d(
            one, w1, b1, (1, 1), (0, 0), (1, 1), 1, *pool_args, (13, 13), True)),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("index", range(12))
def test_reused_blocks_holding_nan_do_not_reach_results(pool_on, dtype, index):
    name, call = _ops(dtype)[index]

    def arrays(out):
        return [a for a in (out if isinstance(out, tuple) else (out,)) if a is not None]

    first = arrays(call())
    assert any(a.nbytes >= BIG for a in first), name
    want = [a.copy() for a in first]
    for a in first:
        if a.nbytes >= BIG:
            a.fill(np.nan if a.dtype.kind == "f" else -1)  # stale memory for the next call
    del first, a
    gc.collect()
    hits = _C.memory_pool_stats()["hits"]
    again = arrays(call())
    assert _C.memory_pool_stats()["hits"] > hits, f"{name}: no block was reused"
    for got, ref in zip(again, want):
        np.testing.assert_array_equal(got, ref, err_msg=name)


def test_resize_moves_the_contents(pool_on):
    y = _C.matmul(rand((256, 256)), rand((256, 256)))
    want = y.copy()
    y.resize((1024, 256), refcheck=False)  # NumPy reallocates through the pool
    np.testing.assert_array_equal(y[:256], want)
    assert not y[256:].any()
    y.resize((300, 256), refcheck=False)
    np.testing.assert_array_equal(y[:256], want)


def test_limit_zero_turns_the_pool_off(pool_on):
    a, b = rand((256, 256)), rand((256, 256))
    keep = _C.matmul(a, b)  # from the pool, alive across the switch
    fastnn.set_memory_pool_limit(0)
    stats = fastnn.memory_pool_stats()
    assert stats["enabled"] is False and stats["limit"] == 0 and stats["cached_bytes"] == 0
    off = _C.matmul(a, b)
    assert handler_name(off) != "fastnn_memory_pool"
    np.testing.assert_array_equal(off, keep)
    del keep  # a pool block freed while the pool is off goes to the system
    assert fastnn.memory_pool_stats()["cached_bytes"] == 0


def test_limit_trims_and_bounds_the_cache(pool_on):
    fastnn.empty_memory_pool()
    assert fastnn.memory_pool_stats()["cached_bytes"] == 0
    outs = [_C.relu(rand((1 << 18,), seed=i)) for i in range(3)]  # 1 MiB each
    del outs
    assert fastnn.memory_pool_stats()["cached_bytes"] >= 3 << 20
    fastnn.set_memory_pool_limit(3 << 19)  # 1.5 MiB: one block stays
    stats = fastnn.memory_pool_stats()
    assert stats["cached_bytes"] <= 3 << 19 and stats["cached_blocks"] == 1
    outs = [_C.relu(rand((1 << 18,), seed=i)) for i in range(3)]
    del outs  # only what fits is kept
    assert fastnn.memory_pool_stats()["cached_bytes"] <= 3 << 19
    fastnn.empty_memory_pool()
    assert fastnn.memory_pool_stats()["cached_blocks"] == 0


@pytest.mark.parametrize(
    "value, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("1G", TypeError)]
)
def test_set_memory_pool_limit_rejects_bad_values(value, error):
    with pytest.raises(error, match="nbytes"):
        fastnn.set_memory_pool_limit(value)
    with pytest.raises((TypeError, ValueError)):
        _C.set_memory_pool_limit(-1)


def test_outputs_freed_on_other_threads(pool_on):
    gc.collect()
    before = _C.memory_pool_stats()["in_use_blocks"]
    a, b = rand((256, 300)), rand((300, 256))
    want = a @ b
    errors: list[str] = []

    def work():
        for _ in range(30):
            y = _C.matmul(a, b)
            if not np.allclose(y, want, rtol=1e-4, atol=1e-3):
                errors.append("wrong result")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    assert not errors
    assert _C.memory_pool_stats()["in_use_blocks"] == before


def test_training_reaches_a_steady_state(pool_on):
    """After a few steps every output of a step comes from blocks freed by the last."""
    from fastnn.models import build_model
    from fastnn.training import TrainConfig, build_optimizer, train_step

    model = build_model("seed", 0)
    model.train()
    opt = build_optimizer(TrainConfig(model="seed"), model.parameters())
    x = rand((32, 1, 28, 28))
    y = np.arange(32, dtype=np.int64) % 10
    with fastnn.backend("cpu"):
        for _ in range(3):
            train_step(model, opt, x, y)
        start = fastnn.memory_pool_stats()
        for _ in range(3):
            train_step(model, opt, x, y)
    end = fastnn.memory_pool_stats()
    assert end["hits"] > start["hits"]
    assert end["misses"] == start["misses"]


def _run(env_value: str, code: str) -> subprocess.CompletedProcess:
    # The child imports the fastnn under test (installed, or the checkout).
    root = Path(fastnn.__file__).resolve().parents[1]
    env = dict(os.environ, FASTNN_MEMORY_POOL_LIMIT=env_value, PYTHONPATH=str(root))
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        env=env, cwd=root, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("value, limit", [("64M", 64 << 20), ("0", 0), ("1048576", 1 << 20)])
def test_env_sets_the_limit(value, limit):
    r = _run(value, "import fastnn, fastnn.backends.cpu; s = fastnn.memory_pool_stats(); "
                    "print(s['limit'], s['enabled'])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(limit), str(limit > 0)]
    assert "FASTNN_MEMORY_POOL_LIMIT" not in r.stderr


def test_env_malformed_warns_and_keeps_the_default():
    r = _run("lots", "import fastnn, fastnn.backends.cpu; "
                     "print(fastnn.memory_pool_stats()['limit'])")
    assert r.returncode == 0, r.stderr
    assert "RuntimeWarning: FASTNN_MEMORY_POOL_LIMIT ignored: 'lots'" in r.stderr
    assert int(r.stdout) > 0


def test_new_sizes_evict_the_oldest_blocks(pool_on):
    """Training, then evaluation at another batch size: the cache follows the new
    sizes instead of staying full of the old ones."""
    fastnn.empty_memory_pool()
    fastnn.set_memory_pool_limit(3 << 20)
    old = [_C.relu(rand((1 << 18,), seed=i)) for i in range(3)]  # 1 MiB each
    del old
    stats = fastnn.memory_pool_stats()
    assert stats["cached_blocks"] == 3 and stats["cached_bytes"] == 3 << 20
    new = _C.relu(rand((1 << 19,)))  # 2 MiB: no cached block fits
    del new  # two 1 MiB blocks make room for it
    stats = fastnn.memory_pool_stats()
    assert stats["cached_blocks"] == 2 and stats["cached_bytes"] == 3 << 20
    hits = stats["hits"]
    again = _C.relu(rand((1 << 19,)))
    assert fastnn.memory_pool_stats()["hits"] == hits + 1
    del again
    too_big = _C.relu(rand((1 << 20,)))  # 4 MiB, past the limit: never cached
    del too_big
    assert fastnn.memory_pool_stats()["cached_bytes"] == 3 << 20
