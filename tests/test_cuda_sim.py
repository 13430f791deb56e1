"""The cuda backend's kernels, run in Numba's CUDA simulator, against numpy_ref.

The simulator must be enabled (``NUMBA_ENABLE_CUDASIM=1``) before Numba is
first imported, which other test modules may already have done, so the
simulator tests here skip in an ordinary run and
:func:`test_simulator_suite` re-runs this file in a child ``pytest`` with the
variable set. Run them directly with::

    NUMBA_ENABLE_CUDASIM=1 PYTHONPATH=. python -m pytest tests/test_cuda_sim.py -q

The simulator executes every CUDA thread as a Python thread, so shapes are
tiny; they are chosen to be odd, to span several tiles and to hit every code
path (GEMM tile configs, transposes, wide/narrow loads, split-K, direct and
im2col conv, chunked im2col, pooling edge cases).

Tests that do not need the simulator (import without Numba/CuPy, the error
without a GPU, typing/lowering every kernel variant for the real CUDA target)
run in the parent process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PKG_ROOT

from fastnn.geometry import pool_out_size

REPO = Path(__file__).resolve().parents[1]
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

pytestmark = pytest.mark.cudasim

# Simulator-only tests are deselected (by conftest) outside the simulator: the
# parent runs them all through test_simulator_suite instead.
sim = pytest.mark.sim_only


def _numba_installed() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PKG_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


# --------------------------------------------------------------------------- #
# Parent-process tests
# --------------------------------------------------------------------------- #


@pytest.mark.skipif(SIM, reason="already running under the simulator")
@pytest.mark.skipif(not _numba_installed(), reason="numba is not installed")
def test_simulator_suite() -> None:
    """Run this module's simulator tests in a child with NUMBA_ENABLE_CUDASIM=1."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider"],
        cwd=PKG_ROOT, env=_child_env(NUMBA_ENABLE_CUDASIM="1"),
        capture_output=True, text=True, timeout=900,
    )
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    print(f"simulator suite: {summary} (wall {elapsed:.0f} s)")
    assert proc.returncode == 0, f"simulator tests failed:\n{out[-6000:]}"
    assert " passed" in summary and "skipped" not in summary.split(" passed")[0], summary


@pytest.mark.skipif(SIM, reason="checks the non-simulator error path")
def test_imports_without_numba_and_cupy() -> None:
    """fastnn.backends.cuda imports where neither is installed and explains itself."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["numba"] = None  # makes `import numba` raise ImportError
        sys.modules["cupy"] = None
        import numpy as np
        import fastnn
        from fastnn.backends import cuda
        assert cuda.is_available() is False
        assert "cuda" not in fastnn.available_backends()
        info = cuda.device_info()
        assert info["numba"] == "not installed" and "unavailable" in info["cuda"], info
        try:
            cuda.relu(np.zeros(3, np.float32))
        except RuntimeError as exc:
            assert "unavailable" in str(exc) and "Numba" in str(exc), exc
        else:
            raise AssertionError("no RuntimeError")
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=PKG_ROOT, env=_child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.skipif(SIM, reason="checks the non-simulator error path")
@pytest.mark.skipif(not _numba_installed(), reason="numba is not installed")
def test_no_gpu_raises_clear_runtime_error() -> None:
    from fastnn.backends import cuda

    if cuda.is_available():
        pytest.skip("a GPU is available here")
    with pytest.raises(RuntimeError, match="cuda backend is unavailable"):
        cuda.matmul(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32))
    assert "unavailable" in cuda.device_info()["cuda"]


_LOWERING_SCRIPT = """
import types as pytypes
import numba
from numba import types
import numba.cuda.dispatcher as D
from numba.cuda.compiler import compile_cuda
# Typing may ask the current device for its compute capability; there is none here.
if hasattr(D, "get_current_device"):
    D.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))
from fastnn.backends._cuda import variants

failures, promoted = [], []
found = variants.core()
for v in found:
    try:
        cres = compile_cuda(v.kernel.py_func, types.void, v.sig, cc=(9, 0))
        ir = str(cres.library.get_llvm_str())
    except Exception as exc:
        failures.append(f"{v.name}: {type(exc).__name__}: {str(exc)[:400]}")
        continue
    ops = ("fadd double", "fmul double", "fdiv double", "fsub double", "fpext float")
    if v.dtype == "float32" and not v.f64_ok and any(op in ir for op in ops):
        promoted.append(v.name)
