"""Every validation rule of fastnn.functional raises a clear, named error."""

from __future__ import annotations

import numpy as np
import pytest

import fastnn
import fastnn.functional as F

X = np.zeros((2, 4, 8, 8), np.float32)
W = np.zeros((6, 4, 3, 3), np.float32)


def raises(exc, match):
    return pytest.raises(exc, match=match)


@pytest.fixture(params=["numpy", "default"])
def mode(request):
    if request.param == "numpy":
        with fastnn.backend("numpy"):
            yield request.param
    else:
        yield request.param


def test_wrong_ndim(mode):
    with raises(ValueError, "x must be 4-D"):
        F.conv2d(np.zeros((4, 8), np.float32), W)
    with raises(ValueError, "weight must be 4-D"):
        F.conv2d(X, np.zeros((3, 3), np.float32))
    with raises(ValueError, "x must be 4-D"):
        F.max_pool2d(np.zeros((8,), np.float32), 2)
    with raises(ValueError, "a must be 2-D or 3-D"):
        F.matmul(np.zeros(3), np.zeros((3, 2)))
    with raises(ValueError, "weight must be 2-D"):
        F.linear(np.zeros((2, 3)), np.zeros(3))
    with raises(ValueError, "logits must be 2-D"):
        F.softmax_cross_entropy(np.zeros(3), np.zeros(3, np.int64))


def test_channels_and_groups(mode):
    with raises(ValueError, "x has 4 channels but weight expects 3"):
        F.conv2d(X, np.zeros((6, 3, 3, 3), np.float32))
    with raises(ValueError, "not divisible by groups=3"):
        F.conv2d(X, W, groups=3)
    with raises(ValueError, "out-channels 6 not divisible by groups=4"):
        F.conv2d(X, np.zeros((6, 1, 3, 3), np.float32), groups=4)
    with raises(ValueError, "groups must be positive"):
        F.conv2d(X, W, groups=0)
    with raises(ValueError, "inner dimensions differ"):
        F.matmul(np.zeros((2, 3)), np.zeros((4, 2)))
    with raises(ValueError, "batch sizes differ"):
        F.matmul(np.zeros((2, 2, 3)), np.zeros((3, 3, 2)))
    with raises(ValueError, "in_features=5"):
        F.linear(np.zeros((2, 3)), np.zeros((4, 5)))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float16, np.complex64, bool])
def test_non_float_dtype(mode, dtype):
    with raises(TypeError, "x must be float32 or float64"):
        F.conv2d(X.astype(dtype), W)
    with raises(TypeError, "x must be float32 or float64"):
        F.max_pool2d(X.astype(dtype), 2)
    with raises(TypeError, "a must be float32 or float64"):
        F.matmul(np.zeros((2, 2), dtype), np.zeros((2, 2)))


def test_mixed_dtypes_and_types(mode):
    with raises(TypeError, "weight has dtype float64 but x has dtype float32"):
        F.conv2d(X, W.astype(np.float64))
    with raises(TypeError, "bias has dtype float64"):
        F.conv2d(X, W, np.zeros(6))
    with raises(TypeError, "x must be a NumPy or CuPy array, got str"):
        F.conv2d("abc", W)
    with raises(TypeError, "labels must be integers"):
        F.softmax_cross_entropy(np.zeros((2, 3)), np.zeros(2))


def test_kernel_larger_than_padded_input(mode):
    with raises(ValueError, "larger than the padded input 2x2"):
        F.conv2d(np.zeros((1, 4, 2, 2), np.float32), W)
    F.conv2d(np.zeros((1, 4, 1, 1), np.float32), W, padding=1)  # 3x3 fits exactly
    with raises(ValueError, "kernel size 5x5 \\(after dilation\\)"):
        F.conv2d(np.zeros((1, 4, 4, 4), np.float32), W, dilation=2)
    with raises(ValueError, "larger than the padded input"):
        F.max_pool2d(np.zeros((1, 1, 2, 2), np.float32), 3)
    with raises(ValueError, "larger than the padded input"):
        F.avg_pool2d(np.zeros((1, 1, 2, 5), np.float32), 3)


@pytest.mark.parametrize("arg", ["stride", "dilation"])
@pytest.mark.parametrize("bad", [0, -1, (1, 0), (-2, 1)])
def test_non_positive_stride_or_dilation(mode, arg, bad):
    with raises(ValueError, f"{arg} must be positive"):
        F.conv2d(X, W, **{arg: bad})
    with raises(ValueError, f"{arg} must be positive"):
        F.max_pool2d(X, 2, **{arg: bad})


def test_absurd_geometry_is_rejected(mode):
    with raises(ValueError, r"stride must be < 2\*\*31"):
        F.conv2d(X, W, stride=2**62)
    with raises(ValueError, r"padding must be < 2\*\*31"):
        F.max_pool2d(X, 2, padding=(0, 2**31))


