"""nn: Module bookkeeping, state_dict round-trips, layers vs functional, BatchNorm2d
against hand computation, init statistics and reproducibility."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest

import fastnn
import fastnn.functional as F
from fastnn import nn
from fastnn.autograd import Tensor, no_grad
from fastnn.gradcheck import gradcheck
from fastnn.nn import init


@pytest.fixture
def backend(host_backend):
    with fastnn.backend(host_backend):
        yield host_backend


def seed_model(rng=None, dtype=np.float32):
    """The MNIST seed model of the trainer."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, rng=rng, dtype=dtype), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(5408, 128, rng=rng, dtype=dtype), nn.ReLU(), nn.Linear(128, 10, rng=rng,
                                                                         dtype=dtype),
    )


class Block(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False, rng=rng)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5, rng=rng))

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).relu())


# --------------------------------------------------------------------------
# Module bookkeeping
# --------------------------------------------------------------------------


def test_named_parameters_buffers_and_modules():
    m = Block(np.random.default_rng(0))
    names = [n for n, _ in m.named_parameters()]
    assert names == ["conv.weight", "bn.weight", "bn.bias", "head.1.weight", "head.1.bias"]
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in m.parameters())
    assert [n for n, _ in m.named_buffers()] == [
        "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert [n for n, _ in m.named_modules()] == ["", "conv", "bn", "head", "head.0", "head.1"]
    assert [type(c).__name__ for c in m.children()] == ["Conv2d", "BatchNorm2d", "Sequential"]
    assert m.conv.bias is None
    assert "Conv2d(2, 3" in repr(m)


def test_shared_parameter_listed_once():
    lin = nn.Linear(3, 3)
    seq = nn.Sequential(lin, nn.ReLU(), lin)
    assert len(list(seq.parameters())) == 2
    assert len(seq) == 3 and seq[0] is lin and list(seq)[2] is lin


def test_train_eval_and_zero_grad(rng):
    m = Block(rng)
    assert all(mod.training for mod in m.modules())
    assert m.eval() is m and not any(mod.training for mod in m.modules())
    m.train()
    assert m.head[1].training
    with fastnn.backend("numpy"):
        m(rng.standard_normal((2, 2, 4, 4)).astype(np.float32)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_setattr_rules():
    class NoSuper(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.zeros(2))

    with pytest.raises(AttributeError, match="super"):
        NoSuper()
    lin = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="parameter 'weight'"):
        lin.weight = np.zeros((2, 2))
    lin.bias = None
    assert [n for n, _ in lin.named_parameters()] == ["weight"]
    lin.bias = nn.Parameter(np.zeros(2, np.float32))
    assert [n for n, _ in lin.named_parameters()] == ["weight", "bias"]


def test_forward_accepts_arrays_and_tensors(rng):
    seq = nn.Sequential(nn.Flatten(), nn.Linear(12, 2, rng=rng))
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    with fastnn.backend("numpy"):
        a, b = seq(x), seq(Tensor(x))
    np.testing.assert_allclose(a.data, b.data)


# --------------------------------------------------------------------------
# state_dict
# --------------------------------------------------------------------------


def test_state_dict_round_trip_through_npz(tmp_path, rng):
    src, dst = Block(np.random.default_rng(1)), Block(np.random.default_rng(2))
    x = rng.standard_normal((4, 2, 4, 4)).astype(np.float32)
    with fastnn.backend("numpy"):
        src(x)  # a training step moves BatchNorm's running stats
        sd = src.state_dict()
        assert list(sd) == ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean",
                            "bn.running_var", "bn.num_batches_tracked", "head.1.weight",
                            "head.1.bias"]
        assert int(sd["bn.num_batches_tracked"]) == 1
        np.savez(tmp_path / "m.npz", **sd)
        loaded = dict(np.load(tmp_path / "m.npz"))
        weight_obj = dst.conv.weight.data
        res = dst.load_state_dict(loaded)
        assert res.missing_keys == [] and res.unexpected_keys == []
        assert dst.conv.weight.data is weight_obj  # copied in place
        src.eval()
        dst.eval()
        np.testing.assert_array_equal(src(x).data, dst(x).data)
    for k, v in dst.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])


