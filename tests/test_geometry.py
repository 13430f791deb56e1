"""fastnn.geometry: one accept/reject policy for conv2d and pooling, everywhere.

A sweep over kernel, stride, padding, dilation, ceil_mode and input sizes down
to 1x1 checks that for everything ``fastnn.functional`` accepts, the ``_C``
bindings (called directly, with ``out_hw`` from the geometry) and ``numpy_ref``
accept it too and agree; and, when torch is installed, that fastnn accepts
exactly what torch accepts and then matches torch's forward and backward.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastnn
import fastnn.functional as F
from fastnn import geometry as G
from fastnn.backends import numpy_ref as R

try:
    from fastnn import _C
except ImportError:  # the native module is not built
    _C = None

try:
    import torch
    import torch.nn.functional as TF
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
BACKENDS = ["numpy"] + (["cpu"] if _C is not None else [])
TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64 throughout

# Square and non-square inputs down to 1x1; per-axis values are drawn from these.
SIZES = [(1, 1), (1, 4), (2, 3), (3, 2), (5, 5), (4, 7)]
KERNELS, STRIDES, PADDINGS, DILATIONS = (1, 2, 3, 4), (None, 1, 2, 3), (0, 1, 2), (1, 2, 3)


def _pool_grid(with_dilation: bool) -> list[tuple]:
    """(input_hw, kernel, stride, padding, dilation, ceil_mode): the full symmetric grid
    plus a deterministic sample of asymmetric (per-axis) arguments."""
    dil = DILATIONS if with_dilation else (1,)
    grid = [(hw, k, s, p, d, c) for hw, k, s, p, d, c in itertools.product(
        SIZES, KERNELS, STRIDES, PADDINGS, dil, (False, True))]
    rng = np.random.default_rng(7)
    for _ in range(300):
        hw = SIZES[rng.integers(len(SIZES))]
        k = tuple(int(v) for v in rng.choice(KERNELS, 2))
        s = tuple(int(v) for v in rng.choice(STRIDES[1:], 2))
        p = tuple(int(v) for v in rng.choice(PADDINGS, 2))
        d = tuple(int(v) for v in rng.choice(dil, 2))
        grid.append((hw, k, s, p, d, bool(rng.integers(2))))
    return grid


MAX_GRID = _pool_grid(True)
AVG_GRID = _pool_grid(False)


def _accepts(fn, *args, **kwargs) -> tuple[bool, object]:
    try:
        return True, fn(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        return False, exc


def _torch_accepts(fn, *args, **kwargs) -> tuple[bool, object]:
    try:
        return True, fn(*args, **kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        return False, exc


def _has_empty_window(hw, g: G.PoolGeometry) -> bool:
    """Whether some window has no real input cell (only with ceil_mode or dilation)."""
    for size, k, s, p, d, out in zip(hw, g.kernel, g.stride, g.padding, g.dilation, g.out_hw):
        for o in range(out):
            if not any(0 <= o * s - p + j * d < size for j in range(k)):
                return True
    return False


def _x(rng, hw, ties: bool = False) -> np.ndarray:
    if ties:  # small integers: many ties, so the first-maximum rule is exercised
        return rng.integers(-2, 3, (2, 3, *hw)).astype(np.float64)
    return rng.standard_normal((2, 3, *hw))


# --------------------------------------------------------------------------
# The geometry functions themselves
# --------------------------------------------------------------------------


def test_argument_forms():
    assert G.as_pair(3, "op", "k", 1) == (3, 3)
    assert G.as_pair((3,), "op", "k", 1) == (3, 3)
    assert G.as_pair([2, 5], "op", "k", 1) == (2, 5)
    assert G.as_pair(np.int32(4), "op", "k", 1) == (4, 4)
    assert G.as_pair((np.int64(1), 2), "op", "k", 0) == (1, 2)
    for bad in (True, 2.0, "2", np.array([2, 2]), None, (1, 2.5)):
        with pytest.raises(TypeError, match="op: k must be an int"):
            G.as_pair(bad, "op", "k", 1)
    for bad in ((), (1, 2, 3), []):
        with pytest.raises(ValueError, match="op: k must be an int or a pair"):
            G.as_pair(bad, "op", "k", 1)
    with pytest.raises(ValueError, match="must be positive"):
        G.as_pair((1, 0), "op", "k", 1)
    with pytest.raises(ValueError, match=r"must be < 2\*\*31"):
        G.as_pair(2**31, "op", "k", 0)
    assert G.pool_stride(None, (2, 3), "op") == (2, 3)
    assert G.pool_stride([], (2, 3), "op") == (2, 3)
    assert G.pool_stride((1,), (2, 3), "op") == (1, 1)


def test_cached_geometry_keeps_every_check():
    """Valid results are cached; look-alikes that hash equal (True for 1, NumPy ints,
    lists) still get their own checks and the same answers."""
    conv = G.conv_geometry("conv2d", (8, 8), (3, 3), 1, 1, 1)
    assert G.conv_geometry("conv2d", (8, 8), (3, 3), 1, 1, 1) is conv  # from the cache
    assert G.conv_geometry("conv2d", (8, 8), (3, 3), np.int64(1), [1, 1], (1, 1)) == conv
    pool = G.pool_geometry("max_pool2d", (8, 8), 2, None, 0, 1, False)
    assert G.pool_geometry("max_pool2d", (8, 8), 2, None, 0, 1, False) is pool
    assert G.pool_geometry("max_pool2d", (8, 8), [2, 2], None, 0, 1, False) == pool
    for kw in ({"stride": True}, {"padding": False}, {"dilation": (1, True)}):
        args = {"stride": 1, "padding": 1, "dilation": 1, **kw}
        with pytest.raises(TypeError, match="must be an int"):
            G.conv_geometry("conv2d", (8, 8), (3, 3), args["stride"], args["padding"],
                            args["dilation"])
    with pytest.raises(TypeError, match="kernel_size must be an int"):
        G.pool_geometry("max_pool2d", (8, 8), True, None, 0, 1, False)
    for _ in range(2):  # errors are raised on every call, never cached
        with pytest.raises(ValueError, match="larger than the padded input"):
            G.conv_geometry("conv2d", (2, 2), (3, 3), 1, 0, 1)


def test_output_sizes_and_same_padding():
    # Floor mode: windows that fit; ceil_mode adds the partial last window
    # unless it would start past the input and its left padding.
    assert G.conv_out_size(5, 3, 2, 0) == 2
    assert G.pool_out_size(5, 2, 2, 0, 1, False) == 2
    assert G.pool_out_size(5, 2, 2, 0, 1, True) == 3
    assert G.pool_out_size(1, 2, 2, 0, 1, True) == 1  # window clipped to a 1x1 input
    assert G.pool_out_size(1, 2, 2, 0, 1, False) == 0
    assert G.pool_out_size(4, 2, 2, 1, 1, True) == 3  # a 4th window would start in padding
    # "same": total d*(k-1), the odd cell after the input.
    assert G.same_padding((3, 4), (1, 1)) == ((1, 1), (0, 1))
    assert G.same_padding((4, 2), (2, 3)) == ((3, 1), (0, 1))


def test_policy_rules():
    with pytest.raises(ValueError, match="at most half of kernel_size"):
        G.pool_geometry("max_pool2d", (9, 9), 3, 1, 2, 2, False)  # half of k, not of d*(k-1)+1
    with pytest.raises(ValueError, match="larger than the padded input 1x1 even with ceil_mode"):
        G.pool_geometry("max_pool2d", (1, 1), 2, 1, 0, 1, True)  # stride 1: no partial window
    g = G.pool_geometry("max_pool2d", (1, 1), 2, None, 0, 1, True)
    assert g.out_hw == (1, 1)
    with pytest.raises(ValueError, match="non-empty height and width"):
        G.pool_geometry("avg_pool2d", (0, 4), 1, 1, 0, 1, False)
    with pytest.raises(ValueError, match="padding='same' requires stride=1"):
        G.conv_geometry("conv2d", (5, 5), (3, 3), (2,), "same", 1)
    g = G.conv_geometry("conv2d", (1, 1), (4, 4), 1, "same", 1)
    assert g.padding == (1, 1) and g.extra == (1, 1) and g.out_hw == (1, 1)
    with pytest.raises(ValueError, match="non-empty height and width"):
        G.conv_geometry("conv2d", (0, 5), (1, 1), 1, 1, 1)


def test_bindings_keep_only_memory_safety_checks(rng):
    """_C accepts geometries that the policy rejects but that are memory-safe."""
    if _C is None:
        pytest.skip("fastnn._C is not built")
    x = rng.standard_normal((1, 2, 7, 7)).astype(np.float32)
    # padding 2 > kernel 3 // 2: rejected by functional (and torch), safe for _C.
    y = _C.max_pool2d(x, (3, 3), (1, 1), (2, 2), (2, 2), (7, 7))
    np.testing.assert_allclose(y, R.max_pool2d(x, (3, 3), (1, 1), (2, 2), (2, 2), (7, 7)))
    with pytest.raises(ValueError, match="max_pool2d: padding must be >= 0"):
        _C.max_pool2d(x, (3, 3), (1, 1), (-1, 0), (1, 1), (5, 5))
    with pytest.raises(ValueError, match=r"out_hw \(9, 3\) does not fit"):
        _C.max_pool2d(x, (2, 2), (2, 2), (0, 0), (1, 1), (9, 3))
    with pytest.raises(ValueError, match="out_hw must be >= 0"):
        _C.avg_pool2d(x, (2, 2), (2, 2), (0, 0), (-1, 3), True, None)


# --------------------------------------------------------------------------
# The sweep: functional, _C and numpy_ref agree on everything functional accepts
# --------------------------------------------------------------------------


def _max_pool_all(x, hw, k, s, p, d, c):
    """Run max_pool2d every way for one configuration; None when functional rejects it."""
    ok, g = _accepts(G.pool_geometry, "max_pool2d", hw, k, s, p, d, c)
    outs = {}
    for be in BACKENDS:
        with fastnn.backend(be):
            acc, res = _accepts(F.max_pool2d, x, k, s, p, d, c, return_indices=True)
        assert acc == ok, (be, hw, k, s, p, d, c, res)
        if acc:
            outs[be] = res
    if not ok:
        return None
    args = (g.kernel, g.stride, g.padding, g.dilation)
    outs["numpy_ref"] = R.max_pool2d_with_indices(x, *args, g.out_hw)
    if _C is not None:
        outs["_C"] = _C.max_pool2d_with_indices(x, *args, g.out_hw)
        np.testing.assert_array_equal(_C.max_pool2d(x, *args, g.out_hw), outs["_C"][0])
    want_y, want_i = outs["numpy_ref"]
    for name, (y, i) in outs.items():
        np.testing.assert_allclose(y, want_y, **TOL, err_msg=name)
        np.testing.assert_array_equal(i, want_i, err_msg=name)
    gy = np.random.default_rng(1).standard_normal(want_y.shape)
    gx = R.max_pool2d_backward(gy, x, *args)
    for be in BACKENDS:
        with fastnn.backend(be):
            np.testing.assert_allclose(F.max_pool2d_backward(gy, x, k, s, p, d, c), gx, **TOL)
    if _C is not None:
        np.testing.assert_allclose(_C.max_pool2d_backward(gy, x, *args), gx, **TOL)
    return g, want_y, want_i, gy, gx


def _avg_pool_all(x, hw, k, s, p, c, cip, div):
    ok, g = _accepts(G.pool_geometry, "avg_pool2d", hw, k, s, p, 1, c)
    outs = {}
    for be in BACKENDS:
        with fastnn.backend(be):
            acc, res = _accepts(F.avg_pool2d, x, k, s, p, c, cip, div)
        assert acc == ok, (be, hw, k, s, p, c, res)
        if acc:
            outs[be] = res
    if not ok:
        return None
    args = (g.kernel, g.stride, g.padding)
    outs["numpy_ref"] = R.avg_pool2d(x, *args, g.out_hw, cip, div)
    if _C is not None:
        outs["_C"] = _C.avg_pool2d(x, *args, g.out_hw, cip, div)
    for name, y in outs.items():
        np.testing.assert_allclose(y, outs["numpy_ref"], **TOL, err_msg=name)
    gy = np.random.default_rng(1).standard_normal(outs["numpy_ref"].shape)
    gx = R.avg_pool2d_backward(gy, hw, *args, cip, div)
    for be in BACKENDS:
        with fastnn.backend(be):
            np.testing.assert_allclose(F.avg_pool2d_backward(gy, x, k, s, p, c, cip, div), gx,
                                       **TOL)
    if _C is not None:
        np.testing.assert_allclose(_C.avg_pool2d_backward(gy, hw, *args, cip, div), gx, **TOL)
    return outs["numpy_ref"], gy, gx


def _conv_all(x, w, b, s, p, d):
    hw, khw = x.shape[2:], w.shape[2:]
    ok, g = _accepts(G.conv_geometry, "conv2d", hw, khw, s, p, d)
    outs = {}
    for be in BACKENDS:
        with fastnn.backend(be):
            acc, res = _accepts(F.conv2d, x, w, b, s, p, d)
        assert acc == ok, (be, hw, khw, s, p, d, res)
        if acc:
            outs[be] = res
    if not ok:
        return None
    # Direct backend calls take symmetric padding: apply "same"'s extra cell first.
    xe = np.pad(x, ((0, 0), (0, 0), (0, g.extra[0]), (0, g.extra[1])))
    args = (g.stride, g.padding, g.dilation, 1)
    outs["numpy_ref"] = R.conv2d(xe, w, b, *args)
    if _C is not None:
        outs["_C"] = _C.conv2d(xe, w, b, *args)
    for name, y in outs.items():
        assert y.shape[2:] == g.out_hw, name
        np.testing.assert_allclose(y, outs["numpy_ref"], **TOL, err_msg=name)
    gy = np.random.default_rng(1).standard_normal(outs["numpy_ref"].shape)
    grads = {}
    for be in BACKENDS:
        with fastnn.backend(be):
            grads[be] = F.conv2d_backward(gy, x, w, s, p, d)
    for be in BACKENDS[1:]:
        for got, want in zip(grads[be], grads["numpy"]):
            np.testing.assert_allclose(got, want, **TOL)
    return outs["numpy_ref"], gy, grads["numpy"]


CONV_GRID = list(itertools.product(
    [(1, 1), (2, 3), (5, 5), (4, 7)], [(1, 1), (2, 2), (3, 3), (2, 3)], [1, 2, (3, 1)],
    [0, 1, 2, "same", "valid", (0, 2)], [1, 2],
))


no_torch_only = pytest.mark.skipif(
    torch is not None, reason="the torch sweeps below run these same checks, and more"
)


@no_torch_only
def test_pool_sweep_backends_agree(rng):
    accepted = 0
    for hw, k, s, p, d, c in MAX_GRID:
        accepted += _max_pool_all(_x(rng, hw, ties=True), hw, k, s, p, d, c) is not None
    for i, (hw, k, s, p, _, c) in enumerate(AVG_GRID):
        cip, div = [(True, None), (False, None), (True, -3)][i % 3]
        accepted += _avg_pool_all(_x(rng, hw), hw, k, s, p, c, cip, div) is not None
    assert 0 < accepted < len(MAX_GRID) + len(AVG_GRID)  # both outcomes are exercised


@no_torch_only
def test_conv_sweep_backends_agree(rng):
    accepted = 0
    for hw, khw, s, p, d in CONV_GRID:
        x, w = rng.standard_normal((2, 3, *hw)), rng.standard_normal((2, 3, *khw))
        accepted += _conv_all(x, w, rng.standard_normal(2), s, p, d) is not None
    assert 0 < accepted < len(CONV_GRID)


# --------------------------------------------------------------------------
# The sweep against torch: same accept/reject, same results
# --------------------------------------------------------------------------


def _t(a: np.ndarray, grad: bool = False):
    return torch.tensor(a, requires_grad=grad)


@pytest.fixture(autouse=True)
def _torch_one_thread():
    """Tiny tensors: torch's thread pool only adds overhead (and the sweep is large)."""
    if torch is None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@needs_torch