print("variants", len(found), "families", len({v.family for v in found}))
assert not failures, "\\n".join(failures)
assert not promoted, f"float32 kernels with float64 arithmetic: {promoted}"
print("ok")
"""


@pytest.mark.skipif(SIM, reason="needs Numba's real CUDA target, not the simulator")
@pytest.mark.skipif(not _numba_installed(), reason="numba is not installed")
def test_kernels_type_and_lower_for_real_cuda_target() -> None:
    """Every kernel family types and lowers to LLVM IR for sm_90 (no GPU or NVVM needed).

    The simulator runs kernels as Python and would accept code Numba's CUDA
    compiler rejects; this catches that class of bug here, for every variant
    in ``variants.core()`` (all families, GEMM configs, transposes, wide and
    scalar loads, both dtypes). It also checks that float32 kernels contain no
    float64 arithmetic. Works with numba-cuda (any version: only
    ``compile_cuda`` and the library's LLVM IR are used) and with Numba's
    built-in CUDA target. What NVVM makes of the IR (PTX: vector loads,
    registers, spills) is tests/test_cuda_ptx.py's job.
    """
    try:
        import numba.cuda.dispatcher  # noqa: F401
        from numba.cuda.compiler import compile_cuda  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"numba.cuda internals not available: {exc}")
    proc = subprocess.run([sys.executable, "-c", _LOWERING_SCRIPT], cwd=PKG_ROOT, env=_child_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        proc.stdout[-2000:] + proc.stderr[-4000:]
    )
    print(proc.stdout.strip().replace("\n", "; "))


# --------------------------------------------------------------------------- #
# Simulator tests
# --------------------------------------------------------------------------- #

if SIM:
    from fastnn.backends import cuda as cb
    from fastnn.backends import numpy_ref as ref
    from fastnn.backends._cuda import conv as _conv
    from fastnn.backends._cuda import gemm as _gemm


def _tol(dtype: np.dtype) -> dict:
    return {"rtol": 1e-4, "atol": 1e-5} if np.dtype(dtype) == np.float32 else {
        "rtol": 1e-10, "atol": 1e-12}


def _close(got: np.ndarray, want: np.ndarray, dtype=None) -> None:
    assert isinstance(got, np.ndarray)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.flags.c_contiguous
    np.testing.assert_allclose(got, want, equal_nan=True, **_tol(dtype or want.dtype))


@pytest.fixture
def knobs(monkeypatch: pytest.MonkeyPatch):
    """Lets a test pin the GEMM config / split count / conv path; restored after."""
    monkeypatch.setattr(_gemm, "force_config", None)
    monkeypatch.setattr(_gemm, "force_splits", None)
    monkeypatch.setattr(_conv, "force_path", None)
    return monkeypatch


@pytest.fixture
def split_counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts split-K reductions (launches of the split-summing kernel)."""
    calls: list[int] = []
    original = _gemm._sum_splits_kernel

    def counted(T):
        calls.append(1)
        return original(T)

    monkeypatch.setattr(_gemm, "_sum_splits_kernel", counted)
    return calls


# ---- runtime ---------------------------------------------------------------


@sim
def test_available_under_simulator() -> None:
    import fastnn

    assert cb.is_available()
    assert "cuda" in fastnn.available_backends()
    assert "simulator" in cb.device_info()["cuda"]


@sim
def test_rejects_arrays_of_another_kind() -> None:
    with pytest.raises(TypeError, match="NumPy arrays"):
        cb.relu([1.0, -1.0])


# ---- matmul ----------------------------------------------------------------

_TRANS = [(False, False), (True, False), (False, True), (True, True)]


def _operands(rng, m, n, k, ta, tb, dtype, batch=None):
    lead = () if batch is None else (batch,)
    a = rng.standard_normal(lead + ((k, m) if ta else (m, k))).astype(dtype)
    b = rng.standard_normal(lead + ((n, k) if tb else (k, n))).astype(dtype)
    return a, b


@sim
@pytest.mark.parametrize("ta,tb", _TRANS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(37, 33, 19), (34, 36, 20)], ids=["odd", "even"])
def test_matmul_small_tiles(knobs, rng, shape, dtype, ta, tb) -> None:
    # 32x32 tiles: 2x2 blocks, K spans 2 tiles of 16; "even" takes the vector loads
    # where a contiguous dimension is a multiple of 4 (float32; 2 for float64).
    knobs.setattr(_gemm, "force_config", "small")
    m, n, k = shape
    a, b = _operands(rng, m, n, k, ta, tb, dtype)
    _close(cb.matmul(a, b, ta, tb), ref.matmul(a, b, ta, tb))


