"""fastnn.torch.nn drop-in modules, fastnn.torch.accelerate and torch.compile."""

from __future__ import annotations

import copy
import re

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
import fastnn.torch as ft  # noqa: E402
from fastnn.torch import nn as fnn  # noqa: E402

tnn = torch.nn


def seed_model() -> torch.nn.Sequential:
    """The seed model from plain torch modules."""
    torch.manual_seed(0)
    return tnn.Sequential(
        tnn.Conv2d(1, 32, 3), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
        tnn.Linear(32 * 13 * 13, 128), tnn.ReLU(), tnn.Linear(128, 10),
    )


def _calls(monkeypatch) -> dict[str, int]:
    """Count the fastnn ops a forward reaches (to tell fastnn from the fallback)."""
    counts: dict[str, int] = {}
    import fastnn.functional as F

    for name in ("conv2d", "conv2d_relu_max_pool2d", "max_pool2d", "avg_pool2d", "linear"):
        real = getattr(F, name)

        def spy(*a, _real=real, _name=name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **k)

        monkeypatch.setattr(F, name, spy)
    return counts


MODULES = [
    (tnn.Conv2d, fnn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2,
                                  padding=1, dilation=1, groups=2), (2, 4, 9, 9)),
    (tnn.Conv2d, fnn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=(3, 1),
                                  padding="same", bias=False), (2, 3, 7, 6)),
    (tnn.MaxPool2d, fnn.MaxPool2d, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
     (2, 3, 8, 9)),
    (tnn.MaxPool2d, fnn.MaxPool2d, dict(kernel_size=2, return_indices=True), (2, 3, 8, 9)),
    (tnn.AvgPool2d, fnn.AvgPool2d, dict(kernel_size=3, stride=2, padding=1,
                                        count_include_pad=False, divisor_override=None),
     (2, 3, 8, 9)),
    (tnn.Linear, fnn.Linear, dict(in_features=7, out_features=5), (3, 4, 7)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("torch_cls,fast_cls,kwargs,shape", MODULES)
def test_drop_in_module_equals_torch(torch_cls, fast_cls, kwargs, shape, dtype, monkeypatch):
    ref = torch_cls(**kwargs).to(dtype)
    mod = fast_cls(**kwargs).to(dtype)
    mod.load_state_dict(ref.state_dict())
    assert list(mod.state_dict()) == list(ref.state_dict())
    counts = _calls(monkeypatch)
    x = torch.randn(*shape, dtype=dtype)
    xr = x.clone().requires_grad_()
    x.requires_grad_()
    got, want = mod(x), ref(xr)
    assert sum(counts.values()) == 1  # fastnn ran, not the fallback
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)
    got[0].sum().backward()
    want[0].sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    for (n, p), (_, q) in zip(mod.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=n)


@pytest.mark.parametrize(
    "module,x",
    [
        (fnn.Conv2d(2, 3, 3, padding_mode="reflect", padding=1), torch.randn(1, 2, 6, 6)),
        (fnn.Conv2d(2, 3, 2, padding="same"), torch.randn(1, 2, 6, 6)),  # asymmetric
        (fnn.Conv2d(2, 3, 3).to(torch.bfloat16), torch.randn(1, 2, 6, 6, dtype=torch.bfloat16)),
        (fnn.MaxPool2d(2), torch.randn(1, 2, 6, 6, dtype=torch.float16)),
        (fnn.AvgPool2d(2), torch.randn(1, 2, 6, 6, dtype=torch.bfloat16)),
        (fnn.Linear(4, 3), torch.randn(2, 4).double()),  # dtype mismatch: torch's error
    ],
    ids=["reflect", "same-even", "conv-bf16", "maxpool-f16", "avgpool-bf16", "mixed-dtype"],
)
def test_unsupported_calls_fall_back_to_torch(module, x, monkeypatch):
    counts = _calls(monkeypatch)
    base = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))
    try:
        want = base.forward(module, x)
    except RuntimeError as exc:  # torch rejects it: so must the module, the same way
        with pytest.raises(RuntimeError, match=re.escape(str(exc)[:30])):
            module(x)
    else:
        torch.testing.assert_close(module(x), want)
    assert counts == {}