def test_state_dict_holds_copies():
    lin = nn.Linear(2, 2)
    sd = lin.state_dict()
    sd["weight"][...] = 42
    assert not np.any(lin.weight.data == 42)


def test_load_state_dict_errors_are_clear_and_atomic():
    lin = nn.Linear(3, 2)
    before = lin.weight.data.copy()
    sd = lin.state_dict()
    bad = dict(sd, extra=np.zeros(1))
    del bad["bias"]
    bad["weight"] = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"missing keys \['bias'\].*unexpected keys \['extra'\]"):
        lin.load_state_dict(bad)
    res = lin.load_state_dict(bad, strict=False)
    assert res.missing_keys == ["bias"] and res.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(lin.weight.data, np.ones((2, 3)))
    lin.weight.data[...] = before
    with pytest.raises(ValueError, match=r"shape mismatch for 'weight'.*\(3, 3\).*\(2, 3\)"):
        lin.load_state_dict({"weight": np.zeros((3, 3)), "bias": np.full(2, 5.0)})
    np.testing.assert_array_equal(lin.weight.data, before)
    assert not np.any(lin.bias.data == 5.0)  # nothing was loaded


# --------------------------------------------------------------------------
# layers vs functional
# --------------------------------------------------------------------------


def test_layers_match_functional(backend, rng):
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, rng=rng)
    np.testing.assert_allclose(
        conv(x).data, F.conv2d(x, conv.weight.data, conv.bias.data, 2, 1, 1, 2), rtol=1e-5)
    np.testing.assert_allclose(nn.MaxPool2d(3, 2, 1)(x).data, F.max_pool2d(x, 3, 2, 1))
    np.testing.assert_allclose(nn.AvgPool2d(2, count_include_pad=False)(x).data,
                               F.avg_pool2d(x, 2, count_include_pad=False))
    np.testing.assert_allclose(nn.ReLU()(x).data, np.maximum(x, 0))
    np.testing.assert_allclose(nn.Sigmoid()(x).data, 1 / (1 + np.exp(-x)), rtol=1e-6)
    np.testing.assert_allclose(nn.Tanh()(x).data, np.tanh(x), rtol=1e-6)
    assert nn.Flatten()(x).shape == (2, 144)
    assert nn.Flatten(0, 1)(x).shape == (8, 6, 6)
    lin = nn.Linear(6, 3, bias=False, rng=rng)
    np.testing.assert_allclose(lin(x).data, x @ lin.weight.data.T, rtol=1e-5, atol=1e-6)
    logits, labels = rng.standard_normal((5, 3)), rng.integers(0, 3, 5)
    np.testing.assert_allclose(nn.CrossEntropyLoss()(logits, labels).data,
                               F.cross_entropy(logits, labels))
    np.testing.assert_allclose(nn.MSELoss()(logits, logits * 2).data, np.mean(logits**2))


def test_dropout_layer_train_eval_and_seed(rng):
    x = np.ones((20, 30))
    d = nn.Dropout(0.5, rng=np.random.default_rng(0))
    with fastnn.backend("numpy"):
        y = d(x).data
        assert set(np.unique(y)) <= {0.0, 2.0} and 0.3 < (y == 0).mean() < 0.7
        d2 = nn.Dropout(0.5, rng=np.random.default_rng(0))
        np.testing.assert_array_equal(d2(x).data, y)
        d.eval()
        np.testing.assert_array_equal(d(x).data, x)
    with pytest.raises(ValueError, match="p must be"):
        nn.Dropout(1.5)