@sim
@pytest.mark.parametrize("ta,tb", _TRANS)
@pytest.mark.parametrize("config,shape", [
    ("medium", (9, 70, 13)), ("medium", (66, 8, 18)), ("large", (10, 12, 20)),
    ("large", (5, 131, 9)),
])
def test_matmul_medium_and_large_tiles(knobs, rng, config, shape, ta, tb) -> None:
    knobs.setattr(_gemm, "force_config", config)
    m, n, k = shape
    a, b = _operands(rng, m, n, k, ta, tb, np.float32)
    _close(cb.matmul(a, b, ta, tb), ref.matmul(a, b, ta, tb))


@sim
@pytest.mark.parametrize("ta,tb", _TRANS)
@pytest.mark.parametrize("config", ["small", "medium", "large"])
def test_matmul_vector_loads(knobs, rng, config, ta, tb) -> None:
    # Every contiguous dimension a multiple of 4 and aligned NumPy buffers: both
    # operands take the vector path, whose simulator twins (vector.py) raise on any
    # access a GPU would fault on as misaligned. A copy one element into a buffer
    # is misaligned: that operand must fall back to scalar loads, still correct.
    knobs.setattr(_gemm, "force_config", config)
    seen = []
    original = _gemm._gemm_kernel

    def spy(*args):
        seen.append(args[4:6])
        return original(*args)

    knobs.setattr(_gemm, "_gemm_kernel", spy)
    a, b = _operands(rng, 12, 20, 24, ta, tb, np.float32)
    _close(cb.matmul(a, b, ta, tb), ref.matmul(a, b, ta, tb))
    shifted = np.empty(a.size + 1, np.float32)[1:].reshape(a.shape)
    shifted[...] = a
    _close(cb.matmul(shifted, b, ta, tb), ref.matmul(a, b, ta, tb))
    assert seen == [(True, True), (False, True)], seen


@sim
def test_vector_twins_reject_misaligned_access() -> None:
    from fastnn.backends._cuda import vector

    src = np.arange(9, dtype=np.float32)
    dst = np.zeros(4, np.float32)
    vector.load_vec(dst, 0, src, 4, 4)
    np.testing.assert_array_equal(dst, [4, 5, 6, 7])
    with pytest.raises(AssertionError, match="not 16-byte aligned"):
        vector.load_vec(dst, 0, src, 1, 4)
    with pytest.raises(AssertionError, match="not 8-byte aligned"):
        vector.store_vec(src, 3, dst, 0, 2)


@sim
@pytest.mark.parametrize("ta,tb", [(False, False), (True, True)])
def test_matmul_batched(rng, ta, tb) -> None:
    a, b = _operands(rng, 5, 7, 6, ta, tb, np.float64, batch=3)
    _close(cb.matmul(a, b, ta, tb), ref.matmul(a, b, ta, tb))


@sim
def test_matmul_degenerate_shapes(rng) -> None:
    a = np.ones((3, 0), np.float32)
    b = np.ones((0, 4), np.float32)
    _close(cb.matmul(a, b), np.zeros((3, 4), np.float32))
    _close(cb.matmul(np.ones((0, 2)), np.ones((2, 3))), np.zeros((0, 3)))
    a, b = _operands(rng, 1, 1, 1, False, False, np.float32)
    _close(cb.matmul(a, b), ref.matmul(a, b))


@sim
def test_matmul_split_k_automatic(knobs, rng, split_counter) -> None:
    # One 32x32 tile and 13 K tiles: the simulator's 4 "SMs" want split-K.
    knobs.setattr(_gemm, "force_config", "small")
    a, b = _operands(rng, 5, 6, 200, False, True, np.float32)
    _close(cb.matmul(a, b, False, True), ref.matmul(a, b, False, True))
    assert split_counter, "split-K was not taken"


@sim
@pytest.mark.parametrize("splits", [2, 5])
def test_matmul_split_k_forced(knobs, rng, split_counter, splits) -> None:
    knobs.setattr(_gemm, "force_splits", splits)
    a, b = _operands(rng, 3, 40, 70, True, False, np.float64, batch=2)
    _close(cb.matmul(a, b, True, False), ref.matmul(a, b, True, False))
    assert split_counter


@sim
def test_matmul_random_shapes(rng) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    given, settings, st = hypothesis.given, hypothesis.settings, hypothesis.strategies

    @settings(max_examples=8, deadline=None, derandomize=True)
    @given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(0, 40),
           ta=st.booleans(), tb=st.booleans(), batch=st.sampled_from([None, 2]))
    def check(m, n, k, ta, tb, batch):
        a, b = _operands(rng, m, n, k, ta, tb, np.float32, batch)
        _close(cb.matmul(a, b, ta, tb), ref.matmul(a, b, ta, tb))

    check()


