"""Every ISA build of the C++ kernels that this CPU can run gives the reference results.

fastnn._C links a baseline, an AVX2+FMA and an AVX-512 build of each kernel and
picks the best one at import. Tests switch builds at run time with
``_C.select_isa`` and check ``FASTNN_ISA`` (chosen at import) in subprocesses.
Shapes are chosen so every vector width (2 to 16 lanes) sees full vectors and
partial tails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastnn
from fastnn.backends import numpy_ref as R

_C = pytest.importorskip("fastnn._C", reason="fastnn._C is not built (run tools/dev_build.sh)")

PKG_ROOT = Path(fastnn.__file__).resolve().parents[1]
ALL_ISAS = ("avx512", "avx2", "baseline")
SUPPORTED = _C.supported_isas()
ONE, ZERO = (1, 1), (0, 0)


@pytest.fixture(params=SUPPORTED)
def isa(request):
    """Each ISA this machine can run, made active for the test."""
    before = _C.active_isa()
    assert _C.select_isa(request.param)
    assert _C.active_isa() == request.param
    yield request.param
    assert _C.select_isa(before)


def close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    eps = 2e-5 if dtype == np.float32 else 1e-12
    finite = want[np.isfinite(want)]
    scale = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    np.testing.assert_allclose(got, want, rtol=eps, atol=eps * scale, equal_nan=True)


def test_supported_isas_are_ordered_and_include_baseline():
    assert SUPPORTED, "no ISA at all"
    assert SUPPORTED[-1] == "baseline"
    assert set(SUPPORTED) <= set(ALL_ISAS)
    # Best first, in the fixed preference order.
    assert SUPPORTED == [i for i in ALL_ISAS if i in SUPPORTED]
    # With no FASTNN_ISA override the best one is active at import.
    if not os.environ.get("FASTNN_ISA"):
        assert _C.active_isa() == SUPPORTED[0]


def test_select_isa_rejects_unknown_names():
    before = _C.active_isa()
    with pytest.raises(ValueError, match=r"select_isa: name must be"):
        _C.select_isa("sse9")
    assert _C.active_isa() == before


def test_select_isa_refuses_unsupported_isa():
    missing = [i for i in ALL_ISAS if i not in SUPPORTED]
    if not missing:
        pytest.skip("this CPU runs every ISA build")
    before = _C.active_isa()
    assert _C.select_isa(missing[0]) is False
    assert _C.active_isa() == before


def test_select_best():
    before = _C.active_isa()
    assert _C.select_isa("baseline")
    assert _C.select_isa("best")
    assert _C.active_isa() == SUPPORTED[0]
    _C.select_isa(before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv2d_every_isa(isa, rng, dtype):
    # Small-K direct (C=1), im2col + gemm (C=5), 1x1, grouped/strided/dilated, Winograd.
    cases = [
        (2, 1, 11, 19, 7, (3, 3), ONE, ZERO, ONE, 1),
        (2, 5, 9, 13, 6, (3, 3), ONE, ONE, ONE, 1),
        (2, 4, 5, 17, 8, (1, 1), ONE, ZERO, ONE, 2),
        (1, 6, 8, 23, 4, (2, 3), (2, 1), (1, 1), (1, 2), 2),
        (3, 8, 13, 35, 9, (3, 3), ONE, ONE, ONE, 1),  # Winograd, several vectors per row
        (2, 12, 13, 13, 10, (3, 3), ONE, ONE, ONE, 1),  # F(4x4) on AVX-512 float32, else F(2x2)
        (2, 3, 9, 41, 5, (3, 3), (2, 2), ONE, ONE, 1),  # stride-2 im2col / col2im rows
    ]
    for n, c, h, w, o, k, s, p, d, g in cases:
        x = rng.standard_normal((n, c, h, w)).astype(dtype)
        wt = rng.standard_normal((o, c // g) + k).astype(dtype)
        b = rng.standard_normal(o).astype(dtype)
        y = _C.conv2d(x, wt, b, s, p, d, g)
        close(y, R.conv2d(x, wt, b, s, p, d, g), dtype)
        gy = rng.standard_normal(y.shape).astype(dtype)
        close(_C.conv2d_backward_input(gy, wt, (h, w), s, p, d, g),
              R.conv2d_backward_input(gy, wt, (h, w), s, p, d, g), dtype)
        close(_C.conv2d_backward_weight(gy, x, k, s, p, d, g),
              R.conv2d_backward_weight(gy, x, k, s, p, d, g), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [2, 7, 16, 33, 66])
def test_pooling_every_isa(isa, rng, dtype, width):
    x = rng.standard_normal((2, 3, 6, width)).astype(dtype)
    x[0, 0, 1, ::5] = np.nan
    x[1, 1, ::2] = 0.25  # ties
    # 2x2/2 fast path, then general paths with column stride 1, 2 and 3.
    geometries = [
        ((2, 2), (2, 2), ZERO, ONE, False),
        ((2, 2), (1, 1), ONE, ONE, False),
        ((3, 3), (2, 2), ONE, ONE, True),
        ((2, 2), (3, 3), ZERO, (1, 2), True),
    ]
    for k, s, p, d, ceil in geometries:
        span = [6 + 2 * p[0] - d[0] * (k[0] - 1) - 1, width + 2 * p[1] - d[1] * (k[1] - 1) - 1]
        if min(span) < 0:
            continue
        out = []
        for i, sp in enumerate(span):
            o = (-(-sp // s[i]) if ceil else sp // s[i]) + 1
            if ceil and (o - 1) * s[i] >= x.shape[2 + i] + p[i]:
                o -= 1
            out.append(o)
        out = tuple(out)
        y = _C.max_pool2d(x, k, s, p, d, out)
        close(y, R.max_pool2d(x, k, s, p, d, out), dtype)
        gy = rng.standard_normal(y.shape).astype(dtype)
        close(_C.max_pool2d_backward(gy, x, k, s, p, d), R.max_pool2d_backward(gy, x, k, s, p, d),
              dtype)
        if d == ONE:
            xf = np.nan_to_num(x)
            for cip, div in ((True, None), (False, 5)):
                close(_C.avg_pool2d(xf, k, s, p, out, cip, div),
                      R.avg_pool2d(xf, k, s, p, out, cip, div), dtype)
                close(_C.avg_pool2d_backward(gy, x.shape[2:], k, s, p, cip, div),
                      R.avg_pool2d_backward(gy, x.shape[2:], k, s, p, cip, div), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_and_elementwise_every_isa(isa, rng, dtype):
    a = rng.standard_normal((3, 17, 9)).astype(dtype)
    b = rng.standard_normal((3, 9, 21)).astype(dtype)
    close(_C.matmul(a, b), R.matmul(a, b), dtype)
    z = rng.standard_normal((13, 10)).astype(dtype)
    labels = rng.integers(0, 10, 13).astype(np.int64)
    for got, want in zip(_C.softmax_cross_entropy(z, labels), R.softmax_cross_entropy(z, labels)):
        close(got, want, dtype)
    np.testing.assert_array_equal(_C.relu(z), R.relu(z))
    p1, p2 = z.copy(), z.copy()
    m1, v1, m2, v2 = (np.zeros_like(z) for _ in range(4))
    g = rng.standard_normal(z.shape).astype(dtype)
    _C.adam_step(p1, g, m1, v1, 1, 1e-2, 0.9, 0.999, 1e-8, 0.1, True)
    R.adam_step(p2, g, m2, v2, 1, 1e-2, 0.9, 0.999, 1e-8, 0.1, True)
    close(p1, p2, dtype)


def _run_with_env(isa_value: str) -> subprocess.CompletedProcess:
    code = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import fastnn.backends.cpu as cpu\n"
        "from fastnn import _C\n"
        "print(_C.active_isa())\n"
        "print([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])\n"
    )
    # The child imports the same fastnn as this process (the tree, or a copy).
    env = dict(os.environ, FASTNN_ISA=isa_value, PYTHONPATH=str(PKG_ROOT))
    # cwd too: from a checkout's root, `-c` would import its unbuilt fastnn/.
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=True, cwd=PKG_ROOT)


@pytest.mark.parametrize("name", SUPPORTED)
def test_fastnn_isa_env_forces_a_supported_isa(name):
    out = _run_with_env(name).stdout.splitlines()
    assert out[0] == name
    assert out[1] == "[]"


def test_fastnn_isa_env_unknown_name_falls_back_with_warning():
    out = _run_with_env("sse9").stdout.splitlines()
    assert out[0] == SUPPORTED[0]
    assert "FASTNN_ISA=sse9 is not one of baseline, avx2, avx512" in out[1]


def test_fastnn_isa_env_unsupported_isa_falls_back_with_warning():
    missing = [i for i in ALL_ISAS if i not in SUPPORTED]
    if not missing:
        pytest.skip("this CPU runs every ISA build")
    out = _run_with_env(missing[0]).stdout.splitlines()
    assert out[0] == SUPPORTED[0]
    assert "is not supported by this CPU" in out[1]