def test_conv2d_layer_gradcheck(backend, rng):
    conv = nn.Conv2d(2, 3, 3, padding=1, rng=rng, dtype=np.float64)
    x = Tensor(rng.standard_normal((2, 2, 4, 4)), requires_grad=True)
    assert gradcheck(lambda x, w, b: conv(x), [x, conv.weight, conv.bias])


# --------------------------------------------------------------------------
# BatchNorm2d
# --------------------------------------------------------------------------


def _bn_ref(x, w, b, eps):
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1)


def test_batchnorm_train_matches_hand_computation(rng):
    bn = nn.BatchNorm2d(3, dtype=np.float64)
    bn.weight.data[...] = [1.0, 2.0, -0.5]
    bn.bias.data[...] = [0.0, 1.0, 3.0]
    xs = [rng.standard_normal((4, 3, 2, 5)) * 3 + 1 for _ in range(2)]
    rm, rv = np.zeros(3), np.ones(3)
    for x in xs:
        y = bn(x)
        np.testing.assert_allclose(y.data, _bn_ref(x, bn.weight.data, bn.bias.data, 1e-5),
                                   rtol=1e-10, atol=1e-12)
        m = x.size // 3
        rm = 0.9 * rm + 0.1 * x.mean(axis=(0, 2, 3))
        rv = 0.9 * rv + 0.1 * x.var(axis=(0, 2, 3)) * m / (m - 1)  # unbiased, like torch
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-12)
    assert int(bn.num_batches_tracked) == 2


def test_batchnorm_eval_uses_running_stats(rng):
    bn = nn.BatchNorm2d(2, dtype=np.float64, eps=1e-3)
    bn.running_mean[...] = [1.0, -1.0]
    bn.running_var[...] = [4.0, 0.25]
    bn.weight.data[...] = [2.0, 3.0]
    bn.bias.data[...] = [0.5, -0.5]
    bn.eval()
    x = rng.standard_normal((3, 2, 2, 2))
    y = bn(x)
    rm, rv = bn.running_mean.reshape(1, 2, 1, 1), bn.running_var.reshape(1, 2, 1, 1)
    ref = (x - rm) / np.sqrt(rv + 1e-3) * np.array([2.0, 3.0]).reshape(1, 2, 1, 1) + np.array(
        [0.5, -0.5]).reshape(1, 2, 1, 1)
    np.testing.assert_allclose(y.data, ref, rtol=1e-12)
    np.testing.assert_array_equal(bn.running_mean, [1.0, -1.0])  # eval does not update
    assert int(bn.num_batches_tracked) == 0
    y.sum().backward()
    assert bn.weight.grad.shape == (2,) and bn.bias.grad.shape == (2,)
    np.testing.assert_allclose(bn.bias.grad, [12.0, 12.0])


def test_batchnorm_cumulative_momentum_and_no_tracking(rng):
    bn = nn.BatchNorm2d(2, momentum=None, dtype=np.float64)
    xs = [rng.standard_normal((2, 2, 3, 3)) + i for i in range(3)]
    for x in xs:
        bn(x)
    np.testing.assert_allclose(bn.running_mean,
                               np.mean([x.mean(axis=(0, 2, 3)) for x in xs], axis=0))
    free = nn.BatchNorm2d(2, track_running_stats=False, affine=False, dtype=np.float64).eval()
    assert free.state_dict() == OrderedDict()
    x = xs[0]
    np.testing.assert_allclose(free(x).data, _bn_ref(x, np.ones(2), np.zeros(2), 1e-5),
                               atol=1e-12)


def test_batchnorm_input_checks():
    bn = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        bn(np.zeros((2, 4, 2, 2), np.float32))
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(np.zeros((1, 3, 1, 1), np.float32))


# --------------------------------------------------------------------------
# init
# --------------------------------------------------------------------------


