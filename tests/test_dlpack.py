"""fastnn.functional on DLPack producers: no copies in, the caller's kind out."""

from __future__ import annotations

import numpy as np
import pytest

import fastnn.functional as F
from fastnn._array import from_dlpack, wrap_like

try:
    import torch
except ImportError:  # the NumPy-producer tests still run
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


class Producer:
    """A third-party DLPack producer over NumPy memory (no ``from_dlpack`` home)."""

    def __init__(self, a: np.ndarray, device: int = 1) -> None:
        self.a, self.device = a, device

    def __dlpack__(self, **kwargs):
        return self.a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return (self.device, 0)


@needs_torch
def test_torch_view_and_wrap_back_share_memory():
    t = torch.randn(3, 4)
    a = from_dlpack(t, "op", "x")
    assert isinstance(a, np.ndarray) and a.ctypes.data == t.data_ptr()
    back = wrap_like(a, t)
    assert isinstance(back, torch.Tensor) and back.data_ptr() == t.data_ptr()


@needs_torch
def test_round_trip_through_functional_shares_memory():
    # dropout in eval mode returns its input: torch -> NumPy view -> torch, one buffer.
    t = torch.randn(2, 3)
    y, mask = F.dropout_forward(t, 0.5, training=False)
    assert type(y) is torch.Tensor and y.data_ptr() == t.data_ptr() and mask is None


def test_numpy_producer_round_trip_shares_memory():
    a = np.arange(6, dtype=np.float32)
    v = from_dlpack(Producer(a), "op", "x")
    assert v.ctypes.data == a.ctypes.data
    out = F.relu(Producer(a.reshape(2, 3) - 2))
    assert type(out) is np.ndarray  # an unknown library: NumPy back
    np.testing.assert_array_equal(out, np.maximum(a.reshape(2, 3) - 2, 0))


def test_numpy_in_numpy_out():
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    assert type(F.max_pool2d(x, 2)) is np.ndarray


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_in_torch_out_equals_torch(dtype):
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 8, dtype=dtype, generator=g)
    w = torch.randn(4, 3, 3, 3, dtype=dtype, generator=g)
    b = torch.randn(4, dtype=dtype, generator=g)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    tf = torch.nn.functional
    y = F.conv2d(x, w, b, stride=2, padding=1)
    assert type(y) is torch.Tensor and y.dtype == dtype
    torch.testing.assert_close(y, tf.conv2d(x, w, b, stride=2, padding=1), **tol)
    y, idx = F.max_pool2d(x[:, :, ::2], 2, return_indices=True)  # a strided view
    want, want_idx = tf.max_pool2d(x[:, :, ::2], 2, return_indices=True)
    torch.testing.assert_close(y, want)
    assert torch.equal(idx, want_idx)
    gx, gw, gb = F.conv2d_backward(torch.ones(2, 4, 7, 6, dtype=dtype), x, w,
                                   output_mask=(False, True, True))
    assert gx is None and type(gw) is torch.Tensor and type(gb) is torch.Tensor
    a, m = x.reshape(2, -1)[:, :27], w.reshape(4, -1)
    torch.testing.assert_close(F.linear(a, m, b), tf.linear(a, m, b), **tol)


@needs_torch
def test_mixed_torch_and_numpy_arguments_give_torch():
    x = torch.randn(3, 5)
    w = np.random.default_rng(1).standard_normal((2, 5)).astype(np.float32)
    assert type(F.linear(x, w)) is torch.Tensor


@needs_torch
def test_in_place_optimizer_step_updates_the_torch_tensor():
    p, g = torch.ones(4), torch.full((4,), 2.0)
    F.sgd_step(p, g, None, lr=0.25)
    torch.testing.assert_close(p, torch.full((4,), 0.5))


@needs_torch
def test_requires_grad_is_refused_with_a_pointer_to_fastnn_torch():
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(TypeError, match=r"relu: x .*requires grad.*fastnn\.torch"):
        F.relu(x)
    assert type(F.relu(x.detach())) is torch.Tensor


def test_bad_producers_raise_named_errors():
    with pytest.raises(TypeError, match="max_pool2d: x must be float32 or float64"):
        F.max_pool2d(Producer(np.ones((1, 1, 4, 4), np.int64)), 2)
    with pytest.raises(TypeError, match="relu: x lives on DLPack device type 8"):
        F.relu(Producer(np.ones(3, np.float32), device=8))


@pytest.mark.gpu
@needs_torch
def test_cuda_producers_share_memory_and_keep_their_kind():
    import cupy

    t = torch.randn(2, 3, 8, 8, device="cuda")
    a = from_dlpack(t, "op", "x")
    assert isinstance(a, cupy.ndarray) and a.data.ptr == t.data_ptr()
    assert wrap_like(a, t).data_ptr() == t.data_ptr()
    y = F.max_pool2d(t, 2)
    assert type(y) is torch.Tensor and y.device.type == "cuda"
    torch.testing.assert_close(y, torch.nn.functional.max_pool2d(t, 2))
    c = cupy.asarray(t.cpu().numpy())
    assert isinstance(F.max_pool2d(c, 2), cupy.ndarray)
