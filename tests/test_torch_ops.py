"""fastnn's custom ops in torch (``fastnn.torch``): opcheck, gradcheck, equality with
torch's own ops, the CUDA path (``gpu``), and that torch stays optional."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import PKG_ROOT

torch = pytest.importorskip("torch", reason="torch is not installed")
import fastnn.torch  # noqa: E402,F401 - registers torch.ops.fastnn.*

ops = torch.ops.fastnn
tf = torch.nn.functional
DTYPES = [torch.float32, torch.float64]


def _t(*shape, dtype=torch.float64, rg=False, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(rg)


# op name -> (inputs builder(dtype, requires_grad, device), torch reference or None).
# Geometry mixes strides, padding, dilation, groups, ceil_mode and an unbatched input.
def _samples(dtype, rg, device="cpu"):
    def t(*s, grad=rg):
        return _t(*s, dtype=dtype, rg=grad, device=device)

    conv_geo = ([2, 1], [1, 0], [1, 2], 2)
    pool = ([3, 2], [2, 1], [1, 0], [1, 1], True)
    return {
        "conv2d": [
            ((t(2, 4, 9, 8), t(6, 2, 3, 3), t(6), *conv_geo),
             lambda x, w, b, *g: tf.conv2d(x, w, b, *g)),
            ((t(3, 7, 7), t(5, 3, 2, 2), None, [1, 1], [0, 0], [1, 1], 1),
             lambda x, w, b, *g: tf.conv2d(x, w, b, *g)),
        ],
        "conv2d_relu_max_pool2d": [
            ((t(2, 3, 10, 9), t(4, 3, 3, 3), t(4), [1, 1], [1, 1], [1, 1], 1,
              [2, 2], [2, 2], [0, 0], [1, 1], False),
             lambda x, w, b, s, p, d, g, *pl: tf.max_pool2d(
                 torch.relu(tf.conv2d(x, w, b, s, p, d, g)), *pl)),
            ((t(1, 2, 11, 11), t(4, 1, 3, 3), None, [2, 2], [0, 0], [1, 1], 2,
              [3, 3], [2, 2], [1, 1], [1, 1], True),
             lambda x, w, b, s, p, d, g, *pl: tf.max_pool2d(
                 torch.relu(tf.conv2d(x, w, b, s, p, d, g)), *pl)),
        ],
        "max_pool2d": [((t(2, 3, 9, 8), *pool), lambda x, *a: tf.max_pool2d(x, *a))],
        "max_pool2d_with_indices": [
            ((t(2, 3, 9, 8), [2, 2], [], [0, 0], [2, 1], False),
             lambda x, *a: tf.max_pool2d(x, *a, return_indices=True)),
        ],
        "avg_pool2d": [
            ((t(2, 3, 9, 8), [3, 3], [2, 2], [1, 1], True, False, None),
             lambda x, *a: tf.avg_pool2d(x, *a)),
            ((t(3, 8, 8), [2, 2], [], [0, 0], False, True, 3),
             lambda x, *a: tf.avg_pool2d(x, *a)),
        ],
        "linear": [
            ((t(5, 7), t(3, 7), t(3)), tf.linear),
            ((t(2, 4, 7), t(3, 7), None), tf.linear),
        ],
        "linear_relu": [
            ((t(5, 7), t(3, 7), t(3)), lambda x, w, b: torch.relu(tf.linear(x, w, b))),
            ((t(2, 4, 7), t(3, 7), None), lambda x, w, b: torch.relu(tf.linear(x, w, b))),
        ],
        "cross_entropy": [
            ((t(6, 4), torch.randint(0, 4, (6,), device=device)), _cross_entropy_ref),
            ((t(1, 1), torch.zeros(1, dtype=torch.int64, device=device)), _cross_entropy_ref),
        ],
        "matmul": [((t(4, 5), t(5, 3)), torch.matmul), ((t(2, 4, 5), t(5, 3)), torch.matmul),
                   ((t(2, 4, 5), t(2, 5, 3)), torch.matmul)],
    }


def _cross_entropy_ref(x, target):
    """torch's loss, and its gradient (which fastnn's op returns with it)."""
    grad = (torch.softmax(x, 1) - tf.one_hot(target, x.shape[1]).to(x.dtype)) / x.shape[0]
    return tf.cross_entropy(x, target), grad.detach()


def _backward_samples(dtype, rg):
    """Inputs for the *_backward ops (opcheck them too: they are registered ops)."""
    def t(*s):
        return _t(*s, dtype=dtype, rg=rg)

    geo = ([1, 1], [1, 1], [1, 1], 1)
    pool = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    return {
        "conv2d_backward": (t(2, 4, 6, 6), t(2, 3, 6, 6), t(4, 3, 3, 3), *geo,
                            [True, True, False]),
        "conv2d_relu_max_pool2d_backward": (t(2, 4, 3, 3), t(2, 3, 6, 6), t(4, 3, 3, 3), t(4),
                                            *geo, *pool, [False, True, True]),
        "max_pool2d_backward": (t(2, 3, 3, 3), t(2, 3, 6, 6), *pool),
        "avg_pool2d_backward": (t(2, 3, 3, 3), t(2, 3, 6, 6), [2, 2], [2, 2], [0, 0], False,
                                True, None),
        "linear_backward": (t(5, 3), t(5, 7), t(3, 7), [True, True, True]),
        "linear_relu_backward": (t(5, 3), t(5, 7), t(3, 7), t(5, 3).relu(), [True, False, True]),
        "matmul_backward": (t(4, 3), t(4, 5), t(5, 3)),
        "cross_entropy_backward": (t(1).reshape(()), t(6, 4)),
    }


FORWARD_OPS = sorted(_samples(torch.float64, False))
BACKWARD_OPS = sorted(_backward_samples(torch.float64, False))


def test_every_registered_op_is_covered():
    registered = {name for name in dir(ops) if not name.startswith("_")} - {"name"}
    ours = set(fastnn.torch.ops.__all__)
    assert ours <= registered
    assert ours == set(FORWARD_OPS) | set(BACKWARD_OPS)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", FORWARD_OPS)
def test_opcheck_forward(name, dtype, requires_grad):
    for args, _ in _samples(dtype, requires_grad)[name]:
        torch.library.opcheck(getattr(ops, name), args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", BACKWARD_OPS)
def test_opcheck_backward_ops(name, dtype):
    # requires_grad off only: the backward ops have no autograd formula of their
    # own (no double backward), which the next test pins down.
    torch.library.opcheck(getattr(ops, name), _backward_samples(dtype, False)[name])


def test_double_backward_is_refused_not_wrong():
    x = _t(1, 2, 5, 5, rg=True)
    w = _t(3, 2, 3, 3, rg=True)
    y = ops.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 1)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        gx.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", FORWARD_OPS)
def test_forward_and_grads_equal_torch(name, dtype):
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    for args, ref in _samples(dtype, True)[name]:
        ref_args = [a.detach().clone().requires_grad_(a.requires_grad)
                    if isinstance(a, torch.Tensor) else a for a in args]
        got, want = getattr(ops, name)(*args), ref(*ref_args)
        got, want = (got if isinstance(got, tuple) else (got,)), (
            want if isinstance(want, tuple) else (want,))
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            torch.testing.assert_close(g, w, **tol)
        gy = torch.randn_like(want[0])
        got[0].backward(gy)
        want[0].backward(gy)
        for a, r in zip(args, ref_args):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a.grad, r.grad, **tol)


@pytest.mark.parametrize("name", FORWARD_OPS)
def test_gradcheck_float64(name):
    for args, _ in _samples(torch.float64, True)[name]:
        fn = getattr(ops, name)

        def first(*a, fn=fn):
            out = fn(*a)
            return out[0] if isinstance(out, tuple) else out

        if name.startswith("max_pool2d") or name == "conv2d_relu_max_pool2d":
            # Ties inside a window make max pooling non-differentiable; spread values.
            args = (_spread(args[0]), *args[1:])
        assert torch.autograd.gradcheck(first, args, eps=1e-6, atol=1e-5)


def _spread(x):
    n = x.numel()
    vals = torch.randperm(n, dtype=torch.float64) / n
    return vals.reshape(x.shape).requires_grad_()


def test_masked_gradients_are_not_computed():
    x, w = _t(2, 3, 6, 6, rg=False), _t(4, 3, 3, 3, rg=True)
    ops.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 1).sum().backward()
    assert x.grad is None and w.grad is not None


def test_ops_reject_bad_input_with_named_errors():
    with pytest.raises(TypeError, match="weight"):
        ops.conv2d(_t(1, 1, 5, 5), _t(1, 1, 3, 3, dtype=torch.float32), None, [1, 1], [0, 0],
                   [1, 1], 1)
    with pytest.raises(ValueError, match="stride"):
        ops.max_pool2d(_t(1, 1, 5, 5), [2, 2], [0, 0], [0, 0], [1, 1], False)


def test_cpu_path_copies_nothing(monkeypatch):
    """Inputs reach fastnn as views of the tensors; the result is fastnn's array."""
    seen = {}
    real = fastnn.functional.linear

    def spy(x, weight, bias=None):
        seen["x"], seen["y"] = x, real(x, weight, bias)
        return seen["y"]

    monkeypatch.setattr(fastnn.functional, "linear", spy)
    x = _t(4, 3, rg=True)
    y = ops.linear(x, _t(2, 3), None)
    assert seen["x"].ctypes.data == x.data_ptr()
    assert seen["y"].ctypes.data == y.data_ptr()


def test_import_fastnn_does_not_import_torch():
    code = "import sys, fastnn, fastnn.functional, fastnn.nn; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PKG_ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_fastnn_torch_without_torch_says_how_to_install():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n import fastnn.torch\nexcept ImportError as e:\n print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PKG_ROOT, check=True)
    assert 'pip install "fastnn[torch]"' in out.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("name", FORWARD_OPS)
def test_cuda_tensors_run_on_the_cuda_backend(name):
    for args, ref in _samples(torch.float32, True, device="cuda")[name]:
        ref_args = [a.detach().clone().requires_grad_(a.requires_grad)
                    if isinstance(a, torch.Tensor) else a for a in args]
        got, want = getattr(ops, name)(*args), ref(*ref_args)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        for g, w in zip(got, want):
            assert g.device.type == "cuda"
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        got[0].sum().backward()
        want[0].sum().backward()
        for a, r in zip(args, ref_args):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-4)