def test_default_init_matches_torch_rule():
    rng = np.random.default_rng(0)
    conv = nn.Conv2d(8, 64, 5, rng=rng)
    lin = nn.Linear(400, 300, rng=rng)
    for layer, fan_in in ((conv, 8 * 25), (lin, 400)):
        bound = 1 / math.sqrt(fan_in)
        for p in (layer.weight.data, layer.bias.data):
            assert p.dtype == np.float32
            assert np.abs(p).max() <= bound * (1 + 1e-6)
        w = layer.weight.data
        assert np.abs(w).max() > 0.95 * bound  # uniform over the whole range
        np.testing.assert_allclose(w.std(), bound / math.sqrt(3), rtol=0.05)
        assert abs(w.mean()) < 0.05 * bound
    assert nn.Linear(3, 2, dtype=np.float64).weight.dtype == np.float64


def test_init_is_reproducible():
    a = seed_model(np.random.default_rng(5)).state_dict()
    b = seed_model(np.random.default_rng(5)).state_dict()
    c = seed_model(np.random.default_rng(6)).state_dict()
    init.manual_seed(11)
    d = seed_model().state_dict()
    nn.manual_seed(11)
    e = seed_model().state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(d[k], e[k])
    assert not np.array_equal(a["0.weight"], c["0.weight"])
    # float64 draws the same numbers as float32 (cast after drawing)
    f64 = nn.Linear(4, 3, rng=np.random.default_rng(2), dtype=np.float64)
    f32 = nn.Linear(4, 3, rng=np.random.default_rng(2))
    np.testing.assert_allclose(f64.weight.data, f32.weight.data, rtol=1e-6)


@pytest.mark.parametrize("shape", [(256, 128), (64, 32, 3, 3)])
def test_init_statistics(shape):
    rng = np.random.default_rng(123)
    fan_in = shape[1] * int(np.prod(shape[2:]))
    fan_out = shape[0] * int(np.prod(shape[2:]))
    t = Tensor(np.empty(shape, np.float32))

    init.kaiming_uniform_(t, rng=rng)  # a=0, leaky_relu: gain sqrt(2)
    bound = math.sqrt(6 / fan_in)
    assert np.abs(t.data).max() <= bound * (1 + 1e-6) and np.abs(t.data).max() > 0.95 * bound
    init.kaiming_normal_(t, mode="fan_out", nonlinearity="relu", rng=rng)
    np.testing.assert_allclose(t.data.std(), math.sqrt(2 / fan_out), rtol=0.05)
    init.xavier_uniform_(t, gain=2.0, rng=rng)
    bound = 2.0 * math.sqrt(6 / (fan_in + fan_out))
    assert np.abs(t.data).max() <= bound * (1 + 1e-6)
    np.testing.assert_allclose(t.data.std(), bound / math.sqrt(3), rtol=0.05)
    init.xavier_normal_(t, rng=rng)
    np.testing.assert_allclose(t.data.std(), math.sqrt(2 / (fan_in + fan_out)), rtol=0.05)
    init.normal_(t, mean=3.0, std=0.5, rng=rng)
    np.testing.assert_allclose([t.data.mean(), t.data.std()], [3.0, 0.5], rtol=0.05)
    init.uniform_(t, -2.0, 1.0, rng=rng)
    assert t.data.min() >= -2.0 and t.data.max() <= 1.0
    np.testing.assert_allclose(t.data.mean(), -0.5, atol=0.05)
    assert init.zeros_(t) is t and not t.data.any()
    init.ones_(t)
    assert (t.data == 1).all()
    init.constant_(t.data, 0.25)  # raw arrays work too
    assert (t.data == 0.25).all()


def test_calculate_gain_and_errors():
    assert init.calculate_gain("relu") == pytest.approx(math.sqrt(2))
    assert init.calculate_gain("tanh") == pytest.approx(5 / 3)
    assert init.calculate_gain("leaky_relu", math.sqrt(5)) == pytest.approx(math.sqrt(1 / 3))
    assert init.calculate_gain("conv2d") == 1.0
    with pytest.raises(ValueError, match="nonlinearity"):
        init.calculate_gain("swish")
    with pytest.raises(ValueError, match="2 dimensions"):
        init.kaiming_uniform_(np.zeros(3))
    with pytest.raises(ValueError, match="mode"):
        init.kaiming_normal_(np.zeros((2, 2)), mode="fan")
    with pytest.raises(TypeError, match="rng"):
        init.normal_(np.zeros(2), rng="seed")


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------