def test_max_pool2d_matches_torch(rng):
    torch_backward_skipped = 0
    for hw, k, s, p, d, c in MAX_GRID:
        x = _x(rng, hw, ties=True)
        x.flat[::7] = np.nan  # NaN windows: torch's winner is the last NaN
        tx = _t(x, True)
        t_ok, t_res = _torch_accepts(TF.max_pool2d, tx, k, s, p, d, c, return_indices=True)
        mine = _max_pool_all(x, hw, k, s, p, d, c)
        assert (mine is not None) == t_ok, (hw, k, s, p, d, c, t_res)
        if mine is None:
            continue
        g, y, ind, gy, gx = mine
        np.testing.assert_allclose(y, t_res[0].detach().numpy(), **TOL)
        np.testing.assert_array_equal(ind, t_res[1].numpy())
        if _has_empty_window(hw, g):
            # torch's backward scatters a window with no real cell to its
            # out-of-plane index (heap corruption in torch 2.13), so only
            # the forward and the indices are compared there.
            torch_backward_skipped += 1
            continue
        t_res[0].backward(_t(gy))
        np.testing.assert_allclose(gx, tx.grad.numpy(), **TOL)
    assert torch_backward_skipped < len(MAX_GRID) // 10


@needs_torch
def test_avg_pool2d_matches_torch(rng):
    for i, (hw, k, s, p, _, c) in enumerate(AVG_GRID):
        cip, div = [(True, None), (False, None), (True, -3), (False, 2)][i % 4]
        x = _x(rng, hw)
        tx = _t(x, True)
        t_ok, t_res = _torch_accepts(TF.avg_pool2d, tx, k, s, p, c, cip, div)
        mine = _avg_pool_all(x, hw, k, s, p, c, cip, div)
        assert (mine is not None) == t_ok, (hw, k, s, p, c, t_res)
        if mine is None:
            continue
        y, gy, gx = mine
        np.testing.assert_allclose(y, t_res.detach().numpy(), **TOL)
        t_res.backward(_t(gy))
        np.testing.assert_allclose(gx, tx.grad.numpy(), **TOL)


