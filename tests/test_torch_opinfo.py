"""PyTorch's own OpInfo sample inputs, run through ``fastnn.functional`` against torch.

Entries: nn.functional.conv2d, nn.functional.max_pool2d (return_indices
included), nn.functional.avg_pool2d, nn.functional.linear, mm and bmm, in
float32 and float64 (about 3,000 samples). Every sample must be either accepted
by both and equal (forward, and backward: torch autograd's grads against
fastnn's ``*_backward`` with the same grad_out), or rejected by both. Samples
using a feature fastnn deliberately lacks are listed in ``UNSUPPORTED`` and
must not occur silently: each is counted and reported.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastnn.functional as F

torch = pytest.importorskip("torch", reason="torch is not installed")
try:
    from torch.testing._internal.common_methods_invocations import op_db
except ImportError as exc:  # e.g. the `expecttest` package (the `test` extra) is missing
    pytest.skip(f"torch's OpInfo database does not import: {exc}", allow_module_level=True)

DTYPES = {torch.float32: {"rtol": 2e-5, "atol": 2e-5}, torch.float64: {"rtol": 1e-10,
                                                                        "atol": 1e-12}}

# Features torch's op accepts that fastnn deliberately does not have, by op:
# (predicate on the sample, reason). None is needed for these entries today;
# a sample that lands here is counted, never compared, and listed in the output.
UNSUPPORTED: dict[str, list[tuple]] = {
    "nn.functional.conv2d": [],
    "nn.functional.max_pool2d": [],
    "nn.functional.avg_pool2d": [],
    "nn.functional.linear": [],
    "mm": [],
    "bmm": [],
}


def _np(t) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()


def _conv(x, w, b=None, **kw):
    y = F.conv2d(x, w, b, **kw)
    args = {k: kw[k] for k in ("stride", "padding", "dilation", "groups") if k in kw}

    def backward(gy):
        return F.conv2d_backward(gy, x, w, **args)[: 2 if b is None else 3]

    return y, backward


def _max_pool(x, *args, **kw):
    kw = {**dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                      "return_indices"), args)), **kw}
    out = F.max_pool2d(x, **kw)
    kw.pop("return_indices", None)
    return out, lambda gy: (F.max_pool2d_backward(gy, x, **kw),)


def _avg_pool(x, *args, **kw):
    y = F.avg_pool2d(x, *args, **kw)
    return y, lambda gy: (F.avg_pool2d_backward(gy, x, *args, **kw),)


def _linear(x, w, b=None):
    y = F.linear(x, w, b)
    return y, lambda gy: F.linear_backward(gy, x, w)[: 2 if b is None else 3]


def _matmul(a, b):
    return F.matmul(a, b), lambda gy: F.matmul_backward(gy, a, b)


RUNNERS = {
    "nn.functional.conv2d": _conv,
    "nn.functional.max_pool2d": _max_pool,
    "nn.functional.avg_pool2d": _avg_pool,
    "nn.functional.linear": _linear,
    "mm": _matmul,
    "bmm": _matmul,
}


def _leaf(t):
    # A fresh leaf that requires grad (some samples' inputs do not), same strides.
    return t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t


def _torch_run(op, sample):
    """(torch's forward output(s), the tensor inputs as leaves), or (None, the exception)."""
    leaves = [_leaf(sample.input)] + [_leaf(a) for a in sample.args]
    try:
        out = op(*leaves, **sample.kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        return None, exc
    return out, [t for t in leaves if isinstance(t, torch.Tensor)]


def _check(op, sample, tol, rng) -> str:
    """'ok', 'rejected' (by both) or 'unsupported'; raises AssertionError on a mismatch."""
    for pred, _reason in UNSUPPORTED[op.name]:
        if pred(sample):
            return "unsupported"
    t_out, leaves = _torch_run(op, sample)
    t_exc = None if t_out is not None else leaves
    np_args = [_np(a) if isinstance(a, torch.Tensor) else a for a in sample.args]
    try:
        f_out, backward = RUNNERS[op.name](_np(sample.input), *np_args, **sample.kwargs)
    except (ValueError, TypeError) as exc:
        assert t_exc is not None, f"fastnn spuriously rejected a sample torch accepts: {exc}"
        return "rejected"
    assert t_exc is None, f"fastnn accepted a sample torch rejects ({t_exc})"
    t_y = t_out[0] if isinstance(t_out, tuple) else t_out
    f_y = f_out[0] if isinstance(f_out, tuple) else f_out
    assert isinstance(f_out, tuple) == isinstance(t_out, tuple)
    assert f_y.dtype == _np(t_y).dtype and f_y.shape == tuple(t_y.shape)
    np.testing.assert_allclose(f_y, _np(t_y), **tol)
    if isinstance(t_out, tuple):  # max_pool2d's indices
        assert f_out[1].dtype == np.int64
        np.testing.assert_array_equal(f_out[1], _np(t_out[1]))
    gy = rng.standard_normal(f_y.shape).astype(f_y.dtype)
    grads = torch.autograd.grad(t_y, leaves, torch.from_numpy(gy), allow_unused=True)
    for got, want in zip(backward(gy), grads):
        want = np.zeros(got.shape, got.dtype) if want is None else _np(want)
        np.testing.assert_allclose(got, want, **tol)
    return "ok"


@pytest.fixture(autouse=True)
def _torch_one_thread():
    """Small tensors: torch's thread pool only adds overhead here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ops():
    return [op for op in op_db if op.name in RUNNERS]


@pytest.mark.parametrize("op", _ops(), ids=lambda op: op.name + (
    "." + op.variant_test_name if op.variant_test_name else ""))
def test_opinfo_samples_match_torch(op):
    rng = np.random.default_rng(0)
    counts = {"ok": 0, "rejected": 0, "unsupported": 0}
    failures = []
    for dtype, tol in DTYPES.items():
        for i, sample in enumerate(op.sample_inputs("cpu", dtype, requires_grad=True)):
            try:
                counts[_check(op, sample, tol, rng)] += 1
            except AssertionError as exc:
                failures.append(f"{dtype} sample {i}: {sample.input.shape} {sample.args} "
                                f"{sample.kwargs}: {str(exc)[:300]}")
    print(f"{op.name}: {counts}")
    assert not failures, f"{len(failures)} wrong or spuriously rejected:\n" + "\n".join(
        failures[:10])
    assert counts["ok"] > 0
    assert counts["unsupported"] == 0, "a sample uses a feature listed in UNSUPPORTED"