# ---- conv2d ----------------------------------------------------------------

# (N, C, H, W, O, KH, KW, stride, padding, dilation, groups, bias)
_CONV_CASES = {
    "basic": (2, 3, 7, 6, 4, 3, 3, (1, 1), (1, 1), (1, 1), 1, True),
    "strided-dilated-groups": (1, 4, 6, 7, 6, 2, 3, (2, 1), (1, 0), (1, 2), 2, False),
    "pointwise": (2, 2, 5, 5, 3, 1, 1, (1, 1), (0, 0), (1, 1), 1, True),
    "depthwise": (1, 3, 5, 4, 3, 3, 2, (2, 2), (2, 1), (1, 1), 3, True),
    "mnist-like": (1, 1, 9, 8, 5, 3, 3, (1, 1), (0, 0), (1, 1), 1, True),
    "wide-filter": (2, 6, 5, 5, 4, 3, 3, (1, 1), (1, 1), (1, 1), 1, False),
}


def _conv_inputs(rng, case, dtype):
    n, c, h, w, o, kh, kw, s, p, d, g, has_bias = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((o, c // g, kh, kw)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype) if has_bias else None
    return x, wt, b, (s, p, d, g)


@sim
@pytest.mark.parametrize("path", ["direct", "im2col", None])
@pytest.mark.parametrize("name", list(_CONV_CASES))
def test_conv2d_forward(knobs, rng, name, path) -> None:
    knobs.setattr(_conv, "force_path", path)
    x, wt, b, geo = _conv_inputs(rng, _CONV_CASES[name], np.float32)
    _close(cb.conv2d(x, wt, b, *geo), ref.conv2d(x, wt, b, *geo))


@sim
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(_CONV_CASES))
def test_conv2d_backward(rng, name, dtype) -> None:
    x, wt, _, geo = _conv_inputs(rng, _CONV_CASES[name], dtype)
    gy = rng.standard_normal(ref.conv2d(x, wt, None, *geo).shape).astype(dtype)
    hw, khw = x.shape[2:], wt.shape[2:]
    _close(cb.conv2d_backward_input(gy, wt, hw, *geo), ref.conv2d_backward_input(gy, wt, hw, *geo))
    _close(cb.conv2d_backward_weight(gy, x, khw, *geo),
           ref.conv2d_backward_weight(gy, x, khw, *geo))


@sim
def test_conv2d_float64_forward(knobs, rng) -> None:
    for path in ("direct", "im2col"):
        knobs.setattr(_conv, "force_path", path)
        x, wt, b, geo = _conv_inputs(rng, _CONV_CASES["strided-dilated-groups"], np.float64)
        _close(cb.conv2d(x, wt, b, *geo), ref.conv2d(x, wt, b, *geo))


@sim
def test_conv2d_chunked_im2col(knobs, rng) -> None:
    # A budget of one sample's columns forces a chunk per sample (and the
    # weight gradient to accumulate across chunks).
    x, wt, b, geo = _conv_inputs(rng, _CONV_CASES["basic"], np.float32)
    knobs.setattr(_conv, "force_path", "im2col")
    knobs.setattr(_conv, "IM2COL_BUDGET_BYTES", 3 * 9 * 42 * 4)
    gy = rng.standard_normal(ref.conv2d(x, wt, None, *geo).shape).astype(np.float32)
    _close(cb.conv2d(x, wt, b, *geo), ref.conv2d(x, wt, b, *geo))
    _close(cb.conv2d_backward_input(gy, wt, (7, 6), *geo),
           ref.conv2d_backward_input(gy, wt, (7, 6), *geo))
    _close(cb.conv2d_backward_weight(gy, x, (3, 3), *geo),
           ref.conv2d_backward_weight(gy, x, (3, 3), *geo))


@sim
def test_conv2d_backward_weight_split_k(rng, split_counter) -> None:
    # A 4x9 weight gradient reduced over 4 samples x 64 pixels: split-K.
    case = (4, 1, 10, 10, 4, 3, 3, (1, 1), (0, 0), (1, 1), 1, False)
    x, wt, _, geo = _conv_inputs(rng, case, np.float32)
    gy = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    _close(cb.conv2d_backward_weight(gy, x, (3, 3), *geo),
           ref.conv2d_backward_weight(gy, x, (3, 3), *geo))
    assert split_counter


@sim
def test_conv_strategy_choice() -> None:
    assert _conv.use_direct(1, 3, 3)  # the MNIST first layer
    assert _conv.use_direct(3, 3, 3)
    assert not _conv.use_direct(32, 3, 3)


# ---- pooling ---------------------------------------------------------------


def _out_hw(hw, k, s, p, d, ceil):
    return tuple(pool_out_size(hw[i], k[i], s[i], p[i], d[i], ceil) for i in range(2))


# (kernel, stride, padding, dilation, ceil_mode)
_MAX_CASES = [
    ((2, 2), (2, 2), (0, 0), (1, 1), False),
    ((3, 3), (2, 2), (1, 1), (1, 1), True),
    ((2, 3), (1, 2), (0, 1), (2, 1), False),
    ((3, 2), (3, 2), (1, 1), (1, 2), True),
]


def _tie_heavy_input(rng, shape, dtype):
    """Small integers (many ties), one NaN and one -inf."""
    x = rng.integers(-2, 3, shape).astype(dtype)
    x.flat[5] = np.nan
    x.flat[-3] = -np.inf
    return x


@sim
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", _MAX_CASES)
def test_max_pool2d(rng, case, dtype) -> None:
    k, s, p, d, ceil = case
    x = _tie_heavy_input(rng, (2, 3, 7, 8), dtype)
    ohw = _out_hw((7, 8), k, s, p, d, ceil)
    _close(cb.max_pool2d(x, k, s, p, d, ohw), ref.max_pool2d(x, k, s, p, d, ohw))
    gy = rng.standard_normal((2, 3) + ohw).astype(dtype)
    _close(cb.max_pool2d_backward(gy, x, k, s, p, d), ref.max_pool2d_backward(gy, x, k, s, p, d))
    y, ind = cb.max_pool2d_with_indices(x, k, s, p, d, ohw)
    want_y, want_ind = ref.max_pool2d_with_indices(x, k, s, p, d, ohw)
    _close(y, want_y)
    assert ind.dtype == np.int64
    np.testing.assert_array_equal(np.asarray(ind), want_ind)


@sim
def test_max_pool2d_with_indices_nan_and_empty_windows() -> None:
    # Two NaNs in a window: the last one is the winner (torch's rule); ties go
    # to the first maximum.
    x = np.array([[[[np.nan, 1, np.nan, 2, 2]]]], np.float32)
    geo = ((1, 3), (1, 1), (0, 1), (1, 1))
    y, ind = cb.max_pool2d_with_indices(x, *geo, (1, 5))
    np.testing.assert_array_equal(np.asarray(ind), [[[[0, 2, 2, 2, 3]]]])
    np.testing.assert_array_equal(np.asarray(ind), ref.max_pool2d_with_indices(x, *geo, (1, 5))[1])
    gy = np.ones((1, 1, 1, 5), np.float32)
    _close(cb.max_pool2d_backward(gy, x, *geo), ref.max_pool2d_backward(gy, x, *geo))
    # 1x1 input, kernel 3, dilation 2, padding 1, ceil_mode: the one window has
    # no real cell: -inf and torch's index 2.
    x = np.ones((1, 1, 1, 1), np.float64)
    y, ind = cb.max_pool2d_with_indices(x, (3, 3), (3, 3), (1, 1), (2, 2), (1, 1))
    assert np.asarray(y)[0, 0, 0, 0] == -np.inf and np.asarray(ind)[0, 0, 0, 0] == 2


@sim
def test_max_pool2d_all_minus_inf_window() -> None:
    # Every cell -inf: outputs -inf and the first real cell gets the gradient.
    x = np.full((1, 1, 3, 3), -np.inf, np.float32)
    args = ((2, 2), (2, 2), (1, 1), (1, 1))
    y = cb.max_pool2d(x, *args, (2, 2))
    _close(y, ref.max_pool2d(x, *args, (2, 2)))
    gy = np.arange(1, 5, dtype=np.float32).reshape(1, 1, 2, 2)
    _close(cb.max_pool2d_backward(gy, x, *args), ref.max_pool2d_backward(gy, x, *args))


# (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
_AVG_CASES = [
    ((2, 2), (2, 2), (0, 0), False, True, None),
    ((3, 3), (2, 2), (1, 1), True, True, None),
    ((3, 3), (2, 2), (1, 1), True, False, None),
    ((3, 2), (2, 3), (1, 1), False, True, 5),
    ((2, 3), (3, 1), (1, 0), True, False, None),
    ((2, 2), (1, 1), (1, 1), True, False, -3),
]


@sim
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", _AVG_CASES)
def test_avg_pool2d(rng, case, dtype) -> None:
    k, s, p, ceil, cip, div = case
    x = rng.standard_normal((2, 3, 7, 8)).astype(dtype)
    ohw = _out_hw((7, 8), k, s, p, (1, 1), ceil)
    _close(cb.avg_pool2d(x, k, s, p, ohw, cip, div), ref.avg_pool2d(x, k, s, p, ohw, cip, div))
    gy = rng.standard_normal((2, 3) + ohw).astype(dtype)
    _close(cb.avg_pool2d_backward(gy, (7, 8), k, s, p, cip, div),
           ref.avg_pool2d_backward(gy, (7, 8), k, s, p, cip, div))


# ---- activations and loss ----------------------------------------------------


@sim
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_and_backward(rng, dtype) -> None:
    x = rng.standard_normal((2, 3, 5)).astype(dtype)
    x.flat[[0, 1, 2]] = [np.nan, -0.0, 0.0]
    y = cb.relu(x)
    _close(y, ref.relu(x))
    g = rng.standard_normal(x.shape).astype(dtype)
    _close(cb.relu_backward(g, y), ref.relu_backward(g, ref.relu(x)))


@sim
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lookup_u8(rng, dtype) -> None:
    images = rng.integers(0, 256, (9, 4, 5), dtype=np.uint8)
    table = rng.standard_normal(256).astype(dtype)
    rows = np.array([8, 0, 0, 3], np.int64)
    got = cb.lookup_u8(images, rows, table)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, ref.lookup_u8(images, rows, table))
    np.testing.assert_array_equal(got, table[images[rows]])
    np.testing.assert_array_equal(cb.lookup_u8(images, None, table), table[images])
    with pytest.raises(TypeError, match="rows"):
        cb.lookup_u8(images, [0], table)