def test_accelerate_seed_model_in_place():
    model = seed_model()
    x = torch.randn(6, 1, 28, 28)
    want = model(x)
    keys = model.state_dict()
    params = [id(p) for p in model.parameters()]
    report = ft.accelerate(model)
    assert report.fused == [("0", "1", "2")]
    assert [s[0] for s in report.swapped] == ["4", "6"]
    assert report.skipped == []
    assert type(model[0]) is fnn.Conv2dReLUMaxPool2d
    assert isinstance(model[1], tnn.Identity) and isinstance(model[2], tnn.Identity)
    assert type(model[4]) is fnn.Linear
    assert [id(p) for p in model.parameters()] == params  # optimizers stay valid
    assert list(model.state_dict()) == list(keys)
    torch.testing.assert_close(model(x), want)
    assert "1 fused" in str(report)
    assert ft.accelerate(model).swapped == []  # idempotent


def test_accelerate_leaves_what_it_cannot_handle_and_says_why():
    class MyConv(tnn.Conv2d):
        pass

    model = tnn.Sequential(
        tnn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), tnn.ReLU(), tnn.MaxPool2d(2),
        MyConv(2, 2, 1), tnn.Linear(3, 3).to(torch.bfloat16), tnn.AvgPool2d(2),
        tnn.Sequential(tnn.Conv2d(2, 2, 1), tnn.ReLU(), tnn.MaxPool2d(2, return_indices=True)),
    )
    report = ft.accelerate(model)
    skipped = dict(report.skipped)
    assert "padding_mode='circular'" in skipped["0"]
    assert "subclasses" in skipped["3"]
    assert "bfloat16" in skipped["4"]
    assert report.fused == []  # circular padding, and a pool that returns indices
    assert type(model[0]) is tnn.Conv2d and type(model[3]) is MyConv
    assert type(model[4]) is tnn.Linear and type(model[5]) is fnn.AvgPool2d
    assert type(model[6][0]) is fnn.Conv2d and type(model[6][2]) is fnn.MaxPool2d


def test_accelerate_keeps_hooked_relu_unfused():
    model = seed_model()
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    report = ft.accelerate(model)
    assert report.fused == [] and type(model[0]) is fnn.Conv2d
    model(torch.randn(2, 1, 28, 28))
    assert seen == [torch.Size([2, 32, 26, 26])]


def test_accelerate_rejects_non_modules():
    with pytest.raises(TypeError, match="model"):
        ft.accelerate([tnn.Linear(2, 2)])


def test_accelerated_model_trains_like_torch():
    ref = seed_model()
    model = copy.deepcopy(ref)
    ft.accelerate(model)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (ref, model)]
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x, y = torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,),
                                                                       generator=gen)
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_equals_eager():
    # backend="aot_eager" traces exactly what inductor sees (dynamo graph, fake
    # tensors, the joint forward/backward graph) without its C++ build, which takes
    # ~30 s here; benchmarks/bench_torch_accelerate.py runs the inductor build.
    model = seed_model()
    ft.accelerate(model)
    twin = copy.deepcopy(model)
    x = torch.randn(8, 1, 28, 28)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    want, got = model(x), compiled(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    want.sum().backward()
    got.sum().backward()
    for p, q in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_accelerate_fuses_linear_relu_into_one_op():
    model = seed_model()
    x = torch.randn(6, 1, 28, 28)
    want = model(x)
    keys = list(model.state_dict())
    report = ft.accelerate(model)
    assert report.fused_linear_relu == [("4", "5")]
    assert "1 Linear+ReLU fused" in str(report) and "4 + 5 -> Linear" in str(report)
    assert model[4].fused_relu and not model[6].fused_relu
    assert isinstance(model[5], tnn.Identity) and "fused_relu=True" in repr(model[4])
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), want)
    # The traced graph has the fastnn ops and nothing elementwise of torch's between.
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, fullgraph=True, backend=backend)(x)
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert {"fastnn.conv2d_relu_max_pool2d", "fastnn.linear_relu", "fastnn.linear"} <= targets
    assert not any("relu" in t and "fastnn" not in t for t in targets), targets


