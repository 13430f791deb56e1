"""Autograd: gradcheck of every Function on the host backends, graph mechanics
(topological order, accumulation, aliasing, retain_graph), grad modes, handlers."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import fastnn
import fastnn.functional as F
from fastnn import autograd as ag
from fastnn.autograd import Function, Tensor, enable_grad, is_grad_enabled, no_grad
from fastnn.gradcheck import GradcheckError, gradcheck


@pytest.fixture
def backend(host_backend):
    with fastnn.backend(host_backend):
        yield host_backend


def leaf(rng, *shape, scale=1.0, positive=False):
    a = rng.standard_normal(shape) * scale
    if positive:
        a = np.abs(a) + 0.5
    return Tensor(a, requires_grad=True)


# --------------------------------------------------------------------------
# gradcheck of every Function (float64; numpy and cpu backends)
# --------------------------------------------------------------------------

BINARY_SHAPES = [((2, 3), (2, 3)), ((2, 3), (3,)), ((4, 1, 3), (2, 1)), ((), (2, 2))]


@pytest.mark.parametrize("sa,sb", BINARY_SHAPES)
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_gradcheck_binary_broadcasting(backend, rng, op, sa, sb):
    a = leaf(rng, *sa)
    b = leaf(rng, *sb, positive=(op == "div"))
    fn = {
        "add": lambda a, b: a + b,
        "sub": lambda a, b: a - b,
        "mul": lambda a, b: a * b,
        "div": lambda a, b: a / b,
    }[op]
    assert gradcheck(fn, [a, b])


@pytest.mark.parametrize("op", ["radd", "rsub", "rmul", "rdiv", "neg", "pow", "exp", "log",
                                "abs"])
def test_gradcheck_unary_and_scalar(backend, rng, op):
    x = leaf(rng, 2, 3, positive=op in ("log", "rdiv", "pow", "abs"))
    c = rng.standard_normal((2, 3))
    fn = {
        "radd": lambda x: 2.5 + x + c,
        "rsub": lambda x: 1.0 - x - c,
        "rmul": lambda x: c * (3.0 * x),
        "rdiv": lambda x: c / x,
        "neg": lambda x: -x,
        "pow": lambda x: x**2.5,
        "exp": lambda x: x.exp(),
        "log": lambda x: x.log(),
        "abs": lambda x: (x * np.where(c > 0, 1.0, -1.0)).abs(),
    }[op]
    assert gradcheck(fn, [x])


@pytest.mark.parametrize("kind", ["reshape", "flatten", "transpose", "T", "getitem", "fancy"])
def test_gradcheck_shape_ops(backend, rng, kind):
    x = leaf(rng, 2, 3, 4)
    fn = {
        "reshape": lambda x: x.reshape(4, -1) * 2.0,
        "flatten": lambda x: x.flatten(1),
        "transpose": lambda x: x.transpose(2, 0, 1),
        "T": lambda x: x.reshape(6, 4).T,
        "getitem": lambda x: x[1, :, 1:3],
        # repeated indices must add up, not overwrite
        "fancy": lambda x: x[np.array([0, 1, 0])],
    }[kind]
    assert gradcheck(fn, [x])


@pytest.mark.parametrize("axis", [None, 0, (0, 2), -1])
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("red", ["sum", "mean"])
def test_gradcheck_reductions(backend, rng, red, axis, keepdims):
    x = leaf(rng, 2, 3, 2)
    assert gradcheck(lambda x: getattr(x, red)(axis=axis, keepdims=keepdims), [x])


@pytest.mark.parametrize("sa,sb", [((3, 4), (4, 2)), ((2, 3, 4), (2, 4, 2)),
                                   ((2, 3, 4), (4, 2)), ((1, 3, 4), (2, 4, 2))])
def test_gradcheck_matmul(backend, rng, sa, sb):
    a, b = leaf(rng, *sa), leaf(rng, *sb)
    assert gradcheck(lambda a, b: a @ b, [a, b])
    assert gradcheck(lambda a, b: F.matmul(a, b), [a, b])


def test_gradcheck_matmul_one_side_constant(backend, rng):
    a = leaf(rng, 3, 4)
    b = rng.standard_normal((4, 2))
    assert gradcheck(lambda a: a @ b, [a])
    assert gradcheck(lambda a: b.T @ a.T, [a])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("xshape", [(3, 4), (2, 3, 4)])
def test_gradcheck_linear(backend, rng, bias, xshape):
    x, w = leaf(rng, *xshape), leaf(rng, 5, 4)
    b = leaf(rng, 5) if bias else None
    if bias:
        assert gradcheck(lambda x, w, b: F.linear(x, w, b), [x, w, b])
    else:
        assert gradcheck(lambda x, w: F.linear(x, w), [x, w])


@pytest.mark.parametrize(
    "cfg",
    [
        dict(stride=1, padding=0, dilation=1, groups=1, bias=True),
        dict(stride=2, padding=1, dilation=1, groups=1, bias=True),
        dict(stride=1, padding=2, dilation=2, groups=1, bias=False),
        dict(stride=(2, 1), padding=(0, 1), dilation=1, groups=2, bias=True),
        dict(stride=1, padding="same", dilation=1, groups=1, bias=True, k=(2, 3)),
    ],
)
def test_gradcheck_conv2d(backend, rng, cfg):
    cfg = dict(cfg)
    kh, kw = cfg.pop("k", (3, 3))
    use_bias = cfg.pop("bias")
    g = cfg["groups"]
    x = leaf(rng, 2, 2, 5, 5)
    w = leaf(rng, 4, 2 // g, kh, kw)
    if use_bias:
        b = leaf(rng, 4)
        assert gradcheck(lambda x, w, b: F.conv2d(x, w, b, **cfg), [x, w, b])
    else:
        assert gradcheck(lambda x, w: F.conv2d(x, w, None, **cfg), [x, w])


@pytest.mark.parametrize(
    "cfg",
    [
        dict(kernel_size=2),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=2, stride=2, ceil_mode=True),
        dict(kernel_size=2, stride=1, dilation=2),
    ],
)
def test_gradcheck_max_pool2d(backend, rng, cfg):
    # distinct values: gradcheck across a tie would be ill-defined
    x = Tensor(rng.permutation(2 * 2 * 5 * 5).reshape(2, 2, 5, 5) * 0.1, requires_grad=True)
    assert gradcheck(lambda x: F.max_pool2d(x, **cfg), [x])


@pytest.mark.parametrize(
    "cfg",
    [
        dict(kernel_size=2),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
        dict(kernel_size=2, divisor_override=3),
    ],
)
def test_gradcheck_avg_pool2d(backend, rng, cfg):
    x = leaf(rng, 2, 2, 5, 5)
    assert gradcheck(lambda x: F.avg_pool2d(x, **cfg), [x])


@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh"])
def test_gradcheck_activations(backend, rng, name):
    x = Tensor(rng.uniform(0.05, 2, (3, 4)) * rng.choice([-1.0, 1.0], (3, 4)), requires_grad=True)
    fn = getattr(F, name)
    assert gradcheck(lambda x: fn(x), [x])
    assert gradcheck(lambda x: getattr(x, name)(), [x])


@pytest.mark.parametrize("dim", [-1, 0])
def test_gradcheck_log_softmax(backend, rng, dim):
    x = leaf(rng, 3, 4)
    assert gradcheck(lambda x: F.log_softmax(x, dim=dim), [x])


def test_gradcheck_cross_entropy(backend, rng):
    x = leaf(rng, 5, 4, scale=2.0)
    labels = rng.integers(0, 4, 5)
    assert gradcheck(lambda x: F.cross_entropy(x, labels), [x])
    assert gradcheck(lambda x: F.cross_entropy(x * 2.0, Tensor(labels)) * 3.0, [x])


def test_cross_entropy_matches_log_softmax(backend, rng):
    x = leaf(rng, 6, 3)
    labels = rng.integers(0, 3, 6)
    loss = F.cross_entropy(x, labels)
    loss.backward()
    g1 = x.grad.copy()
    x.zero_grad()
    ref = -(F.log_softmax(x)[np.arange(6), labels]).mean()
    ref.backward()
    np.testing.assert_allclose(loss.item(), ref.item(), rtol=1e-12)
    np.testing.assert_allclose(g1, x.grad, rtol=1e-10, atol=1e-14)


def test_gradcheck_mse_loss(backend, rng):
    a, b = leaf(rng, 3, 4), leaf(rng, 3, 4)
    assert gradcheck(lambda a, b: F.mse_loss(a, b), [a, b])
    c = rng.standard_normal((3, 4))
    assert gradcheck(lambda a: F.mse_loss(c, a), [a])


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_gradcheck_dropout(backend, rng, p):
    x = leaf(rng, 4, 5)
    # a fresh generator with the same seed each call, so every evaluation drops the same cells
    assert gradcheck(lambda x: F.dropout(x, p, True, np.random.default_rng(7)), [x])


def test_dropout_matches_functional_and_scales(backend, rng):
    x = rng.standard_normal((50, 40))
    y_t = F.dropout(Tensor(x, requires_grad=True), 0.25, True, np.random.default_rng(3))
    y_a = F.dropout(x, 0.25, True, np.random.default_rng(3))
    np.testing.assert_array_equal(y_t.data, y_a)
    kept = y_a != 0
    np.testing.assert_allclose(y_a[kept], x[kept] / 0.75)
    assert 0.15 < 1 - kept.mean() < 0.35
    y_eval = F.dropout(Tensor(x, requires_grad=True), 0.25, False)
    np.testing.assert_array_equal(y_eval.data, x)


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_batch_norm_train(backend, rng, affine):
    x = leaf(rng, 3, 2, 2, 3)
    w, b = (leaf(rng, 2), leaf(rng, 2)) if affine else (None, None)

    def fn(x, w=None, b=None):
        return ag.batch_norm2d(x, None, None, w, b, training=True)

    assert gradcheck(fn, [x, w, b] if affine else [x])


def test_gradcheck_batch_norm_eval(backend, rng):
    x, w, b = leaf(rng, 2, 3, 2, 2), leaf(rng, 3), leaf(rng, 3)
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    assert gradcheck(lambda x, w, b: ag.batch_norm2d(x, rm, rv, w, b, training=False), [x, w, b])


def test_gradcheck_composite_network(backend, rng):
    x = Tensor(rng.standard_normal((2, 1, 6, 6)))  # data: no grad
    w1, b1 = leaf(rng, 3, 1, 3, 3), leaf(rng, 3)
    w2, b2 = leaf(rng, 4, 12, scale=0.5), leaf(rng, 4)
    labels = np.array([1, 3])

    def net(w1, b1, w2, b2):
        h = F.max_pool2d(F.relu(F.conv2d(x, w1, b1)), 2)
        return F.cross_entropy(F.linear(h.flatten(1), w2, b2), labels)

    assert gradcheck(net, [w1, b1, w2, b2])


# --------------------------------------------------------------------------
# gradcheck itself
# --------------------------------------------------------------------------


class _WrongSquare(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        gx = 2 * x * g
        gx.reshape(-1)[-1] *= 1.5  # one wrong element
        return gx


def test_gradcheck_reports_wrong_gradient(rng):
    x = leaf(rng, 2, 3, positive=True)
    with pytest.raises(GradcheckError, match=r"input 0 .*index \(1, 2\)"):
        gradcheck(lambda x: _WrongSquare.apply(x), [x])
    with pytest.warns(RuntimeWarning, match="input 0"):
        assert gradcheck(lambda x: _WrongSquare.apply(x), [x], raise_exception=False) is False


def test_gradcheck_rejects_float32_and_no_inputs(rng):
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda x: x * 2, [Tensor(np.ones(3, np.float32), requires_grad=True)])
    with pytest.raises(ValueError, match="requires_grad"):
        gradcheck(lambda x: x * 2, [Tensor(np.ones(3))])


def test_fastnn_gradcheck_is_callable_even_after_importing_the_submodule():
    import fastnn.gradcheck  # noqa: F401 - rebinds the package attribute to the module

    assert fastnn.gradcheck(lambda x: x * x, [Tensor(np.ones(2), requires_grad=True)])


def test_gradcheck_restores_inputs_and_grads(rng):
    x = leaf(rng, 3)
    before = x.data.copy()
    x.grad = np.full(3, 7.0)
    assert gradcheck(lambda x: x * x, [x])
    np.testing.assert_array_equal(x.data, before)
    np.testing.assert_array_equal(x.grad, np.full(3, 7.0))


# --------------------------------------------------------------------------
# graph mechanics
# --------------------------------------------------------------------------


class _Counted(Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        _Counted.calls += 1
        return g


def test_diamond_graph_runs_each_node_once_after_all_its_grads():
    _Counted.calls = 0
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    s = _Counted.apply(x)  # shared node: both branches feed it
    a = s * 2.0
    b = s * s
    c = (a + b) * 3.0 + a  # a is used twice too
    c.sum().backward()
    # d/dx [3(2x + x^2) + 2x] = 6 + 6x + 2
    np.testing.assert_allclose(x.grad, 8 + 6 * x.data)
    assert _Counted.calls == 1


def test_deep_chain_does_not_recurse():
    x = Tensor(np.ones(3), requires_grad=True)
    y = x
    n = sys.getrecursionlimit() * 3
    for _ in range(n):
        y = y * 1.0 + 0.0
    y.sum().backward()
    np.testing.assert_allclose(x.grad, np.ones(3))


def test_broadcast_grads_reduce_to_input_shapes():
    a = Tensor(np.arange(3.0).reshape(3, 1), requires_grad=True)
    b = Tensor(np.arange(4.0), requires_grad=True)
    c = Tensor(np.array(2.0), requires_grad=True)
    (a * b * c).sum().backward()
    np.testing.assert_allclose(a.grad, np.full((3, 1), b.data.sum() * 2))
    np.testing.assert_allclose(b.grad, np.full(4, a.data.sum() * 2))
    np.testing.assert_allclose(c.grad, a.data.sum() * b.data.sum())
    assert a.grad.shape == (3, 1) and b.grad.shape == (4,) and c.grad.shape == ()


def test_leaf_grads_never_alias_each_other_or_the_seed():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    y = Tensor(np.ones((2, 3)), requires_grad=True)
    z = Tensor(np.ones(6), requires_grad=True)
    out = x + y + z.reshape(2, 3)  # add passes the same grad array to every input
    seed = np.arange(6.0).reshape(2, 3)
    out.backward(seed)
    grads = [x.grad, y.grad, z.grad]
    for i, g in enumerate(grads):
        assert not np.shares_memory(g, seed)
        for h in grads[i + 1:]:
            assert not np.shares_memory(g, h)
        assert g.flags.c_contiguous and g.flags.writeable
    x.grad[...] = 0
    np.testing.assert_array_equal(y.grad, seed)


def test_sum_grad_is_a_writable_contiguous_array():
    x = Tensor(np.ones((3, 4), np.float32), requires_grad=True)
    x.sum().backward()
    assert x.grad.dtype == np.float32 and x.grad.flags.c_contiguous and x.grad.flags.writeable


def test_grads_accumulate_across_backward_calls():
    x = Tensor(np.array([1.0, -2.0]), requires_grad=True)
    (x * x).sum().backward()
    (x * x).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad, 4 * x.data + 3)
    x.zero_grad()
    assert x.grad is None


def test_accumulation_never_writes_into_the_callers_seed():
    x = Tensor(np.array([1.0, -2.0]), requires_grad=True)
    seed = np.array([[1.0, 2.0]])
    for _ in range(3):
        x.reshape(1, 2).backward(seed)  # reshape's grad is a view of the seed
    np.testing.assert_array_equal(seed, [[1.0, 2.0]])
    np.testing.assert_allclose(x.grad, [3.0, 6.0])


def test_retain_graph():
    x = Tensor(np.array([3.0]), requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, [12.0])
    with pytest.raises(RuntimeError, match="already freed"):
        y.backward()


def test_backward_needs_grad_for_non_scalar_and_checks_shape():
    x = Tensor(np.ones((2, 2)), requires_grad=True)
    y = x * 2.0
    with pytest.raises(RuntimeError, match="single-element"):
        y.backward()
    with pytest.raises(ValueError, match="shape"):
        y.backward(np.ones(3))
    y.backward(np.full((2, 2), 0.5))
    np.testing.assert_allclose(x.grad, np.ones((2, 2)))
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor(np.ones(1)).backward()


def test_grad_dtype_follows_the_leaf():
    x = Tensor(np.ones(3, np.float32), requires_grad=True)
    (x * np.ones(3)).sum().backward()  # float64 constant promotes the computation
    assert x.grad.dtype == np.float32


def test_no_grad_enable_grad_and_decorator():
    x = Tensor(np.ones(2), requires_grad=True)
    with no_grad():
        assert not is_grad_enabled()
        y = x * 2.0
        with enable_grad():
            z = x * 2.0
        assert not is_grad_enabled()
    assert is_grad_enabled()
    assert not y.requires_grad and y.grad_fn is None
    assert z.requires_grad and z.grad_fn is not None

    @no_grad()
    def f(t):
        return t * 3.0

    assert not f(x).requires_grad and is_grad_enabled()


def test_detach_cuts_the_graph_and_shares_data():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = x * 2.0
    d = y.detach()
    assert d.is_leaf and not d.requires_grad and d.data is y.data
    (y * d).sum().backward()  # d is a constant: d/dx (2x * 2x_const) = 2 * d
    np.testing.assert_allclose(x.grad, 2 * d.data)


def test_intermediate_outputs_do_not_keep_leaf_grads():
    x = Tensor(np.ones(2), requires_grad=True)
    y = x * 2.0
    y.sum().backward()
    assert y.grad is None and not y.is_leaf and x.grad is not None


def test_conv_skips_unneeded_input_grad(rng, monkeypatch):
    seen = []
    real = F.conv2d_backward

    def spy(*args, **kwargs):
        seen.append(kwargs["output_mask"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ag.F, "conv2d_backward", spy)
    with fastnn.backend("numpy"):
        x = rng.standard_normal((2, 1, 5, 5))  # a plain array: the data
        w = Tensor(rng.standard_normal((3, 1, 3, 3)), requires_grad=True)
        F.conv2d(x, w).sum().backward()
        bias = Tensor(np.zeros(3), requires_grad=True)
        F.conv2d(Tensor(x), w, bias).sum().backward()
    assert seen == [(False, True, False), (False, True, True)]
    assert w.grad.shape == (3, 1, 3, 3) and bias.grad.shape == (3,)


def test_linear_skips_unneeded_grads(rng, monkeypatch):
    seen = []
    real = F.linear_backward

    def spy(*args, **kwargs):
        seen.append(kwargs["output_mask"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ag.F, "linear_backward", spy)
    with fastnn.backend("numpy"):
        x = rng.standard_normal((2, 3))
        w = Tensor(rng.standard_normal((4, 3)), requires_grad=True)
        F.linear(x, w, np.zeros(4)).sum().backward()
    assert seen == [(False, True, False)]


def test_custom_function_ctx():
    class Cube(Function):
        @staticmethod
        def forward(ctx, x, k):
            ctx.save_for_backward(x)
            assert ctx.needs_input_grad == (True, False)
            return k * x**3

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * 3 * x**2 * 2.0, None

    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    Cube.apply(x, 2.0).sum().backward()
    np.testing.assert_allclose(x.grad, 6 * x.data**2)


def test_handlers_registered_and_return_tensors(rng):
    names = ["conv2d", "linear", "matmul", "max_pool2d", "avg_pool2d", "relu", "sigmoid",
             "tanh", "log_softmax", "cross_entropy", "mse_loss", "dropout"]
    assert set(names) <= set(F._TENSOR_HANDLERS)
    with fastnn.backend("numpy"):
        x = Tensor(rng.standard_normal((1, 1, 4, 4)), requires_grad=True)
        y = F.conv2d(x, rng.standard_normal((2, 1, 3, 3)))
    assert isinstance(y, Tensor) and y.grad_fn is not None and y.shape == (1, 2, 2, 2)


# --------------------------------------------------------------------------
# Tensor basics
# --------------------------------------------------------------------------


def test_tensor_construction_and_conversion():
    t = Tensor([[1, 2], [3, 4]])
    assert t.shape == (2, 2) and t.ndim == 2 and t.dtype == np.int64 and t.size == 4
    f = Tensor([1.0, 2.0], dtype=np.float32, requires_grad=True)
    assert f.dtype == np.float32 and f.requires_grad and f.is_leaf
    a = np.zeros(3)
    assert Tensor(a).data is a  # wrapped without a copy
    assert Tensor(a).numpy() is a
    assert Tensor(np.array([[2.5]])).item() == 2.5
    with pytest.raises(TypeError, match="floating"):
        Tensor([1, 2], requires_grad=True)
    np.testing.assert_array_equal(np.asarray(Tensor([1.0, 2.0])), [1.0, 2.0])


def test_ndarray_on_the_left_gives_a_tensor():
    x = Tensor(np.ones(2), requires_grad=True)
    y = np.full(2, 3.0) * x
    assert isinstance(y, Tensor)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [3.0, 3.0])


def test_argmax_and_repr():
    t = Tensor(np.array([[0.0, 2.0, 1.0], [5.0, 0.0, 1.0]]), requires_grad=True)
    np.testing.assert_array_equal(t.argmax(1).data, [1, 0])
    assert "requires_grad=True" in repr(t)
    assert "grad_fn=Mul" in repr(t * 2.0)


# --------------------------------------------------------------------------
# CuPy arrays (real GPU only)
# --------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_graph_matches_host(rng):
    cp = pytest.importorskip("cupy")
    x = rng.standard_normal((4, 2, 8, 8)).astype(np.float32)
    ws = [rng.standard_normal(s).astype(np.float32) * 0.3
          for s in [(3, 2, 3, 3), (3,), (5, 27), (5,)]]
    labels = rng.integers(0, 5, 4)

    def run(xp, arrays):
        params = [Tensor(xp.asarray(a), requires_grad=True) for a in arrays]
        w1, b1, w2, b2 = params
        h = F.max_pool2d(F.relu(F.conv2d(Tensor(xp.asarray(x)), w1, b1)), 2)
        h = (h * 2.0 - 0.5).sigmoid() + h.tanh()
        out = F.linear(h.flatten(1), w2, b2)
        loss = F.cross_entropy(out, xp.asarray(labels)) + F.mse_loss(out, out.detach() * 0.5)
        loss = loss + out[xp.asarray([0, 0, 1])].sum() * 0.01 + (out ** 2).mean(axis=0).sum()
        loss.backward()
        host = [p.grad if xp is np else p.grad.get() for p in params]
        return float(loss.item()), host

    loss_h, grads_h = run(np, ws)
    with fastnn.backend("cuda"):
        loss_d, grads_d = run(cp, ws)
    assert loss_d == pytest.approx(loss_h, rel=1e-4)
    for gh, gd in zip(grads_h, grads_d):
        np.testing.assert_allclose(gd, gh, rtol=2e-3, atol=2e-4)


@pytest.mark.gpu
def test_gpu_gradcheck_float64(rng):
    cp = pytest.importorskip("cupy")
    x = Tensor(cp.asarray(rng.standard_normal((2, 2, 5, 5))), requires_grad=True)
    w = Tensor(cp.asarray(rng.standard_normal((3, 2, 3, 3))), requires_grad=True)
    with fastnn.backend("cuda"):
        assert gradcheck(lambda x, w: F.avg_pool2d(F.conv2d(x, w, padding=1).relu(), 2), [x, w])
        assert gradcheck(lambda x: ag.batch_norm2d(x, None, None, training=True), [x])


@pytest.mark.gpu
def test_gpu_dropout_grad_uses_the_forward_mask(rng):
    cp = pytest.importorskip("cupy")
    x = Tensor(cp.asarray(rng.uniform(1, 2, (64, 64)).astype(np.float32)), requires_grad=True)
    with fastnn.backend("cuda"):
        y = F.dropout(x, 0.5, True)
        y.sum().backward()
    assert y.dtype == np.float32 and x.grad.dtype == np.float32
    np.testing.assert_allclose((x.grad * x.data).get(), y.data.get(), rtol=1e-6)
    assert 0.4 < float((y.data == 0).mean()) < 0.6


def test_handlers_accept_every_call_form(rng):
    """F.op(Tensor, ...) reaches the op's Function whether arguments are positional,
    keyword or mixed, and a bad call names the op."""
    x = Tensor(rng.standard_normal((2, 3, 6, 6)), requires_grad=True)
    w = Tensor(rng.standard_normal((4, 3, 3, 3)), requires_grad=True)
    with fastnn.backend("numpy"):
        ref = F.conv2d(x.data, w.data, None, 2, 1)
        for y in (F.conv2d(x, w, None, 2, 1), F.conv2d(x, w, stride=2, padding=1),
                  F.conv2d(x=x, weight=w, padding=1, stride=(2, 2)),
                  F.conv2d(x, weight=w.data, stride=2, padding=1)):
            assert isinstance(y, Tensor) and type(y.grad_fn).__name__ == "Context"
            np.testing.assert_array_equal(y.data, ref)
        y = F.max_pool2d(x, 2, padding=1)
        np.testing.assert_array_equal(y.data, F.max_pool2d(x.data, 2, 2, 1))
        y = F.log_softmax(dim=1, x=x)
        np.testing.assert_array_equal(y.data, F.log_softmax(x.data, 1))
        y.sum().backward()
        assert x.grad.shape == x.shape
        with pytest.raises(TypeError, match="conv2d: missing a required argument: 'weight'"):
            F.conv2d(x, stride=2)
        with pytest.raises(TypeError, match="relu: got an unexpected keyword argument"):
            F.relu(x, inplace=True)


def test_function_forward_may_return_extras():
    class WithIndex(Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2, np.argmax(x)

        @staticmethod
        def backward(ctx, g):
            return g * 2

    x = Tensor(np.array([1.0, 3.0, 2.0]), requires_grad=True)
    y, idx = WithIndex.apply(x)
    assert isinstance(y, Tensor) and idx == 1
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [2.0, 2.0, 2.0])
