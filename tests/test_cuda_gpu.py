"""The cuda backend on a real GPU: every op vs numpy_ref at realistic shapes.

Marked ``gpu``: skipped unless CuPy sees an NVIDIA GPU (see conftest.py). Run
with ``python -m pytest -m gpu tests/test_cuda_gpu.py -q``; benchmarks/gpu_check.sh
does. Also checks the properties the simulator cannot: kernels run on CuPy's
current stream, and a whole training step queues without a host sync.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy")

from fastnn.backends import cuda as cb  # noqa: E402
from fastnn.backends import numpy_ref as ref  # noqa: E402
from fastnn.backends._cuda import conv as _conv  # noqa: E402
from fastnn.backends._cuda import gemm as _gemm  # noqa: E402


def _close(got, want, rtol=None) -> None:
    """Compare a CuPy result with a NumPy reference, relative to its magnitude."""
    assert isinstance(got, cp.ndarray), type(got)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    assert got.flags.c_contiguous
    host = cp.asnumpy(got)
    if rtol is None:
        rtol = 2e-4 if want.dtype == np.float32 else 1e-10
    scale = float(np.nanmax(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(host, want, rtol=rtol, atol=rtol * (scale + 1), equal_nan=True)


def _dev(*arrays):
    return tuple(None if a is None else cp.asarray(a) for a in arrays)


@pytest.fixture
def knobs(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(_gemm, "force_config", None)
    monkeypatch.setattr(_gemm, "force_splits", None)
    monkeypatch.setattr(_conv, "force_path", None)
    return monkeypatch


def test_available_and_device_info() -> None:
    assert cb.is_available()
    info = cb.device_info()
    assert info["cuda"] == "available", info
    assert info["gpu"] and info["cuda_driver"] and info["cupy"] != "not installed"


def test_rejects_numpy_arrays_on_gpu() -> None:
    with pytest.raises(TypeError, match="CuPy"):
        cb.relu(np.zeros(4, np.float32))


# ---- matmul ----------------------------------------------------------------


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype,shape", [
    (np.float32, (512, 384, 256)), (np.float32, (1000, 999, 37)), (np.float32, (7, 4099, 130)),
    (np.float64, (300, 257, 130)),
])
def test_matmul(rng, shape, dtype, ta, tb) -> None:
    m, n, k = shape
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    _close(cb.matmul(*_dev(a, b), ta, tb), ref.matmul(a, b, ta, tb))


@pytest.mark.parametrize("config", ["small", "medium", "large"])
@pytest.mark.parametrize("splits", [None, 3])
def test_matmul_every_config_and_split(knobs, rng, config, splits) -> None:
    knobs.setattr(_gemm, "force_config", config)
    knobs.setattr(_gemm, "force_splits", splits)
    a = rng.standard_normal((6, 300, 257)).astype(np.float32)
    b = rng.standard_normal((6, 190, 257)).astype(np.float32)
    _close(cb.matmul(*_dev(a, b), False, True), ref.matmul(a, b, False, True))


def test_matmul_large_batch_and_deep_k(rng) -> None:
    a = rng.standard_normal((70000, 3, 4)).astype(np.float32)  # grid.z chunking
    b = rng.standard_normal((70000, 4, 2)).astype(np.float32)
    _close(cb.matmul(*_dev(a, b)), ref.matmul(a, b))
    a = rng.standard_normal((16, 20000)).astype(np.float32)  # split-K
    b = rng.standard_normal((20000, 24)).astype(np.float32)
    _close(cb.matmul(*_dev(a, b)), ref.matmul(a, b), rtol=1e-3)


# ---- conv2d ----------------------------------------------------------------

# (N, C, H, W, O, K, stride, padding, dilation, groups)
_CONV = {
    "mnist-conv1": (128, 1, 28, 28, 32, 3, (1, 1), (0, 0), (1, 1), 1),
    "mnist-conv2": (128, 32, 13, 13, 64, 3, (1, 1), (1, 1), (1, 1), 1),
    "strided": (16, 16, 31, 29, 24, 5, (2, 3), (2, 1), (1, 2), 2),
    "depthwise": (8, 24, 20, 20, 24, 3, (1, 1), (1, 1), (1, 1), 24),
    "pointwise": (8, 64, 9, 9, 48, 1, (1, 1), (0, 0), (1, 1), 1),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(_CONV))
def test_conv2d_forward_and_backward(rng, name, dtype) -> None:
    n, c, h, w, o, k, s, p, d, g = _CONV[name]
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = (rng.standard_normal((o, c // g, k, k)) / np.sqrt(c // g * k * k)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    geo = (s, p, d, g)
    y = ref.conv2d(x, wt, b, *geo)
    _close(cb.conv2d(*_dev(x, wt, b), *geo), y)
    gy = rng.standard_normal(y.shape).astype(dtype)
    dgy, dwt, dx = _dev(gy, wt, x)
    _close(cb.conv2d_backward_input(dgy, dwt, (h, w), *geo),
           ref.conv2d_backward_input(gy, wt, (h, w), *geo))
    _close(cb.conv2d_backward_weight(dgy, dx, (k, k), *geo),
           ref.conv2d_backward_weight(gy, x, (k, k), *geo),
           rtol=1e-3 if dtype == np.float32 else None)


@pytest.mark.parametrize("path", ["direct", "im2col"])
def test_conv2d_both_paths_and_chunking(knobs, rng, path) -> None:
    knobs.setattr(_conv, "force_path", path)
    knobs.setattr(_conv, "IM2COL_BUDGET_BYTES", 1 << 20)  # several chunks
    x = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    wt = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    geo = ((1, 1), (1, 1), (1, 1), 1)
    y = ref.conv2d(x, wt, None, *geo)
    _close(cb.conv2d(*_dev(x, wt), None, *geo), y)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    _close(cb.conv2d_backward_weight(*_dev(gy, x), (3, 3), *geo),
           ref.conv2d_backward_weight(gy, x, (3, 3), *geo), rtol=1e-3)


# ---- pooling, activations, loss, optimizers ----------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pooling(rng, dtype) -> None:
    x = rng.integers(-3, 4, (32, 16, 27, 26)).astype(dtype)  # many ties
    x.flat[::997] = np.nan
    for k, s, p, d, ohw in [((2, 2), (2, 2), (0, 0), (1, 1), (13, 13)),
                            ((3, 3), (2, 2), (1, 1), (1, 1), (14, 13)),
                            ((3, 2), (1, 2), (1, 0), (2, 1), (25, 13))]:
        _close(cb.max_pool2d(cp.asarray(x), k, s, p, d, ohw), ref.max_pool2d(x, k, s, p, d, ohw))
        gy = rng.standard_normal(x.shape[:2] + ohw).astype(dtype)
        _close(cb.max_pool2d_backward(*_dev(gy, x), k, s, p, d),
               ref.max_pool2d_backward(gy, x, k, s, p, d))
    xf = rng.standard_normal(x.shape).astype(dtype)
    for k, s, p, ohw, cip, div in [((2, 2), (2, 2), (0, 0), (13, 13), True, None),
                                   ((3, 3), (2, 2), (1, 1), (14, 13), False, None),
                                   ((3, 3), (2, 2), (1, 1), (14, 13), True, 4)]:
        _close(cb.avg_pool2d(cp.asarray(xf), k, s, p, ohw, cip, div),
               ref.avg_pool2d(xf, k, s, p, ohw, cip, div))
        gy = rng.standard_normal(x.shape[:2] + ohw).astype(dtype)
        _close(cb.avg_pool2d_backward(cp.asarray(gy), (27, 26), k, s, p, cip, div),
               ref.avg_pool2d_backward(gy, (27, 26), k, s, p, cip, div))


@pytest.mark.parametrize("n,k", [(128, 10), (64, 1000), (3, 1)])
def test_relu_and_softmax_cross_entropy(rng, n, k) -> None:
    logits = (rng.standard_normal((n, k)) * 10).astype(np.float32)
    labels = rng.integers(0, k, n)
    loss, grad = cb.softmax_cross_entropy(*_dev(logits, labels))
    want_loss, want_grad = ref.softmax_cross_entropy(logits, labels)
    assert isinstance(loss, cp.ndarray) and loss.shape == ()
    _close(loss, want_loss)
    _close(grad, want_grad)
    _close(cb.relu(cp.asarray(logits)), ref.relu(logits))
    _close(cb.relu_backward(*_dev(want_grad, logits)), ref.relu_backward(want_grad, logits))


def test_optimizer_steps(rng) -> None:
    p = rng.standard_normal(1 << 20).astype(np.float32)
    g = rng.standard_normal(p.shape).astype(np.float32)
    buf = rng.standard_normal(p.shape).astype(np.float32)
    dp, dg, dbuf = _dev(p, g, buf)
    cb.sgd_step(dp, dg, dbuf, 0.05, 0.9, 1e-4, True)
    ref.sgd_step(p, g, buf, 0.05, 0.9, 1e-4, True)
    _close(dp, p)
    _close(dbuf, buf)
    m, v = np.zeros_like(p), np.zeros_like(p)
    dm, dv = _dev(m, v)
    for step in (1, 2):
        cb.adam_step(dp, dg, dm, dv, step, 1e-3, 0.9, 0.999, 1e-8, 0.01, True)
        ref.adam_step(p, g, m, v, step, 1e-3, 0.9, 0.999, 1e-8, 0.01, True)
    _close(dp, p)
    _close(dm, m)
    _close(dv, v)


# ---- streams and synchronization ------------------------------------------------------


def test_runs_on_cupys_current_stream(rng) -> None:
    a = rng.standard_normal((300, 200)).astype(np.float32)
    b = rng.standard_normal((200, 100)).astype(np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        da, db = _dev(a, b)
        c = cb.matmul(da, db)
        y = cb.relu(c)
    stream.synchronize()
    _close(y, ref.relu(ref.matmul(a, b)))


def _mnist_step(params, bufs, x, labels):
    """conv(1->32) -> relu -> maxpool 2 -> linear(5408->10) -> CE -> backward -> SGD."""
    w1, b1, fc = params
    geo = ((1, 1), (0, 0), (1, 1), 1)
    pool = ((2, 2), (2, 2), (0, 0), (1, 1))
    a = cb.relu(cb.conv2d(x, w1, b1, *geo))  # (N, 32, 26, 26)
    h = cb.max_pool2d(a, *pool, (13, 13))
    flat = h.reshape(x.shape[0], -1)
    logits = cb.matmul(flat, fc, False, True)
    loss, gl = cb.softmax_cross_entropy(logits, labels)
    gfc = cb.matmul(gl, flat, True, False)
    gh = cb.matmul(gl, fc).reshape(h.shape)
    ga = cb.relu_backward(cb.max_pool2d_backward(gh, a, *pool), a)
    gw1 = cb.conv2d_backward_weight(ga, x, (3, 3), *geo)
    gb1 = ga.sum(axis=(0, 2, 3))
    for p, g, buf in zip(params, (gw1, gb1, gfc), bufs):
        cb.sgd_step(p, g, buf, 0.05, 0.9, 0.0, False)
    return loss


def test_training_step_never_waits_for_the_gpu(rng) -> None:
    """Queue ~0.3 s of cuBLAS work, then a full training step: the host must
    finish enqueuing the step while that work is still running."""
    x = cp.asarray(rng.random((128, 1, 28, 28), dtype=np.float32))
    labels = cp.asarray(rng.integers(0, 10, 128))
    params = [cp.asarray(rng.standard_normal(s).astype(np.float32) * 0.1)
              for s in ((32, 1, 3, 3), (32,), (10, 32 * 13 * 13))]
    bufs = [cp.zeros_like(p) for p in params]
    first = float(_mnist_step(params, bufs, x, labels))  # compiles, warms the pool
    cp.cuda.Device().synchronize()

    big = cp.random.rand(8192, 8192, dtype=cp.float32)
    for _ in range(20):
        big = big @ big * cp.float32(1e-4)
    busy = cp.cuda.Event()
    busy.record()
    t0 = time.perf_counter()
    loss = _mnist_step(params, bufs, x, labels)
    host_s = time.perf_counter() - t0
    still_busy = not busy.done
    cp.cuda.Device().synchronize()
    assert still_busy, (
        f"the GPU finished the queued work before the step was enqueued ({host_s * 1e3:.1f} ms): "
        "something inside the training step synchronized with the device"
    )
    assert isinstance(loss, cp.ndarray) and np.isfinite(float(loss))
    assert float(loss) != first  # the parameters moved


def test_functional_dispatches_cupy_to_cuda(rng) -> None:
    from fastnn import functional as F

    x = rng.standard_normal((4, 3, 10, 10)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    y = F.max_pool2d(F.relu(F.conv2d(cp.asarray(x), cp.asarray(w), padding=1)), 2)
    want = ref.max_pool2d(ref.relu(ref.conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1)),
                          (2, 2), (2, 2), (0, 0), (1, 1), (5, 5))
    _close(y, want)