def test_negative_padding(mode):
    with raises(ValueError, "padding must be non-negative"):
        F.conv2d(X, W, padding=-1)
    with raises(ValueError, "padding must be non-negative"):
        F.avg_pool2d(X, 2, padding=(0, -1))
    with raises(ValueError, "padding must be 'same', 'valid'"):
        F.conv2d(X, W, padding="full")
    with raises(ValueError, "padding='same' requires stride=1"):
        F.conv2d(X, W, padding="same", stride=2)


def test_bad_int_arguments(mode):
    with raises(TypeError, "stride must be an int"):
        F.conv2d(X, W, stride=1.5)
    with raises(TypeError, "stride must be an int"):
        F.conv2d(X, W, stride=True)
    with raises(ValueError, "kernel_size must be an int or a pair"):
        F.max_pool2d(X, (2, 2, 2))
    with raises(TypeError, "ceil_mode must be a bool"):
        F.max_pool2d(X, 2, ceil_mode="yes")
    with raises(ValueError, "divisor_override must be non-zero"):
        F.avg_pool2d(X, 2, divisor_override=0)


def test_pool_padding_over_half_kernel(mode):
    with raises(ValueError, "at most half of kernel_size"):
        F.max_pool2d(X, 2, padding=2)
    with raises(ValueError, "at most half of kernel_size"):
        F.avg_pool2d(X, (3, 2), padding=(1, 2))
    F.max_pool2d(X, 3, padding=1)  # exactly half is allowed


def test_grad_out_shape_mismatch(mode):
    with raises(ValueError, r"grad_out must have the forward output's shape \(2, 6, 6, 6\)"):
        F.conv2d_backward(np.zeros((2, 6, 5, 6), np.float32), X, W)
    with raises(ValueError, r"grad_out must have the forward output's shape \(2, 4, 4, 4\)"):
        F.max_pool2d_backward(np.zeros((2, 4, 3, 4), np.float32), X, 2)
    with raises(ValueError, "grad_out must have the forward output's shape"):
        F.avg_pool2d_backward(np.zeros((2, 4, 4), np.float32), X, 2)
    with raises(ValueError, "grad_out must have the forward output's shape"):
        F.matmul_backward(np.zeros((2, 2)), np.zeros((2, 3)), np.zeros((3, 4)))
    with raises(ValueError, "grad_out must have the forward output's shape"):
        F.linear_backward(np.zeros((2, 5)), np.zeros((2, 3)), np.zeros((4, 3)))
    with raises(TypeError, "grad_out has dtype float64"):
        F.conv2d_backward(np.zeros((2, 6, 6, 6)), X, W)


def test_bias_shape(mode):
    with raises(ValueError, r"bias must have shape \(6,\)"):
        F.conv2d(X, W, np.zeros(5, np.float32))
    with raises(ValueError, r"bias must have shape \(6,\)"):
        F.conv2d(X, W, np.zeros((6, 1), np.float32))
    with raises(ValueError, r"bias must have shape \(4,\)"):
        F.linear(np.zeros((2, 3)), np.zeros((4, 3)), np.zeros(3))


def test_labels_and_optimizer_arguments(mode):
    with raises(ValueError, r"labels must lie in \[0, 3\)"):
        F.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with raises(ValueError, r"labels must have shape \(2,\)"):
        F.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 1, 2]))
    p = np.zeros(4, np.float32)
    with raises(ValueError, r"grad must have the shape of param \(4,\), got \(3,\)"):
        F.sgd_step(p, np.zeros(3, np.float32), None, 0.1)
    with raises(TypeError, "grad has dtype float64 but param has dtype float32"):
        F.sgd_step(p, np.zeros(4), None, 0.1)
    with raises(ValueError, "momentum_buf is required"):
        F.sgd_step(p, np.zeros(4, np.float32), None, 0.1, momentum=0.9)
    with raises(ValueError, "lr must be a finite number"):
        F.sgd_step(p, np.zeros(4, np.float32), None, float("nan"))
    with raises(ValueError, "step must be >= 1"):
        F.adam_step(p, p.copy(), p.copy(), p.copy(), 0, 1e-3)
    with raises(ValueError, "param must be C-contiguous"):
        F.sgd_step(np.zeros(8, np.float32)[::2], np.zeros(4, np.float32), None, 0.1)


def test_unknown_backend():
    with raises(ValueError, "backend must be one of"):
        with fastnn.backend("tpu"):
            pass


def test_python_lists_are_accepted(mode):
    y = F.matmul([[1.0, 2.0]], [[3.0], [4.0]])
    assert y.dtype == np.float64 and y.tolist() == [[11.0]]
    y = F.relu([[-1, 2]])
    assert y.dtype == np.float32 and y.tolist() == [[0.0, 2.0]]