@needs_torch
def test_conv2d_matches_torch(rng):
    for hw, khw, s, p, d in CONV_GRID:
        x, w, b = (rng.standard_normal((2, 3, *hw)), rng.standard_normal((2, 3, *khw)),
                   rng.standard_normal(2))
        tx, tw, tb = _t(x, True), _t(w, True), _t(b, True)
        t_ok, t_res = _torch_accepts(TF.conv2d, tx, tw, tb, s, p, d)
        mine = _conv_all(x, w, b, s, p, d)
        assert (mine is not None) == t_ok, (hw, khw, s, p, d, t_res)
        if mine is None:
            continue
        y, gy, (gx, gw, gb) = mine
        np.testing.assert_allclose(y, t_res.detach().numpy(), **TOL)
        t_res.backward(_t(gy))
        for got, want in ((gx, tx), (gw, tw), (gb, tb)):
            np.testing.assert_allclose(got, want.grad.numpy(), **TOL)


# Argument forms beyond plain ints: fastnn accepts exactly what torch accepts.
# (Deliberate differences: fastnn also accepts np.bool_ for ceil_mode and
# count_include_pad, and rejects bools inside tuples, which torch reads as ints.)
POOL_FORMS = [
    {"kernel_size": (3,)}, {"kernel_size": [2]}, {"kernel_size": [2, 3]},
    {"kernel_size": np.int64(2)}, {"kernel_size": (2, 2, 2)}, {"kernel_size": ()},
    {"kernel_size": True}, {"kernel_size": 2.0}, {"kernel_size": 0},
    {"kernel_size": 2, "stride": None}, {"kernel_size": 2, "stride": []},
    {"kernel_size": 2, "stride": ()}, {"kernel_size": 2, "stride": (1,)},
    {"kernel_size": 2, "stride": 0}, {"kernel_size": 2, "stride": True},
    {"kernel_size": 2, "padding": (1,)}, {"kernel_size": 2, "padding": []},
    {"kernel_size": 2, "padding": -1}, {"kernel_size": 3, "padding": [1, 0]},
    {"kernel_size": 2, "ceil_mode": 1}, {"kernel_size": 2, "ceil_mode": None},
    {"kernel_size": 2, "ceil_mode": True},
]
MAX_ONLY_FORMS = [
    {"kernel_size": 2, "dilation": (2,)}, {"kernel_size": 2, "dilation": 0},
    {"kernel_size": 2, "dilation": []}, {"kernel_size": 2, "return_indices": 1},
]
AVG_ONLY_FORMS = [
    {"kernel_size": 2, "divisor_override": 0}, {"kernel_size": 2, "divisor_override": -1},
    {"kernel_size": 2, "divisor_override": 2.0}, {"kernel_size": 2, "divisor_override": True},
    {"kernel_size": 2, "divisor_override": np.int64(3)},
    {"kernel_size": 2, "count_include_pad": 1}, {"kernel_size": 2, "count_include_pad": None},
    {"kernel_size": 2, "count_include_pad": False},
]
CONV_FORMS = [
    {"stride": (1,)}, {"stride": [2]}, {"stride": ()}, {"stride": None}, {"stride": True},
    {"stride": np.int64(2)}, {"stride": 2.0}, {"stride": 0}, {"stride": (1, 1, 1)},
    {"padding": (1,)}, {"padding": -1}, {"padding": "same"}, {"padding": "SAME"},
    {"padding": "same", "stride": 2}, {"padding": "same", "stride": (1,)},
    {"padding": "valid", "stride": 2}, {"padding": ["same"]}, {"padding": (1, np.int8(1))},
    {"dilation": (1,)}, {"dilation": 0}, {"groups": 0}, {"groups": True},
    {"groups": np.int64(1)}, {"groups": 2},
]


