"""The cpu backend's fused training step (fastnn.training.cpu_step): the same
kernels as the autograd path in the same order, so the same parameters, optimizer
state and losses bit for bit; anything outside its pattern takes autograd."""

from __future__ import annotations

import numpy as np
import pytest

import fastnn
from fastnn import nn, optim
from fastnn.training.cpu_step import CpuFusedStep, cpu_step_for
from fastnn.training.steps import train_step

pytest.importorskip("fastnn._C")


def _model(conv: bool, bias: bool, dtype, hidden: int = 16) -> nn.Sequential:
    rng = np.random.default_rng(0)
    layers: list[nn.Module] = []
    if conv:
        layers += [nn.Conv2d(1, 4, 3, bias=bias, rng=rng), nn.ReLU(), nn.MaxPool2d(2)]
        feat = 4 * 4 * 4  # 10x10 input -> 8x8 conv -> 4x4 pool
    else:
        feat = 100
    layers += [nn.Flatten(), nn.Linear(feat, hidden, bias=bias, rng=rng), nn.ReLU(),
               nn.Linear(hidden, hidden, rng=rng), nn.ReLU(),
               nn.Linear(hidden, 10, bias=bias, rng=rng)]
    m = nn.Sequential(*layers)
    if dtype == np.float64:
        for p in m.parameters():
            p.data = p.data.astype(np.float64)
    return m


OPTIMIZERS = {
    "adam": lambda ps: optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "sgd": lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd-plain": lambda ps: optim.SGD(ps, lr=0.1),
}


def _train(monkeypatch, fused: bool, conv: bool, bias: bool, dtype, opt_name: str, steps=4):
    monkeypatch.setenv("FASTNN_FUSED_STEP", "1" if fused else "0")
    m = _model(conv, bias, dtype)
    opt = OPTIMIZERS[opt_name](m.parameters())
    rng = np.random.default_rng(5)
    losses = []
    for i in range(steps):
        n = 7 if i % 2 else 12  # batch sizes change between steps
        x = rng.standard_normal((n, 1, 10, 10)).astype(dtype)
        y = rng.integers(0, 10, n)
        if fused:
            assert cpu_step_for(m, opt, x, y) is not None
        loss = train_step(m, opt, x, y)
        assert loss.grad_fn is None if fused else loss.grad_fn is not None
        losses.append(np.asarray(loss.data).copy())
    return m, opt, losses


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("conv,bias", [(True, True), (True, False), (False, True)])
def test_fused_equals_autograd_bit_for_bit(monkeypatch, conv, bias, dtype, opt_name):
    mf, of, lf = _train(monkeypatch, True, conv, bias, dtype, opt_name)
    ma, oa, la = _train(monkeypatch, False, conv, bias, dtype, opt_name)
    for a, b in zip(lf, la):
        np.testing.assert_array_equal(a, b)
    for pf, pa in zip(mf.parameters(), ma.parameters()):
        assert pf.data.dtype == dtype
        np.testing.assert_array_equal(pf.data, pa.data)
        np.testing.assert_array_equal(pf.grad, pa.grad)
    sf, sa = of.state_dict(), oa.state_dict()
    assert sf.keys() == sa.keys()
    for k in sf:
        np.testing.assert_array_equal(np.asarray(sf[k]), np.asarray(sa[k]))


def test_outside_the_pattern_takes_autograd(monkeypatch):
    monkeypatch.setenv("FASTNN_FUSED_STEP", "1")
    x = np.zeros((4, 1, 10, 10), np.float32)
    y = np.zeros(4, np.int64)
    m = _model(True, True, np.float32)
    opt = optim.Adam(m.parameters())
    assert isinstance(cpu_step_for(m, opt, x, y), CpuFusedStep)
    with fastnn.backend("numpy"):
        assert cpu_step_for(m, opt, x, y) is None
    assert cpu_step_for(m, opt, x.astype(np.float64), y) is None  # dtype mismatch
    assert cpu_step_for(m, opt, x, y.astype(np.float32)) is None  # float labels
    assert cpu_step_for(m, opt, x[:0], y[:0]) is None  # empty batch
    m.eval()
    assert cpu_step_for(m, opt, x, y) is None
    m.train()
    handle = m[0].weight.register_post_accumulate_grad_hook(lambda t: None)
    assert cpu_step_for(m, opt, x, y) is None  # hooks run on the autograd path
    handle.remove()
    assert cpu_step_for(m, opt, x, y) is not None
    other = optim.Adam(list(m.parameters())[:2])
    assert cpu_step_for(m, other, x, y) is None  # not all parameters
    drop = nn.Sequential(nn.Flatten(), nn.Linear(100, 10), nn.Dropout(0.5))
    assert cpu_step_for(drop, optim.SGD(drop.parameters(), lr=0.1), x, y) is None
    setattr(m, "4", nn.Linear(64, 16))  # a replaced layer invalidates the cached step
    assert cpu_step_for(m, opt, x, y) is None
    monkeypatch.setenv("FASTNN_FUSED_STEP", "0")
    fresh = _model(True, True, np.float32)
    assert cpu_step_for(fresh, optim.Adam(fresh.parameters()), x, y) is None


def test_bad_labels_still_raise_clear_errors(monkeypatch):
    monkeypatch.setenv("FASTNN_FUSED_STEP", "1")
    m = _model(True, True, np.float32)
    opt = optim.Adam(m.parameters())
    x = np.zeros((4, 1, 10, 10), np.float32)
    with pytest.raises(ValueError, match="labels"):
        train_step(m, opt, x, np.array([0, 1, 2, 10]))
    with pytest.raises(TypeError, match="labels"):
        train_step(m, opt, x, np.zeros(4, np.float32))