def test_seed_model_learns_a_small_batch(backend):
    rng = np.random.default_rng(0)
    model = seed_model(rng)
    x = rng.standard_normal((16, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    params = list(model.parameters())
    losses = []
    for _ in range(10):
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        with no_grad():
            for p in params:
                p.data -= 0.01 * p.grad
        losses.append(loss.item())
    # (this trajectory matches torch to ~1e-5 for the same init and data)
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad.dtype == np.float32 for p in params)


# --------------------------------------------------------------------------
# CuPy (real GPU only)
# --------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_module_to_state_dict_and_training_step(rng):
    cp = pytest.importorskip("cupy")
    from fastnn import optim

    host = Block(np.random.default_rng(3))
    dev = Block(np.random.default_rng(3)).to("cuda")
    assert isinstance(dev.conv.weight.data, cp.ndarray)
    assert isinstance(dev.bn.running_mean, cp.ndarray)
    x = rng.standard_normal((4, 2, 4, 4)).astype(np.float32)
    y = rng.integers(0, 5, 4)
    opt_h = optim.Adam(host.parameters(), lr=1e-2)
    opt_d = optim.Adam(dev.parameters(), lr=1e-2)
    for model, opt, xp, be in ((host, opt_h, np, "numpy"), (dev, opt_d, cp, "cuda")):
        with fastnn.backend(be):
            for _ in range(2):
                opt.zero_grad()
                F.cross_entropy(model(xp.asarray(x)), xp.asarray(y)).backward()
                opt.step()
    sd_h, sd_d = host.state_dict(), dev.state_dict()
    for k in sd_h:
        np.testing.assert_allclose(cp.asnumpy(sd_d[k]), sd_h[k], rtol=1e-3, atol=1e-4)
    back = Block(np.random.default_rng(9))
    back.load_state_dict(sd_d)  # CuPy arrays into a host model
    np.testing.assert_allclose(back.conv.weight.data, cp.asnumpy(sd_d["conv.weight"]))
    osd = opt_d.state_dict()
    assert all(isinstance(v, np.ndarray) for k, v in osd.items() if k.endswith("exp_avg"))


@pytest.mark.gpu
def test_gpu_init_matches_host_draws():
    cp = pytest.importorskip("cupy")
    a = cp.empty((8, 4), dtype=cp.float32)
    init.kaiming_uniform_(a, rng=np.random.default_rng(0))
    b = np.empty((8, 4), np.float32)
    init.kaiming_uniform_(b, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(a.get(), b)


def test_maxpool2d_module_return_indices_matches_functional() -> None:
    x = np.random.default_rng(3).standard_normal((2, 3, 7, 7)).astype(np.float32)
    out, idx = nn.MaxPool2d(3, stride=2, padding=1, return_indices=True)(Tensor(x))
    ref, ref_idx = F.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
    np.testing.assert_array_equal(out.data, ref)
    np.testing.assert_array_equal(idx, ref_idx)
    assert idx.dtype == np.int64
    # Each index points at the plane cell holding the window's maximum.
    planes = x.reshape(2, 3, -1)
    np.testing.assert_array_equal(
        np.take_along_axis(planes, idx.reshape(2, 3, -1), axis=2).reshape(out.shape), ref
    )


def test_conv2d_module_accepts_torch_argument_forms() -> None:
    conv = nn.Conv2d(1, 2, kernel_size=(3,), stride=[1], padding=(1,))
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    with pytest.raises(ValueError, match="kernel_size"):
        nn.Conv2d(1, 2, kernel_size=(3, 3, 3))
    with pytest.raises(TypeError, match="stride"):
        nn.Conv2d(1, 2, 3, stride=1.5)
