"""The one-input-channel 3x3 conv kernels (csrc/kernels/conv_small.h) against the NumPy reference.

conv2d takes them when C == 1, groups == 1, the kernel is 3x3 and stride,
dilation and padding are (1, 1), (1, 1), (0, 0) (the MNIST first layer); the
shapes around that boundary must still take the general kernels and agree too.
Inside it, the kernels branch on the output width (shorter or longer than a
vector: 4/8/16 lanes; even widths take the F(3,2) backward-weight on AVX-512),
on the number of output channels (blocks of 4 forward, 3 or 2 backward-weight,
with leftovers) and on how the pixels split into vector blocks, so the cases
cover each side of those, on every ISA build, float32 and float64.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastnn
from fastnn.backends import numpy_ref as R

_C = pytest.importorskip("fastnn._C", reason="fastnn._C is not built (run tools/dev_build.sh)")

ONE, ZERO = (1, 1), (0, 0)


@pytest.fixture(params=_C.supported_isas())
def isa(request):
    before = _C.active_isa()
    assert _C.select_isa(request.param)
    yield request.param
    assert _C.select_isa(before)


def close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    eps = 2e-5 if dtype == np.float32 else 1e-12
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=eps, atol=eps * scale)


def check(rng, dtype, n, o, h, w, *, bias=True, stride=ONE, padding=ZERO, dilation=ONE,
          c=1, groups=1):
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((o, c // groups, 3, 3)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype) if bias else None
    args = (stride, padding, dilation, groups)
    y = _C.conv2d(x, wt, b, *args)
    close(y, R.conv2d(x, wt, b, *args), dtype)
    gy = rng.standard_normal(y.shape).astype(dtype)
    close(_C.conv2d_backward_input(gy, wt, (h, w), *args),
          R.conv2d_backward_input(gy, wt, (h, w), *args), dtype)
    close(_C.conv2d_backward_weight(gy, x, (3, 3), *args),
          R.conv2d_backward_weight(gy, x, (3, 3), *args), dtype)


# (N, O, H, W): output widths 1..66 around 4/8/16 lanes (and 2x that in
# Winograd tiles), odd and even; one output row; channel counts with every
# leftover of the 4-, 3- and 2-blocks.
SHAPES = [
    (1, 32, 28, 28),   # MNIST, one image (the fused op's per-image call)
    (3, 32, 28, 28),   # MNIST, odd batch
    (2, 33, 28, 27),   # odd output width: direct backward-weight
    (2, 1, 3, 3),      # a single output pixel and channel
    (1, 2, 5, 4),      # output width 2 (tiny rows in backward-input)
    (2, 3, 4, 5),      # output width 3
    (1, 5, 9, 6),      # output width 4
    (2, 6, 3, 18),     # one output row, 16 wide
    (1, 7, 7, 19),     # 17 wide
    (2, 4, 6, 10),     # 8 wide
    (1, 9, 5, 11),     # 9 wide
    (1, 10, 21, 32),   # 30 wide, even: 15 tiles (+1 overhang) fill 16 lanes
    (2, 3, 5, 34),     # 32 wide: 16 tiles, more than one vector per row
    (1, 4, 4, 68),     # 66 wide: 33 tiles
    (1, 17, 30, 3),    # 1 wide, tall
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_one_channel_3x3_every_isa(isa, rng, dtype, shape):
    check(rng, dtype, *shape)


def test_one_channel_3x3_without_bias(rng):
    check(rng, np.float32, 2, 32, 28, 28, bias=False)


@pytest.mark.parametrize(
    "kw",
    [
        {"padding": (1, 1)},
        {"padding": (0, 1)},
        {"stride": (2, 2)},
        {"stride": (1, 2)},
        {"dilation": (2, 2)},
        {"c": 2},
        {"c": 2, "groups": 2},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_neighbouring_shapes_take_the_general_path(rng, kw):
    check(rng, np.float32, 2, 6, 12, 13, **kw)
    check(rng, np.float64, 1, 4, 9, 20, **kw)


@pytest.mark.parametrize("n", [1, 2, 5, 32])
def test_backward_weight_is_deterministic_over_threads(rng, n):
    x = rng.standard_normal((n, 1, 28, 28)).astype(np.float32)
    gy = rng.standard_normal((n, 32, 26, 26)).astype(np.float32)
    before = fastnn.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1, 2):
            fastnn.set_num_threads(threads)
            results.append(_C.conv2d_backward_weight(gy, x, (3, 3), ONE, ZERO, ONE, 1))
    finally:
        fastnn.set_num_threads(before)
    # Same thread count: bit-identical; any thread count: the reference.
    np.testing.assert_array_equal(results[0], results[2])
    np.testing.assert_array_equal(results[1], results[3])
    close(results[0], R.conv2d_backward_weight(gy, x, (3, 3), ONE, ZERO, ONE, 1), np.float32)
