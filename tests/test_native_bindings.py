"""fastnn._C directly: its own argument checks, output ownership, and results.

The bindings must reject (never convert) bad arrays with an error that names
the function and the argument, must return fresh C-contiguous arrays of the
input dtype, and every kernel must agree with fastnn.backends.numpy_ref on odd
shapes that exercise each code path (small-K direct conv, im2col + gemm, 1x1,
groups, stride/padding/dilation, the 2x2 pooling fast paths, vector tails).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastnn.backends import numpy_ref as R

_C = pytest.importorskip("fastnn._C", reason="fastnn._C is not built (run tools/dev_build.sh)")

DTYPES = [np.float32, np.float64]
HYP = settings(max_examples=25, deadline=None)


def close(got: np.ndarray, want: np.ndarray, dtype) -> None:
    """Same dtype and shape, values equal up to rounding of sums of many terms.

    The absolute tolerance scales with the largest reference magnitude, since
    a long float32 sum with large terms carries error relative to those terms.
    """
    assert got.dtype == want.dtype == np.dtype(dtype)
    assert got.shape == want.shape
    eps = 2e-5 if dtype == np.float32 else 1e-12
    finite = want[np.isfinite(want)]
    scale = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    np.testing.assert_allclose(got, want, rtol=eps, atol=eps * scale, equal_nan=True)


def randn(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def conv_args(rng, dtype, n=2, c=3, h=9, w=8, o=4, k=(3, 3), groups=1):
    x = randn(rng, (n, c, h, w), dtype)
    weight = randn(rng, (o, c // groups) + k, dtype)
    bias = randn(rng, (o,), dtype)
    return x, weight, bias


ONE = (1, 1)
ZERO = (0, 0)


# --------------------------------------------------------------------------- #
# Argument checks: every error names the function and the argument
# --------------------------------------------------------------------------- #


def test_conv2d_rejects_wrong_ndim_naming_weight(rng):
    x, w, b = conv_args(rng, np.float32)
    with pytest.raises(ValueError, match=r"conv2d: weight must be 4-D .*got shape \(3, 3\)"):
        _C.conv2d(x, np.zeros((3, 3), np.float32), b, ONE, ZERO, ONE, 1)
    with pytest.raises(ValueError, match=r"conv2d: x must be 4-D"):
        _C.conv2d(x[0], w, b, ONE, ZERO, ONE, 1)
    with pytest.raises(ValueError, match=r"conv2d: bias must be 1-D"):
        _C.conv2d(x, w, b[None], ONE, ZERO, ONE, 1)


@pytest.mark.parametrize("bad", [np.int32, np.float16, np.complex64])
def test_rejects_non_float_dtype(rng, bad):
    x, w, b = conv_args(rng, np.float32)
    with pytest.raises(TypeError, match=r"conv2d: x must be float32 or float64"):
        _C.conv2d(x.astype(bad), w, b, ONE, ZERO, ONE, 1)
    with pytest.raises(TypeError, match=r"relu: x must be float32 or float64"):
        _C.relu(x.astype(bad))


def test_rejects_mixed_dtypes_naming_both(rng):
    x, w, b = conv_args(rng, np.float32)
    with pytest.raises(TypeError, match=r"conv2d: weight has dtype float64 but x has dtype f"):
        _C.conv2d(x, w.astype(np.float64), b, ONE, ZERO, ONE, 1)
    with pytest.raises(TypeError, match=r"conv2d: bias has dtype float64"):
        _C.conv2d(x, w, b.astype(np.float64), ONE, ZERO, ONE, 1)
    with pytest.raises(TypeError, match=r"matmul: b has dtype float64"):
        _C.matmul(np.ones((2, 2), np.float32), np.ones((2, 2)))


def test_rejects_byte_swapped_floats(rng):
    x = randn(rng, (2, 3), np.float32).astype(">f4")
    with pytest.raises(TypeError, match=r"relu: x must be float32 or float64"):
        _C.relu(x)


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[:, :, :, ::2],
        lambda a: np.asfortranarray(a),
        lambda a: a.transpose(0, 1, 3, 2),
    ],
    ids=["strided", "fortran", "transposed"],
)
def test_rejects_non_contiguous_without_copying(rng, make):
    x, w, b = conv_args(rng, np.float64, h=8, w=8)
    bad = make(x)
    assert not bad.flags.c_contiguous
    with pytest.raises(ValueError, match=r"conv2d: x must be C-contiguous"):
        _C.conv2d(bad, w, b, ONE, ZERO, ONE, 1)
    with pytest.raises(ValueError, match=r"max_pool2d: x must be C-contiguous"):
        _C.max_pool2d(bad, (2, 2), (2, 2), ZERO, ONE, (4, 4))


def test_rejects_non_arrays():
    with pytest.raises(TypeError, match=r"relu: x must be a numpy.ndarray, got list"):
        _C.relu([1.0, -1.0])
    with pytest.raises(TypeError, match=r"matmul: a must be a numpy.ndarray"):
        _C.matmul(1.0, np.ones((1, 1)))


def test_conv_geometry_errors(rng):
    x, w, b = conv_args(rng, np.float32, c=4, o=6)
    with pytest.raises(ValueError, match=r"conv2d: stride must be >= 1"):
        _C.conv2d(x, w, b, (0, 1), ZERO, ONE, 1)
    with pytest.raises(ValueError, match=r"conv2d: padding must be >= 0"):
        _C.conv2d(x, w, b, ONE, (-1, 0), ONE, 1)
    with pytest.raises(ValueError, match=r"conv2d: dilation must be >= 1"):
        _C.conv2d(x, w, b, ONE, ZERO, (1, 0), 1)
    with pytest.raises(ValueError, match=r"conv2d: groups=4 must divide"):
        _C.conv2d(x, randn(rng, (6, 1, 3, 3), np.float32), b, ONE, ZERO, ONE, 4)
    with pytest.raises(ValueError, match=r"conv2d: weight must have C/groups = 2"):
        _C.conv2d(x, w, b, ONE, ZERO, ONE, 2)
    with pytest.raises(ValueError, match=r"conv2d: bias must have shape \(6,\)"):
        _C.conv2d(x, w, b[:5].copy(), ONE, ZERO, ONE, 1)
    with pytest.raises(ValueError, match=r"smaller than the dilated kernel"):
        _C.conv2d(x, w, b, ONE, ZERO, (5, 1), 1)
    gy = randn(rng, (2, 6, 7, 6), np.float32)
    with pytest.raises(ValueError, match=r"conv2d_backward_input: grad_out must have spatial"):
        _C.conv2d_backward_input(gy, w, (9, 9), ONE, ZERO, ONE, 1)
    with pytest.raises(ValueError, match=r"conv2d_backward_weight: grad_out has batch 2 but x"):
        _C.conv2d_backward_weight(gy, x[:1].copy(), (3, 3), ONE, ZERO, ONE, 1)
    with pytest.raises(ValueError, match=r"conv2d_backward_input: grad_out has 6 channels"):
        _C.conv2d_backward_input(gy, w[:5].copy(), (9, 8), ONE, ZERO, ONE, 1)


def test_pool_geometry_errors(rng):
    x = randn(rng, (1, 2, 7, 7), np.float32)
    with pytest.raises(ValueError, match=r"max_pool2d: out_hw \(9, 3\) does not fit"):
        _C.max_pool2d(x, (2, 2), (2, 2), ZERO, ONE, (9, 3))
    with pytest.raises(ValueError, match=r"max_pool2d: kernel_size must be >= 1"):
        _C.max_pool2d(x, (0, 2), (2, 2), ZERO, ONE, (3, 3))
    # Policy (padding at most half the kernel, ...) is fastnn.geometry's; the
    # bindings check only what memory safety needs.
    with pytest.raises(ValueError, match=r"avg_pool2d: padding must be >= 0"):
        _C.avg_pool2d(x, (2, 2), (2, 2), (-1, 0), (3, 3), True, None)
    with pytest.raises(ValueError, match=r"avg_pool2d: divisor_override must be non-zero"):
        _C.avg_pool2d(x, (2, 2), (2, 2), ZERO, (3, 3), True, 0)
    gy = randn(rng, (1, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"max_pool2d_backward: grad_out must have batch"):
        _C.max_pool2d_backward(gy, x, (2, 2), (2, 2), ZERO, ONE)


def test_matmul_shape_errors():
    a = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"matmul: inner dimensions differ"):
        _C.matmul(a, np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"matmul: a and b must both be 2-D"):
        _C.matmul(a, np.ones((1, 3, 2), np.float32))
    with pytest.raises(ValueError, match=r"matmul: batch sizes differ"):
        _C.matmul(np.ones((2, 2, 3), np.float32), np.ones((3, 3, 2), np.float32))


def test_softmax_cross_entropy_label_checks(rng):
    z = randn(rng, (3, 4), np.float32)
    with pytest.raises(TypeError, match=r"softmax_cross_entropy: labels must be int64, got int32"):
        _C.softmax_cross_entropy(z, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\), got 4 at index 1"):
        _C.softmax_cross_entropy(z, np.array([0, 4, 1], np.int64))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        _C.softmax_cross_entropy(z, np.zeros(2, np.int64))


def test_in_place_ops_check_writeable_and_overlap(rng):
    p = randn(rng, (5, 4), np.float32)
    g = randn(rng, (5, 4), np.float32)
    ro = p.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"sgd_step: param must be writeable"):
        _C.sgd_step(ro, g, None, 0.1, 0.0, 0.0, False)
    with pytest.raises(ValueError, match=r"sgd_step: param and grad must not share memory"):
        _C.sgd_step(p, p, None, 0.1, 0.0, 0.0, False)
    with pytest.raises(ValueError, match=r"sgd_step: momentum_buf must be an array"):
        _C.sgd_step(p, g, None, 0.1, 0.9, 0.0, False)
    with pytest.raises(ValueError, match=r"sgd_step: grad must have the shape of param"):
        _C.sgd_step(p, g[:4].copy(), None, 0.1, 0.0, 0.0, False)
    m, v = np.zeros_like(p), np.zeros_like(p)
    with pytest.raises(ValueError, match=r"adam_step: exp_avg and exp_avg_sq must not share"):
        _C.adam_step(p, g, m, m, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    with pytest.raises(ValueError, match=r"adam_step: step must be >= 1"):
        _C.adam_step(p, g, m, v, 0, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    with pytest.raises(TypeError, match=r"adam_step: exp_avg has dtype float64"):
        _C.adam_step(p, g, m.astype(np.float64), v, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)


# --------------------------------------------------------------------------- #
# Outputs: fresh, C-contiguous, same dtype (never aliased or downcast)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_are_fresh_arrays_of_the_input_dtype(rng, dtype):
    x, w, b = conv_args(rng, dtype)
    y = _C.conv2d(x, w, b, ONE, ONE, ONE, 1)
    gy = randn(rng, y.shape, dtype)
    outs = {
        "conv2d": (y, [x, w, b]),
        "conv_bi": (_C.conv2d_backward_input(gy, w, (9, 8), ONE, ONE, ONE, 1), [gy, w]),
        "conv_bw": (_C.conv2d_backward_weight(gy, x, (3, 3), ONE, ONE, ONE, 1), [gy, x]),
        "relu": (_C.relu(x), [x]),
        "relu_b": (_C.relu_backward(x, x), [x]),
        "max": (_C.max_pool2d(x, (2, 2), (2, 2), ZERO, ONE, (4, 4)), [x]),
        "avg": (_C.avg_pool2d(x, (1, 1), (1, 1), ZERO, (9, 8), True, None), [x]),
        "matmul": (_C.matmul(x[0, 0], x[0, 0], False, True), [x]),
    }
    loss, grad = _C.softmax_cross_entropy(x[0, 0], np.zeros(9, np.int64))
    outs["sce"] = (grad, [x])
    assert loss.shape == () and loss.dtype == dtype
    for name, (out, inputs) in outs.items():
        assert out.dtype == dtype, name
        assert out.flags.c_contiguous and out.flags.owndata and out.flags.writeable, name
        for a in inputs:
            assert not np.shares_memory(out, a), name


def test_inputs_are_not_modified(rng):
    x, w, b = conv_args(rng, np.float32)
    saved = [a.copy() for a in (x, w, b)]
    y = _C.conv2d(x, w, b, ONE, ONE, ONE, 1)
    _C.conv2d_backward_input(y, w, (9, 8), ONE, ONE, ONE, 1)
    _C.conv2d_backward_weight(y, x, (3, 3), ONE, ONE, ONE, 1)
    _C.max_pool2d_backward(np.ones((2, 3, 4, 4), np.float32), x, (2, 2), (2, 2), ZERO, ONE)
    for a, s in zip((x, w, b), saved):
        np.testing.assert_array_equal(a, s)


# --------------------------------------------------------------------------- #
# conv2d against the reference
# --------------------------------------------------------------------------- #

CONV_CASES = [
    # n, c, h, w, o, (kh, kw), stride, padding, dilation, groups
    (3, 1, 28, 28, 32, (3, 3), ONE, ZERO, ONE, 1),  # MNIST layer 1: small-K direct
    (2, 5, 13, 13, 7, (3, 3), ONE, ONE, ONE, 1),  # deeper layer: im2col + gemm
    (2, 4, 9, 11, 6, (3, 2), (2, 1), (1, 0), (1, 2), 2),  # groups, stride, dilation
    (2, 6, 7, 5, 4, (1, 1), ONE, ZERO, ONE, 1),  # 1x1: x is its own im2col
    (1, 6, 7, 5, 6, (1, 1), (2, 2), ONE, ONE, 3),  # 1x1 strided and padded
    (2, 6, 6, 6, 6, (3, 3), ONE, ONE, ONE, 6),  # depthwise
    (1, 2, 5, 37, 3, (2, 2), (1, 3), (1, 1), (2, 1), 1),  # wide, stride 3
    (2, 3, 11, 40, 4, (3, 3), (2, 2), ONE, ONE, 1),  # stride 2: even/odd split rows
    (2, 3, 4, 4, 2, (4, 4), ONE, ZERO, ONE, 1),  # 1x1 output
    (1, 2, 3, 3, 5, (5, 5), ONE, (2, 2), ONE, 1),  # kernel larger than the input
    # Winograd F(2x2, 3x3): stride 1, undilated 3x3, >= 8 channels in and out.
    (2, 9, 13, 13, 10, (3, 3), ONE, ONE, ONE, 1),  # MNIST layer 2 (odd output)
    (3, 16, 7, 10, 16, (3, 3), ONE, (2, 0), ONE, 2),  # groups, asymmetric padding
    (1, 8, 5, 4, 8, (3, 3), ONE, ZERO, ONE, 1),  # 3x2 output: partial tiles
    (1, 8, 6, 6, 8, (3, 3), ONE, (3, 3), ONE, 1),  # padding 3: im2col backward-input
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_conv2d_matches_reference(rng, dtype, case):
    n, c, h, w, o, k, s, p, d, g = case
    x, weight, bias = conv_args(rng, dtype, n, c, h, w, o, k, g)
    y = _C.conv2d(x, weight, bias, s, p, d, g)
    close(y, R.conv2d(x, weight, bias, s, p, d, g), dtype)
    close(_C.conv2d(x, weight, None, s, p, d, g), R.conv2d(x, weight, None, s, p, d, g), dtype)
    gy = randn(rng, y.shape, dtype)
    close(
        _C.conv2d_backward_input(gy, weight, (h, w), s, p, d, g),
        R.conv2d_backward_input(gy, weight, (h, w), s, p, d, g),
        dtype,
    )
    close(
        _C.conv2d_backward_weight(gy, x, k, s, p, d, g),
        R.conv2d_backward_weight(gy, x, k, s, p, d, g),
        dtype,
    )


# Winograd F(4x4, 3x3) (AVX-512 float32; other builds and float64 run F(2x2)):
# chosen for output rows 13..16 wide (csrc/kernels/winograd_f4.h) or 17..28
# wide (winograd_f4_rows.h) when its padded product count is at most 4/5 of
# F(2x2)'s (their `preferred`). Cases sit on both sides of each rule; all must
# match the reference either way.
WINO4_CASES = [
    # n, c, h, w, o, padding, groups
    (3, 32, 13, 13, 64, ONE, 1),  # the 32 -> 64 13x13 layer
    (2, 8, 13, 12, 8, ONE, 1),  # OW 12: F(4x4) by tile rows, narrow (3 tile columns)
    (2, 8, 13, 16, 8, ONE, 1),  # OW 16: F(4x4), last tile column full
    (2, 8, 13, 17, 8, ONE, 1),  # OW 17: F(4x4) by tile rows, 5 tile columns
    (2, 8, 4, 13, 8, ONE, 1),  # OH 4: one tile row, F(2x2) by cost
    (2, 8, 17, 13, 8, ONE, 1),  # OH 17: 5 tile rows, F(2x2) by cost
    (2, 9, 25, 14, 10, ONE, 1),  # OH 25: F(4x4), second vector 3/4 full
    (1, 8, 29, 13, 8, ONE, 1),  # OH 29: two full vectors of tile rows
    (2, 10, 15, 15, 13, ZERO, 1),  # padding 0 (backward-input: F(4x4) padding 2)
    (2, 12, 13, 13, 9, (2, 2), 1),  # padding 2 (backward-input: F(4x4) padding 0)
    (2, 12, 11, 11, 9, (2, 2), 1),  # forward F(4x4), backward-input (11 wide) F(2x2)
    (2, 8, 15, 13, 8, (0, 1), 1),  # asymmetric padding
    (1, 16, 14, 14, 16, ONE, 2),  # groups, batch 1
    (2, 17, 13, 13, 25, ONE, 1),  # channels past whole vectors / register tiles
    # F(2x2) products kernel (float64 here): tiles padded to whole vectors,
    # channels to panels.
    (5, 32, 12, 12, 64, ZERO, 1),  # strong 32 -> 64: 3-image blocks of 75 tiles, then 2
    (2, 16, 26, 26, 12, ZERO, 1),  # 24x24 output: 144 tiles (whole vectors), 12 outputs
    # F(4x4) by tile rows: two tile rows per vector, 4-image blocks at 24x24.
    (5, 32, 26, 26, 32, ZERO, 1),  # strong 32 -> 32: forward 24 wide, backward-input 26
    (1, 8, 28, 28, 9, ONE, 1),  # OW 28: 7 tile columns, window columns -1 .. 30
    (2, 8, 30, 30, 8, ZERO, 1),  # forward 28 wide; backward-input 30 wide: F(2x2)
    (2, 9, 19, 21, 10, (2, 2), 1),  # odd sizes, partial tiles both ways, padding 2
    (2, 9, 18, 17, 11, (0, 1), 1),  # asymmetric padding, OH 16 (2 tile-row pairs)
    (3, 8, 3, 24, 8, ONE, 1),  # one tile row: a pair without its second row
    (2, 8, 22, 20, 8, ZERO, 1),  # 20x18 output: 5 tile rows, the last pair single
    (1, 16, 22, 22, 16, ONE, 2),  # groups, batch 1
    # Narrow planes: a slot vector spans up to 8 tile rows and image boundaries.
    (17, 8, 8, 8, 8, ZERO, 1),  # 6x6 output: 2x2 tiles per image, 17 images
    (3, 9, 11, 9, 10, ONE, 1),  # 11x9 output: 3x3 tiles, vectors start mid-row
    (2, 8, 5, 12, 8, (1, 0), 1),  # 5x10 output: 2 tile rows, the second partial
    (5, 64, 10, 10, 64, ZERO, 1),  # strong 64 -> 64: backward-input as the adjoint
    # Backward-input as the adjoint of the forward (its output plane has fewer
    # tiles than gx's): 6x6 input tiles overlap by 2 and add up in gx.
    (3, 8, 7, 9, 9, ZERO, 1),  # 5x7 output: partial tiles both ways
    (2, 8, 14, 14, 8, ZERO, 1),  # 12x12 output, 3 tile columns: rows split across vectors
    (17, 8, 10, 10, 9, ZERO, 1),  # 8x8 output, 17 images
    (2, 12, 9, 13, 8, (1, 0), 1),  # asymmetric padding: 9x11 output
    (1, 8, 6, 7, 8, ZERO, 1),  # one tile row per image: no row carried
    (2, 17, 10, 10, 25, ZERO, 1),  # input channels past whole panels
    (1, 16, 10, 10, 16, ZERO, 2),  # groups, batch 1
    (3, 9, 26, 26, 10, ZERO, 1),  # 24x24 output, two tile rows per vector
    (2, 8, 19, 21, 9, ZERO, 1),  # 17x19 output: 5 tile columns, partial tiles
    (2, 8, 7, 30, 8, ZERO, 1),  # 5x28 output: 7 tile columns, the last pair single
    (2, 9, 22, 20, 11, ZERO, 1),  # 20x18 output: 5 tile rows
    # Narrow adjoint, 3 tile columns: a vector that starts mid-row, on a tile
    # row followed by another of the same image (rows 4 and 5 of the part the
    # previous vector stored are added, not overwritten: wrong gx before the
    # fix at all of these).
    (3, 36, 26, 11, 12, ZERO, 1),  # 24x9 output: 6 tile rows per image
    (16, 16, 13, 13, 8, ZERO, 1),  # 11x11 output, 16 images
    (9, 18, 21, 13, 29, ZERO, 1),  # 19x11 output
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WINO4_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_conv2d_winograd_tiles(rng, dtype, case):
    n, c, h, w, o, p, g = case
    x, weight, bias = conv_args(rng, dtype, n, c, h, w, o, (3, 3), g)
    y = _C.conv2d(x, weight, bias, ONE, p, ONE, g)
    close(y, R.conv2d(x, weight, bias, ONE, p, ONE, g), dtype)
    gy = randn(rng, y.shape, dtype)
    close(_C.conv2d_backward_input(gy, weight, (h, w), ONE, p, ONE, g),
          R.conv2d_backward_input(gy, weight, (h, w), ONE, p, ONE, g), dtype)
    close(_C.conv2d_backward_weight(gy, x, (3, 3), ONE, p, ONE, g),
          R.conv2d_backward_weight(gy, x, (3, 3), ONE, p, ONE, g), dtype)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 24), groups=st.sampled_from([1, 1, 2]), cg=st.integers(4, 24),
       og=st.integers(4, 24), h=st.integers(3, 30), w=st.integers(3, 30),
       ph=st.integers(0, 2), pw=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_conv2d_3x3_winograd_sized_random_shapes(n, groups, cg, og, h, w, ph, pw, seed):
    """Every pass of a 3x3 stride-1 conv with channel counts that take the
    Winograd paths (the cases above pick their branches; these shapes land
    anywhere), float32 against a float64 reference. Fan-in scaled weights keep
    the outputs O(1), so a misplaced tile shows far above rounding."""
    if h + 2 * ph < 3 or w + 2 * pw < 3:
        return
    rng = np.random.default_rng(seed)
    c, o, p = cg * groups, og * groups, (ph, pw)
    x = randn(rng, (n, c, h, w), np.float32)
    wt = (randn(rng, (o, cg, 3, 3), np.float64) / np.sqrt(9 * cg)).astype(np.float32)
    gy = randn(rng, (n, o, h + 2 * ph - 2, w + 2 * pw - 2), np.float32)
    x64, w64, gy64 = (a.astype(np.float64) for a in (x, wt, gy))
    pairs = [
        (_C.conv2d(x, wt, None, ONE, p, ONE, groups), R.conv2d(x64, w64, None, ONE, p, ONE,
                                                              groups)),
        (_C.conv2d_backward_input(gy, wt, (h, w), ONE, p, ONE, groups),
         R.conv2d_backward_input(gy64, w64, (h, w), ONE, p, ONE, groups)),
        (_C.conv2d_backward_weight(gy, x, (3, 3), ONE, p, ONE, groups),
         R.conv2d_backward_weight(gy64, x64, (3, 3), ONE, p, ONE, groups)),
    ]
    for got, want in pairs:
        err = np.abs(got - want).max() / max(1.0, float(np.abs(want).max()))
        assert err < 1e-4, (got.shape, err)


@pytest.mark.parametrize("case", WINO4_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_conv2d_winograd_backward_input_writes_every_element(rng, case):
    # The adjoint path stores each gx row once instead of clearing gx first:
    # give it a NaN-filled buffer (the one just freed, which the allocator
    # hands back: glibc's heap, or fastnn's pool from 256 KiB, so junk is a
    # kernel output like gx) so an element it misses shows up.
    n, c, h, w, o, p, g = case
    x, weight, _ = conv_args(rng, np.float32, n, c, h, w, o, (3, 3), g)
    gy = randn(rng, R.conv2d(x, weight, None, ONE, p, ONE, g).shape, np.float32)
    zeros = np.zeros((n, c, h, w), np.float32)
    for _ in range(3):
        junk = _C.relu(zeros)
        junk.fill(np.nan)
        addr = junk.ctypes.data
        del junk
        gx = _C.conv2d_backward_input(gy, weight, (h, w), ONE, p, ONE, g)
        if gx.ctypes.data == addr:
            break
    else:
        pytest.skip("the allocator did not hand the NaN-filled buffer back")
    close(gx, R.conv2d_backward_input(gy, weight, (h, w), ONE, p, ONE, g), np.float32)


@pytest.mark.parametrize(("c", "o", "hw", "p"),
                         [(32, 64, 13, ONE), (32, 32, 26, ZERO), (64, 64, 10, ZERO)],
                         ids=["13x13", "26x26-rows", "10x10-narrow-rows"])
def test_conv2d_winograd_f4_error_vs_float64(rng, c, o, hw, p):
    # F(4x4) rounds more than F(2x2) (measured max |err| / max |y| on the
    # 13x13 layer: ~1.3e-6 forward, ~2.6e-6 backward-input, ~1.7e-6
    # backward-weight, against a float64 reference; by tile rows, the strong
    # preset's 26x26 layer: ~1.1e-6, ~1.9e-6, ~1.7e-6, and its 64 -> 64 10x10
    # layer: ~1.3e-6, ~2.1e-6, ~2.2e-6); 1e-5 leaves room for
    # other seeds while still catching a worse point set (0, +-1, +-2 measured
    # 4e-6 .. 7e-6 and fails test_functional's 2e-4 absolute tolerance on
    # unscaled weights).
    n = 8
    x = randn(rng, (n, c, hw, hw), np.float32)
    wt = (randn(rng, (o, c, 3, 3), np.float64) / np.sqrt(9 * c)).astype(np.float32)
    b = randn(rng, (o,), np.float32)
    x64, w64, b64 = (a.astype(np.float64) for a in (x, wt, b))
    y = _C.conv2d(x, wt, b, ONE, p, ONE, 1)
    gy = randn(rng, y.shape, np.float32)
    gy64 = gy.astype(np.float64)
    pairs = [
        (y, R.conv2d(x64, w64, b64, ONE, p, ONE, 1)),
        (_C.conv2d_backward_input(gy, wt, (hw, hw), ONE, p, ONE, 1),
         R.conv2d_backward_input(gy64, w64, (hw, hw), ONE, p, ONE, 1)),
        (_C.conv2d_backward_weight(gy, x, (3, 3), ONE, p, ONE, 1),
         R.conv2d_backward_weight(gy64, x64, (3, 3), ONE, p, ONE, 1)),
    ]
    for got, want in pairs:
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@given(
    n=st.integers(1, 3), cg=st.integers(1, 4), g=st.integers(1, 2), og=st.integers(1, 5),
    h=st.integers(1, 12), w=st.integers(1, 19), kh=st.integers(1, 3), kw=st.integers(1, 3),
    sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 2), pw=st.integers(0, 2),
    dh=st.integers(1, 2), dw=st.integers(1, 2), f64=st.booleans(), seed=st.integers(0, 2**16),
)
@HYP
def test_conv2d_random_geometry(n, cg, g, og, h, w, kh, kw, sh, sw, ph, pw, dh, dw, f64, seed):
    dtype = np.float64 if f64 else np.float32
    if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
        return  # no output position; rejected (tested above)
    rng = np.random.default_rng(seed)
    x, weight, bias = conv_args(rng, dtype, n, cg * g, h, w, og * g, (kh, kw), g)
    geo = ((sh, sw), (ph, pw), (dh, dw), g)
    y = _C.conv2d(x, weight, bias, *geo)
    close(y, R.conv2d(x, weight, bias, *geo), dtype)
    gy = randn(rng, y.shape, dtype)
    close(_C.conv2d_backward_input(gy, weight, (h, w), *geo),
          R.conv2d_backward_input(gy, weight, (h, w), *geo), dtype)
    close(_C.conv2d_backward_weight(gy, x, (kh, kw), *geo),
          R.conv2d_backward_weight(gy, x, (kh, kw), *geo), dtype)


def test_conv2d_empty_batch(rng):
    x, w, b = conv_args(rng, np.float32, n=0)
    y = _C.conv2d(x, w, b, ONE, ONE, ONE, 1)
    assert y.shape == (0, 4, 9, 8)
    assert _C.conv2d_backward_input(y, w, (9, 8), ONE, ONE, ONE, 1).shape == (0, 3, 9, 8)
    gw = _C.conv2d_backward_weight(y, x, (3, 3), ONE, ONE, ONE, 1)
    np.testing.assert_array_equal(gw, np.zeros((4, 3, 3, 3), np.float32))


def test_conv2d_nan_propagates(rng):
    x, w, b = conv_args(rng, np.float32, n=1, c=1, o=2)
    x[0, 0, 4, 4] = np.nan
    y = _C.conv2d(x, w, b, ONE, ZERO, ONE, 1)
    want = R.conv2d(x, w, b, ONE, ZERO, ONE, 1)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
    assert np.isnan(y).sum() == 2 * 9


# --------------------------------------------------------------------------- #
# pooling against the reference
# --------------------------------------------------------------------------- #

POOL_CASES = [
    # n, c, h, w, kernel, stride, padding, dilation, ceil_mode
    (2, 3, 26, 26, (2, 2), (2, 2), ZERO, ONE, False),  # MNIST: 2x2 fast path
    (2, 3, 27, 35, (2, 2), (2, 2), ZERO, ONE, False),  # fast path, odd sizes (tail)
    (1, 2, 7, 7, (2, 2), (2, 2), ZERO, ONE, True),  # ceil_mode: general path
    (2, 2, 9, 10, (3, 3), (2, 2), ONE, ONE, True),
    (1, 3, 11, 13, (3, 2), (1, 1), (1, 1), ONE, False),  # overlapping windows, stride 1
    (1, 2, 12, 40, (2, 3), (3, 2), (1, 1), (2, 3), True),  # dilation, stride 3
    (1, 1, 5, 6, (5, 6), (5, 6), ZERO, ONE, False),  # one window
    (1, 1, 4, 70, (1, 3), (1, 2), (0, 1), ONE, True),  # wide rows: several vectors
]


def pool_out(size, k, s, p, d, ceil):
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


def pool_geo(case):
    n, c, h, w, k, s, p, d, ceil = case
    out = (pool_out(h, k[0], s[0], p[0], d[0], ceil), pool_out(w, k[1], s[1], p[1], d[1], ceil))
    return (n, c, h, w), k, s, p, d, out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: f"{c[2]}x{c[3]}k{c[4][0]}{c[4][1]}")
def test_max_pool2d_matches_reference(rng, dtype, case):
    shape, k, s, p, d, out = pool_geo(case)
    x = randn(rng, shape, dtype)
    # Ties and special values: repeated values, -inf, and a NaN in one plane.
    x[0, 0, ::3] = 0.5
    x[0, -1, 1, :] = -np.inf
    x[-1, 0, 2, 1::4] = np.nan
    y = _C.max_pool2d(x, k, s, p, d, out)
    close(y, R.max_pool2d(x, k, s, p, d, out), dtype)
    gy = randn(rng, y.shape, dtype)
    gx = _C.max_pool2d_backward(gy, x, k, s, p, d)
    # Exact: each gradient cell is a sum of the same grad_out entries.
    close(gx, R.max_pool2d_backward(gy, x, k, s, p, d), dtype)


def test_max_pool2d_nan_rules():
    # A NaN anywhere in the window wins; with two NaNs the last gets the gradient
    # (torch's rule: a cell wins when greater than the running max or NaN).
    x = np.array([[[[1.0, np.nan], [np.nan, 5.0]]]], np.float32)
    gy = np.full((1, 1, 1, 1), 3.0, np.float32)
    for stride in ((2, 2), (1, 1)):  # the 2x2 fast path, then the general path
        y = _C.max_pool2d(x, (2, 2), stride, ZERO, ONE, (1, 1))
        assert np.isnan(y[0, 0, 0, 0])
        gx = _C.max_pool2d_backward(gy, x, (2, 2), stride, ZERO, ONE)
        np.testing.assert_array_equal(gx[0, 0], [[0.0, 0.0], [3.0, 0.0]])
        _, ind = _C.max_pool2d_with_indices(x, (2, 2), stride, ZERO, ONE, (1, 1))
        assert ind.dtype == np.int64 and ind[0, 0, 0, 0] == 2


def test_max_pool2d_ties_go_to_first_maximum():
    x = np.full((1, 1, 4, 4), 2.0, np.float64)
    gy = np.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    gx = _C.max_pool2d_backward(gy, x, (2, 2), (2, 2), ZERO, ONE)
    want = np.zeros((4, 4))
    want[0, 0], want[0, 2], want[2, 0], want[2, 2] = 1, 2, 3, 4
    np.testing.assert_array_equal(gx[0, 0], want)
    # Overlapping windows (stride 1, padding 1): padded cells never win.
    x = -np.ones((1, 1, 3, 3))
    gx = _C.max_pool2d_backward(np.ones((1, 1, 3, 3)), x, (3, 3), ONE, ONE, ONE)
    np.testing.assert_array_equal(gx, R.max_pool2d_backward(np.ones((1, 1, 3, 3)), x, (3, 3),
                                                            ONE, ONE, ONE))
    assert gx[0, 0, 0, 0] == 4.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c for c in POOL_CASES if c[7] == ONE],
                         ids=lambda c: f"{c[2]}x{c[3]}k{c[4][0]}{c[4][1]}")
@pytest.mark.parametrize("cip,div", [(True, None), (False, None), (True, 3), (False, 7)])
def test_avg_pool2d_matches_reference(rng, dtype, case, cip, div):
    shape, k, s, p, _, out = pool_geo(case)
    x = randn(rng, shape, dtype)
    y = _C.avg_pool2d(x, k, s, p, out, cip, div)
    close(y, R.avg_pool2d(x, k, s, p, out, cip, div), dtype)
    gy = randn(rng, y.shape, dtype)
    close(_C.avg_pool2d_backward(gy, shape[2:], k, s, p, cip, div),
          R.avg_pool2d_backward(gy, shape[2:], k, s, p, cip, div), dtype)


def test_avg_pool2d_ceil_mode_divisor_rule():
    # torch: with count_include_pad the divisor is the window clipped to the
    # padded input, [h0, min(h0 + k, H + p)); without it, the real cells.
    x = np.ones((1, 1, 6, 6), np.float64)
    # k=3, s=2, p=1, ceil_mode: windows start at -1, 1, 3, 5 and end at
    # min(h0 + 3, 7) = 2, 4, 6, 7.
    size = np.array([3, 3, 3, 2])
    real = np.array([2, 3, 3, 1])
    y = _C.avg_pool2d(x, (3, 3), (2, 2), ONE, (4, 4), True, None)
    np.testing.assert_allclose(y[0, 0], np.outer(real, real) / np.outer(size, size))
    y = _C.avg_pool2d(x, (3, 3), (2, 2), ONE, (4, 4), False, None)
    np.testing.assert_allclose(y[0, 0], np.ones((4, 4)))


def test_avg_pool2d_negative_divisor_override(rng):
    # torch allows any non-zero divisor_override: y = window sum / divisor.
    x = randn(rng, (1, 2, 4, 6), np.float64)
    y = _C.avg_pool2d(x, (2, 2), (2, 2), ZERO, (2, 3), True, -2)
    sums = x.reshape(1, 2, 2, 2, 3, 2).sum(axis=(3, 5))
    np.testing.assert_allclose(y, sums / -2)
    gx = _C.avg_pool2d_backward(np.ones((1, 2, 2, 3)), (4, 6), (2, 2), (2, 2), ZERO, True, -2)
    np.testing.assert_allclose(gx, np.full((1, 2, 4, 6), -0.5))


def test_pool_fast_path_leaves_no_garbage_in_uncovered_cells(rng):
    # 2x2/2 over odd H, W: the last row and column get no gradient.
    x = randn(rng, (2, 2, 7, 9), np.float32)
    gy = randn(rng, (2, 2, 3, 4), np.float32)
    gmax = _C.max_pool2d_backward(gy, x, (2, 2), (2, 2), ZERO, ONE)
    gavg = _C.avg_pool2d_backward(gy, (7, 9), (2, 2), (2, 2), ZERO, True, None)
    for g in (gmax, gavg):
        assert not g[:, :, 6, :].any() and not g[:, :, :, 8].any()


# --------------------------------------------------------------------------- #
# matmul, elementwise, loss, optimizers
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [None, 1, 5])
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_matches_reference(rng, dtype, batch, ta, tb):
    m, k, n = 7, 13, 5
    lead = () if batch is None else (batch,)
    a = randn(rng, lead + ((k, m) if ta else (m, k)), dtype)
    b = randn(rng, lead + ((n, k) if tb else (k, n)), dtype)
    close(_C.matmul(a, b, ta, tb), R.matmul(a, b, ta, tb), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "ta,m,n,k",
    [
        (False, 200, 333, 700),  # several K blocks, ragged last column panel
        (True, 130, 1500, 129),  # A packed; B's first row panel packs B as it runs
        (False, 9, 2900, 64),  # one full row panel and a ragged one
        (True, 700, 100, 50),  # at one thread more rows than an MC block: B packed first
    ],
)
def test_matmul_packed_paths_match_reference(rng, dtype, threads, ta, m, n, k):
    a = randn(rng, (k, m) if ta else (m, k), dtype)
    b = randn(rng, (k, n), dtype)
    old = _C.get_num_threads()
    _C.set_num_threads(threads)
    try:
        got = _C.matmul(a, b, ta, False)
    finally:
        _C.set_num_threads(old)
    close(got, R.matmul(a, b, ta, False), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "ta,tb,m,n,k",
    [
        (False, True, 128, 10, 128),  # the MNIST output layer: computed directly
        (True, False, 128, 10, 128),  # A transposed: through C^T
        (False, True, 128, 2, 128),  # very narrow: through C^T
        (False, False, 1024, 10, 128),  # A past a quarter of L2: directly
        (False, True, 128, 10, 600),  # long K: through C^T, K in blocks
        (False, False, 37, 3, 5),
    ],
)
def test_matmul_narrow_outputs_match_reference(rng, dtype, ta, tb, m, n, k):
    """N below a few vectors: gemm picks C = A B or C^T = B^T A^T by cost."""
    a = randn(rng, (k, m) if ta else (m, k), dtype)
    b = randn(rng, (n, k) if tb else (k, n), dtype)
    out = _C.matmul(a, b, ta, tb)
    assert out.shape == (m, n) and out.flags.c_contiguous
    close(out, R.matmul(a, b, ta, tb), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_and_backward(rng, dtype):
    x = randn(rng, (3, 37), dtype)
    x[0, :3] = [np.nan, 0.0, -0.0]
    y = _C.relu(x)
    np.testing.assert_array_equal(y, R.relu(x))
    assert np.isnan(y[0, 0])
    gy = randn(rng, x.shape, dtype)
    np.testing.assert_array_equal(_C.relu_backward(gy, y), R.relu_backward(gy, y))
    with pytest.raises(ValueError, match=r"relu_backward: grad_out must have the shape of y"):
        _C.relu_backward(gy[:, :5].copy(), y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(1, 1), (7, 10), (128, 10), (3, 100)])
def test_softmax_cross_entropy_matches_reference(rng, dtype, n, k):
    z = randn(rng, (n, k), dtype) * 5
    z[0, 0] = 1e4 if dtype == np.float64 else 80.0  # stability: no overflow
    labels = rng.integers(0, k, n).astype(np.int64)
    loss, grad = _C.softmax_cross_entropy(z, labels)
    want_loss, want_grad = R.softmax_cross_entropy(z, labels)
    assert loss.shape == () and np.isfinite(loss)
    close(loss, want_loss, dtype)
    close(grad, want_grad, dtype)


def test_softmax_cross_entropy_empty_batch():
    loss, grad = _C.softmax_cross_entropy(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    assert np.isnan(loss) and grad.shape == (0, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 1e-2),
                                                  (0.9, True, 0.1)])
def test_sgd_step_matches_reference(rng, dtype, momentum, nesterov, wd):
    p1 = randn(rng, (4, 33), dtype)
    p2 = p1.copy()
    b1 = np.zeros_like(p1) if momentum else None
    b2 = np.zeros_like(p1) if momentum else None
    for _ in range(3):
        g = randn(rng, p1.shape, dtype)
        assert _C.sgd_step(p1, g, b1, 0.1, momentum, wd, nesterov) is None
        R.sgd_step(p2, g, b2, 0.1, momentum, wd, nesterov)
    close(p1, p2, dtype)
    if momentum:
        close(b1, b2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoupled,wd", [(False, 0.0), (False, 0.05), (True, 0.05)])
def test_adam_step_matches_reference(rng, dtype, decoupled, wd):
    p1 = randn(rng, (70,), dtype)
    p2 = p1.copy()
    state1 = [np.zeros_like(p1), np.zeros_like(p1)]
    state2 = [np.zeros_like(p1), np.zeros_like(p1)]
    for step in range(1, 5):
        g = randn(rng, p1.shape, dtype)
        _C.adam_step(p1, g, *state1, step, 1e-2, 0.9, 0.999, 1e-8, wd, decoupled)
        R.adam_step(p2, g, *state2, step, 1e-2, 0.9, 0.999, 1e-8, wd, decoupled)
    close(p1, p2, dtype)
    close(state1[0], state2[0], dtype)
    close(state1[1], state2[1], dtype)


# --------------------------------------------------------------------------- #
# Threads
# --------------------------------------------------------------------------- #


@pytest.fixture
def restore_threads():
    n = _C.get_num_threads()
    yield
    _C.set_num_threads(n)


def test_set_num_threads(restore_threads):
    _C.set_num_threads(1)
    assert _C.get_num_threads() == 1
    with pytest.raises(ValueError, match=r"set_num_threads: n must be >= 1"):
        _C.set_num_threads(0)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_results_do_not_depend_on_thread_count(rng, restore_threads, threads):
    x, w, b = conv_args(rng, np.float64, n=5, c=4, o=6)
    gy = randn(rng, (5, 6, 9, 8), np.float64)
    xs = randn(rng, (5, 4, 8, 8), np.float64)
    _C.set_num_threads(threads)
    got = [
        _C.conv2d(x, w, b, ONE, ONE, ONE, 1),
        _C.conv2d_backward_input(gy, w, (9, 8), ONE, ONE, ONE, 1),
        _C.conv2d_backward_weight(gy, x, (3, 3), ONE, ONE, ONE, 1),
        _C.max_pool2d(xs, (2, 2), (2, 2), ZERO, ONE, (4, 4)),
    ]
    want = [
        R.conv2d(x, w, b, ONE, ONE, ONE, 1),
        R.conv2d_backward_input(gy, w, (9, 8), ONE, ONE, ONE, 1),
        R.conv2d_backward_weight(gy, x, (3, 3), ONE, ONE, ONE, 1),
        R.max_pool2d(xs, (2, 2), (2, 2), ZERO, ONE, (4, 4)),
    ]
    for g, wnt in zip(got, want):
        close(g, wnt, np.float64)
    # Same thread count, same result bit for bit (fixed reduction order).
    again = _C.conv2d_backward_weight(gy, x, (3, 3), ONE, ONE, ONE, 1)
    np.testing.assert_array_equal(again, got[2])


def test_concurrent_calls_from_python_threads(rng):
    # The GIL is released inside kernels; concurrent callers must stay correct.
    x, w, b = conv_args(rng, np.float32, n=4, c=3, o=5)
    want = R.conv2d(x, w, b, ONE, ONE, ONE, 1)
    errors: list[BaseException] = []

    def work():
        try:
            for _ in range(10):
                close(_C.conv2d(x, w, b, ONE, ONE, ONE, 1), want, np.float32)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