def _same_outcome(t_fn, f_fn, x, *args, **kwargs):
    t_ok, t_res = _torch_accepts(t_fn, _t(x), *args, **kwargs)
    f_ok, f_res = _accepts(f_fn, x, *args, **kwargs)
    assert f_ok == t_ok, (args, kwargs, t_res, f_res)
    if f_ok:
        t_out = t_res if isinstance(t_res, tuple) else (t_res,)
        f_out = f_res if isinstance(f_res, tuple) else (f_res,)
        for got, want in zip(f_out, t_out):
            np.testing.assert_allclose(got, want.detach().numpy(), **TOL)


@needs_torch
@pytest.mark.parametrize("backend", BACKENDS)
def test_argument_forms_match_torch(rng, backend):
    x = rng.standard_normal((2, 3, 5, 6))
    w = rng.standard_normal((4, 3, 3, 3))
    with fastnn.backend(backend):
        for kw in POOL_FORMS + MAX_ONLY_FORMS:
            _same_outcome(TF.max_pool2d, F.max_pool2d, x, **kw)
        for kw in POOL_FORMS + AVG_ONLY_FORMS:
            _same_outcome(TF.avg_pool2d, F.avg_pool2d, x, **kw)
        for kw in CONV_FORMS:
            _conv_form(x, w, kw)
        # Empty dimensions: pools take only an empty batch; conv2d also an empty
        # channel axis, never an empty height or width, and needs output channels.
        for shape in [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4), (0, 4, 4), (3, 4, 0)]:
            _same_outcome(TF.max_pool2d, F.max_pool2d, np.zeros(shape), 2)
            _same_outcome(TF.avg_pool2d, F.avg_pool2d, np.zeros(shape), 2)
        for xs, ws in [((0, 3, 4, 4), (2, 3, 3, 3)), ((2, 0, 4, 4), (2, 0, 3, 3)),
                       ((0, 4, 4), (2, 0, 3, 3)), ((2, 3, 0, 4), (2, 3, 1, 1)),
                       ((2, 3, 4, 4), (0, 3, 3, 3)), ((2, 3, 4, 4), (2, 3, 0, 3))]:
            _conv_form(np.zeros(xs), np.zeros(ws), {"padding": 1})


def _conv_form(x, w, kw):
    t_ok, t_res = _torch_accepts(TF.conv2d, _t(x), _t(w), **kw)
    f_ok, f_res = _accepts(F.conv2d, x, w, **kw)
    assert f_ok == t_ok, (x.shape, w.shape, kw, t_res, f_res)
    if f_ok and x.shape[-3] == 0:
        # torch returns (N, 0, OH, OW) for an empty channel axis; fastnn the
        # mathematically right (N, O, OH, OW) of bias-only outputs.
        assert f_res.shape[-2:] == tuple(t_res.shape[-2:]) and not f_res.any()
    elif f_ok:
        np.testing.assert_allclose(f_res, t_res.numpy(), **TOL)