def test_linear_relu_fusion_respects_hooks_and_falls_back():
    model = tnn.Sequential(tnn.Linear(4, 3), tnn.ReLU(), tnn.Linear(3, 3), tnn.ReLU())
    model[1].register_forward_hook(lambda m, i, o: None)
    report = ft.accelerate(model)
    assert report.fused_linear_relu == [("2", "3")]
    assert type(model[1]) is tnn.ReLU and not model[0].fused_relu
    # A call fastnn cannot run (mixed dtypes) still applies the fused ReLU, via torch.
    lin = model[2].to(torch.float64)
    x = torch.randn(5, 3)
    with pytest.raises(RuntimeError):
        lin(x)  # torch's own dtype error, as an unfused Linear gives
    y = lin(x.double())
    torch.testing.assert_close(y, torch.relu(tnn.functional.linear(x.double(), lin.weight,
                                                                    lin.bias)))
    assert (y >= 0).all()
    half = model[2].to(torch.bfloat16)
    xb = -torch.ones(2, 3, dtype=torch.bfloat16)
    assert (half(xb) >= 0).all()  # torch's forward, then the ReLU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cross_entropy_loss_equals_torch(dtype, monkeypatch):
    import fastnn.functional as F

    calls = []
    real = F.softmax_cross_entropy
    monkeypatch.setattr(F, "softmax_cross_entropy",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    loss_fn = tnn.CrossEntropyLoss()
    assert ft.accelerate(loss_fn).swapped == [("", "CrossEntropyLoss", "CrossEntropyLoss")]
    assert type(loss_fn) is fnn.CrossEntropyLoss
    x = torch.randn(9, 5, dtype=dtype, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    t = torch.randint(0, 5, (9,))
    got, want = loss_fn(x, t), tnn.functional.cross_entropy(xr, t)
    assert calls == [1] and got.shape == () and got.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tol)
    (2 * got).backward()
    (2 * want).backward()
    torch.testing.assert_close(x.grad, xr.grad, **tol)


@pytest.mark.parametrize(
    "kwargs,x,t",
    [
        ({"weight": torch.rand(5)}, torch.randn(4, 5), torch.randint(0, 5, (4,))),
        ({"reduction": "sum"}, torch.randn(4, 5), torch.randint(0, 5, (4,))),
        ({"label_smoothing": 0.1}, torch.randn(4, 5), torch.randint(0, 5, (4,))),
        ({}, torch.randn(4, 5), torch.tensor([1, -100, 2, 0])),  # ignore_index
        ({}, torch.randn(4, 5), torch.softmax(torch.randn(4, 5), 1)),  # probabilities
        ({}, torch.randn(4, 5, 3), torch.randint(0, 5, (4, 3))),  # K-dimensional
        ({}, torch.randn(4, 5).to(torch.bfloat16), torch.randint(0, 5, (4,))),
        ({}, torch.randn(4, 5), torch.tensor([0, 1, 5, 2])),  # out of range: torch's error
    ],
    ids=["weight", "sum", "smoothing", "ignore_index", "probabilities", "k-dim", "bf16",
         "out-of-range"],
)
def test_cross_entropy_loss_falls_back_to_torch(kwargs, x, t, monkeypatch):
    import fastnn.functional as F

    monkeypatch.setattr(F, "softmax_cross_entropy", None)  # fastnn must not run
    ref, loss_fn = tnn.CrossEntropyLoss(**kwargs), fnn.CrossEntropyLoss(**kwargs)
    try:
        want = ref(x, t)
    except (RuntimeError, IndexError) as exc:
        with pytest.raises(type(exc)):
            loss_fn(x, t)
    else:
        torch.testing.assert_close(loss_fn(x, t), want)


def test_cross_entropy_loss_compiles_fullgraph():
    loss_fn = fnn.CrossEntropyLoss()
    x = torch.randn(6, 4, requires_grad=True)
    t = torch.randint(0, 4, (6,))
    got = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x, t)
    torch.testing.assert_close(got, tnn.functional.cross_entropy(x, t))
    (g,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(g, torch.autograd.grad(tnn.functional.cross_entropy(x, t), x)[0])


# --------------------------------------------------------------------------
# accelerate's release of torch's idle OpenMP workers (fastnn.torch._openmp)
# --------------------------------------------------------------------------


def _threads() -> int:
    import os

    return len(os.listdir("/proc/self/task"))


def _threads_after_release(busy: int, polls: int = 200) -> int:
    """The thread count once a released OpenMP worker has exited (it exits
    asynchronously), or after ~1 s if none does."""
    import time

    for _ in range(polls):
        if _threads() < busy:
            break
        time.sleep(0.005)
    return _threads()


needs_procfs = pytest.mark.skipif(not __import__("os").path.exists("/proc/self/task"),
                                  reason="needs Linux procfs (/proc/self/task)")


@pytest.fixture
def two_torch_threads():
    from fastnn.torch import _openmp

    if _openmp.runtime_path() is None:
        pytest.skip("this torch build loads no OpenMP runtime")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield _openmp
    ft.set_release_openmp(True)
    torch.set_num_threads(before)


@needs_procfs
def test_release_idle_workers_ends_torchs_openmp_pool_and_torch_restarts_it(two_torch_threads):
    a = torch.randn(1 << 22)
    want = a + a  # a parallel op: torch's pool now holds a worker
    busy = _threads()
    assert two_torch_threads.release_idle_workers() is True
    assert _threads_after_release(busy) == busy - 1
    torch.testing.assert_close(a + a, want, rtol=0, atol=0)  # torch starts it again
    assert _threads() == busy


@needs_procfs
def test_fastnn_ops_release_torchs_idle_openmp_workers_unless_disabled(two_torch_threads):
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    a = torch.randn(1 << 22)
    for flag in (True, False):
        ft.set_release_openmp(flag)
        a + a  # torch's pool now holds a worker
        busy = _threads()
        y = torch.ops.fastnn.linear(x, w, None)
        assert (_threads_after_release(busy, 100 if flag else 40) == busy - 1) == flag
        torch.testing.assert_close(y, x @ w.T)


def test_release_openmp_env_default(monkeypatch):
    import importlib

    from fastnn.torch import _openmp

    monkeypatch.setenv("FASTNN_TORCH_RELEASE_OMP", "0")
    try:
        assert importlib.reload(_openmp).enabled() is False
    finally:
        monkeypatch.delenv("FASTNN_TORCH_RELEASE_OMP")
        importlib.reload(_openmp)
    assert _openmp.enabled() is True


def test_backward_parks_fastnns_threads_after_the_first_layer(monkeypatch):
    # The first layer's backward op (no input gradient) ends the backward pass:
    # fastnn's workers sleep before the user's optimizer runs. Not otherwise.
    from fastnn.torch import _ops

    parked = []
    monkeypatch.setattr(_ops, "park_threads", lambda: parked.append(1))
    model = seed_model()
    ft.accelerate(model)
    x = torch.randn(4, 1, 28, 28)
    model(x).sum().backward()
    assert parked == [1]
    model(x.requires_grad_()).sum().backward()  # the input's gradient too: no end
    assert parked == [1]