@sim
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,k", [(5, 7), (1, 1), (3, 300)])
def test_softmax_cross_entropy(rng, n, k, dtype) -> None:
    logits = (rng.standard_normal((n, k)) * 8).astype(dtype)
    logits[0, 0] = 80  # exp overflows without the max shift
    labels = rng.integers(0, k, n)
    loss, grad = cb.softmax_cross_entropy(logits, labels)
    want_loss, want_grad = ref.softmax_cross_entropy(logits, labels)
    assert loss.shape == () and loss.dtype == dtype
    _close(loss, want_loss)
    _close(grad, want_grad)


@sim
def test_softmax_cross_entropy_bad_label_and_empty_batch() -> None:
    logits = np.zeros((3, 4), np.float32)
    loss, grad = cb.softmax_cross_entropy(logits, np.array([0, 4, 1]))
    assert np.isnan(loss) and np.isnan(grad[1]).all() and np.isfinite(grad[[0, 2]]).all()
    loss, grad = cb.softmax_cross_entropy(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    assert loss.shape == () and np.isnan(loss) and grad.shape == (0, 4)


# ---- optimizers ----------------------------------------------------------------


@sim
@pytest.mark.parametrize("momentum,nesterov,wd", [
    (0.0, False, 0.0), (0.0, False, 0.01), (0.9, False, 0.0), (0.9, True, 1e-3),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_step(rng, momentum, nesterov, wd, dtype) -> None:
    p = rng.standard_normal((4, 5)).astype(dtype)
    buf = np.zeros_like(p) if momentum else None
    p_ref = p.copy()
    buf_ref = None if buf is None else buf.copy()
    for _ in range(2):  # the second step uses the momentum buffer
        g = rng.standard_normal(p.shape).astype(dtype)
        assert cb.sgd_step(p, g, buf, 0.1, momentum, wd, nesterov) is None
        ref.sgd_step(p_ref, g, buf_ref, 0.1, momentum, wd, nesterov)
    _close(p, p_ref)
    if buf is not None:
        _close(buf, buf_ref)


@sim
@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (0.1, False), (0.1, True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_step(rng, wd, decoupled, dtype) -> None:
    p = rng.standard_normal(11).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    want = [p.copy(), m.copy(), v.copy()]
    for step in (1, 2, 3):
        g = rng.standard_normal(p.shape).astype(dtype)
        cb.adam_step(p, g, m, v, step, 1e-2, 0.9, 0.999, 1e-8, wd, decoupled)
        ref.adam_step(want[0], g, want[1], want[2], step, 1e-2, 0.9, 0.999, 1e-8, wd, decoupled)
    for got, exp in zip((p, m, v), want):
        _close(got, exp)


@sim
def test_multi_tensor_steps(rng) -> None:
    """The per-parameter fallback of the optimizers (the flat launch is the fast path)."""
    shapes = [(3, 2), (5,), (0,)]
    p = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    g = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    m = [np.zeros_like(a) for a in p]
    v = [np.zeros_like(a) for a in p]
    want = [[a.copy() for a in xs] for xs in (p, m, v)]
    cb.adam_step_multi(p, g, m, v, [1, 3, 1], 1e-2, 0.9, 0.999, 1e-8, 0.1, True)
    ref.adam_step_multi(want[0], g, want[1], want[2], [1, 3, 1], 1e-2, 0.9, 0.999, 1e-8, 0.1,
                        True)
    for got, exp in zip(p + m + v, want[0] + want[1] + want[2]):
        _close(got, exp)
    bufs = [np.zeros_like(a) for a in p]
    want_p, want_b = [a.copy() for a in p], [a.copy() for a in bufs]
    cb.sgd_step_multi(p, g, bufs, 0.1, 0.9, 0.0, True)
    ref.sgd_step_multi(want_p, g, want_b, 0.1, 0.9, 0.0, True)
    for got, exp in zip(p + bufs, want_p + want_b):
        _close(got, exp)
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        cb.sgd_step_multi(p, [g[0], g[0], g[2]], None, 0.1, 0.0, 0.0, False)


@sim
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_optimizer_state_subnormals_stored_as_zero(dtype) -> None:
    """As on the other backends: state that decays below the smallest normal is 0."""
    tiny = np.finfo(dtype).tiny
    g = np.array([1.0, 0.0, 0.0], dtype=dtype)
    p = np.ones(3, dtype=dtype)
    m = np.array([0.5, tiny * 1.05, tiny / 4], dtype=dtype)
    v = m.copy()
    cb.adam_step(p, g, m, v, 2, 1e-2, 0.9, 0.999, 1e-8, 0.0, False)
    assert m[0] > 0 and m[1] == 0 and m[2] == 0 and v[1] >= tiny and v[2] == 0
    buf = np.array([0.5, tiny * 1.05, tiny / 4], dtype=dtype)
    cb.sgd_step(p, g, buf, 0.1, 0.5, 0.0, False)
    assert buf[0] > 0 and buf[1] == 0 and buf[2] == 0


# ---- through the public API ------------------------------------------------------


@sim
def test_functional_forced_cuda_backend(rng) -> None:
    """``with fastnn.backend("cuda")`` runs these kernels on NumPy arrays."""
    import fastnn
    from fastnn import functional as F

    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    fc = rng.standard_normal((5, 4 * 5 * 5)).astype(np.float32)
    labels = np.array([1, 4])

    def run():
        y = F.max_pool2d(F.relu(F.conv2d(x, w, None, padding=1)), 2, ceil_mode=True)
        logits = F.linear(y.reshape(2, -1), fc)
        return y, F.softmax_cross_entropy(logits, labels)

    with fastnn.backend("cuda"):
        y, (loss, grad) = run()
    with fastnn.backend("numpy"):
        y_ref, (loss_ref, grad_ref) = run()
    _close(y, y_ref)
    _close(loss, loss_ref)
    _close(grad, grad_ref)


@sim
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_array_ops_through_functional(rng, dtype) -> None:
    """sigmoid/tanh/log_softmax/MSE/dropout/BatchNorm(+ReLU, +ReLU+max pool) pairs on
    the cuda backend (CuPy expressions and pool kernels; NumPy arrays here) against
    numpy_ref, via fastnn.functional."""
    import fastnn
    from fastnn import functional as F

    x = rng.standard_normal((3, 2, 5, 4)).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    w, b = rng.standard_normal(2).astype(dtype), rng.standard_normal(2).astype(dtype)

    def run():
        rm, rv = np.zeros(2, dtype), np.ones(2, dtype)
        y, mean, var = F.batch_norm2d_forward(x, rm, rv, w, b, True)
        bn = (y, rm, rv, *F.batch_norm2d_backward(g, x, w, mean, var, 1e-5, True))
        ev = F.batch_norm2d_forward(x, rm, rv, w, b, False)
        ev_grads = F.batch_norm2d_backward(g, x, w, ev[1], ev[2], 1e-5, False)
        yr, mr, vr = F.batch_norm2d_relu_forward(x, None, None, w, b, True)
        bn_relu = (yr, *F.batch_norm2d_relu_backward(g, x, w, b, mr, vr, 1e-5, True))
        yp, mp, vp, codes = F.batch_norm2d_relu_max_pool2d_forward(
            x, None, None, w, b, True, pool_kernel_size=2, pool_padding=1, return_argmax=True)
        gp = g[:, :, :yp.shape[2], :yp.shape[3]] * 3
        bn_pool = (yp, mp, vp, codes, *F.batch_norm2d_relu_max_pool2d_backward(
            gp, x, w, b, mp, vp, 1e-5, True, pool_kernel_size=2, pool_padding=1, argmax=codes))
        s, t, ls = F.sigmoid(x), F.tanh(x), F.log_softmax(x, 1)
        act = (s, F.sigmoid_backward(g, s), t, F.tanh_backward(g, t), ls,
               F.log_softmax_backward(g, ls, 1))
        mse = (F.mse_loss(x, g), *F.mse_loss_backward(np.asarray(2.0, dtype), x, g))
        drop = F.dropout_forward(x, 0.4, True, np.random.default_rng(3))
        return (*bn, *ev, *ev_grads, *bn_relu, *bn_pool, *act, *mse, *drop,
                F.dropout_backward(g, drop[1]))

    with fastnn.backend("cuda"):
        got = run()
    with fastnn.backend("numpy"):
        want = run()
    assert len(got) == len(want)
    for a, e in zip(got, want):
        assert a.dtype == (np.uint8 if e.dtype == np.uint8 else dtype)
        _close(a, e)
    with pytest.raises(TypeError, match="NumPy arrays"):
        cb.batch_norm2d([[[[1.0]]]], None, None, None, None, 1e-5, True)


@sim
def test_training_step_matches_reference(rng) -> None:
    """conv -> relu -> maxpool -> linear -> CE, backward, SGD: cuda vs numpy_ref."""

    def step(be, params, x, labels):
        w1, w2 = (p.copy() for p in params)
        geo = ((1, 1), (1, 1), (1, 1), 1)
        pool = ((2, 2), (2, 2), (0, 0), (1, 1))
        a = be.relu(be.conv2d(x, w1, None, *geo))
        h = be.max_pool2d(a, *pool, (3, 3))
        flat = h.reshape(x.shape[0], -1)
        logits = be.matmul(flat, w2, False, True)
        loss, gl = be.softmax_cross_entropy(logits, labels)
        gw2 = be.matmul(gl, flat, True, False)
        gflat = be.matmul(gl, w2, False, False)
        gh = be.max_pool2d_backward(gflat.reshape(h.shape), a, *pool)
        ga = be.relu_backward(gh, a)
        gw1 = be.conv2d_backward_weight(ga, x, (3, 3), *geo)
        buf1, buf2 = np.zeros_like(w1), np.zeros_like(w2)
        be.sgd_step(w1, gw1, buf1, 0.1, 0.9, 1e-4, False)
        be.sgd_step(w2, gw2, buf2, 0.1, 0.9, 1e-4, False)
        return loss, w1, w2

    x = rng.standard_normal((3, 1, 6, 6)).astype(np.float32)
    params = (rng.standard_normal((4, 1, 3, 3)).astype(np.float32) * 0.5,
              rng.standard_normal((10, 36)).astype(np.float32) * 0.2)
    labels = np.array([3, 0, 9])
    got = step(cb, params, x, labels)
    want = step(ref, params, x, labels)
    for g, w in zip(got, want):
        _close(g, w)
    assert not np.allclose(got[1], params[0])  # the step did move the weights



# ---- fused linear + ReLU (composed from the cuda ops) -----------------------


@sim
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", [(1, 7, 5), (13, 17, 10), (33, 40, 70)])
def test_linear_relu_matches_reference(rng, m, k, n, dtype) -> None:
    x = rng.standard_normal((m, k)).astype(dtype)
    w = rng.standard_normal((n, k)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype)
    y = cb.linear_relu(x, w, b)
    _close(y, ref.linear_relu(x, w, b))
    assert (y == 0).any() and (y > 0).any()  # both sides of the kink are exercised
    gy = rng.standard_normal((m, n)).astype(dtype)
    got = cb.linear_relu_backward(gy, x, w, y, True, True, True)
    want = ref.linear_relu_backward(gy, x, w, y, True, True, True)
    for g, r in zip(got, want):
        _close(g, r)
    gx, gw, gb = cb.linear_relu_backward(gy, x, w, y, False, True, False)
    assert gx is None and gb is None
    _close(gw, want[1])
