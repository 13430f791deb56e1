"""fastnn.torch.optim: Adam/AdamW on fastnn's kernel, equal to torch.optim's."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
import fastnn.torch as ft  # noqa: E402
from fastnn.torch import optim as fopt  # noqa: E402

tnn = torch.nn


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return tnn.Sequential(tnn.Linear(7, 5), tnn.ReLU(), tnn.Linear(5, 3)).to(dtype)


def _spy(monkeypatch) -> list[int]:
    """Count the parameters fastnn's Adam updates (to tell fastnn's step from torch's
    fallback): one entry per parameter of each group call."""
    import fastnn.functional as F

    calls: list[int] = []
    real = F.adam_step_multi

    def spy(params, *a, **k):
        calls.extend(1 for _ in params)
        return real(params, *a, **k)

    monkeypatch.setattr(F, "adam_step_multi", spy)
    return calls


def _train(model, opt, steps: int, seed: int = 1, skip_last_on: int | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for i in range(steps):
        x = torch.randn(4, 7, generator=gen, dtype=dtype)
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        if skip_last_on is not None and i % skip_last_on == 0:
            model[2].bias.grad = None  # a parameter without a gradient this step
        opt.step()


def _tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12,
                                                                         "atol": 1e-13}


CASES = [
    (torch.optim.Adam, fopt.Adam, {}),
    (torch.optim.Adam, fopt.Adam, {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6,
                                   "weight_decay": 0.1}),
    (torch.optim.Adam, fopt.Adam, {"lr": 1e-2, "weight_decay": 0.1,
                                   "decoupled_weight_decay": True}),
    (torch.optim.AdamW, fopt.AdamW, {}),
    (torch.optim.AdamW, fopt.AdamW, {"lr": 3e-2, "weight_decay": 0.5}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("torch_cls,fast_cls,kwargs", CASES)
def test_steps_equal_torch(torch_cls, fast_cls, kwargs, dtype, monkeypatch):
    ref, model = _model(dtype), _model(dtype)
    want, got = torch_cls(ref.parameters(), **kwargs), fast_cls(model.parameters(), **kwargs)
    calls = _spy(monkeypatch)
    _train(ref, want, 6, skip_last_on=3)
    _train(model, got, 6, skip_last_on=3)
    assert len(calls) == 4 * 6 - 2  # fastnn ran every update (bias skipped twice)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **_tol(dtype))
    sw, sg = want.state_dict(), got.state_dict()
    assert sg["param_groups"] == sw["param_groups"]
    for i, st in sw["state"].items():
        assert set(sg["state"][i]) == set(st)
        for k, v in st.items():
            assert sg["state"][i][k].dtype == v.dtype and sg["state"][i][k].device == v.device
            torch.testing.assert_close(sg["state"][i][k], v, **_tol(dtype), msg=k)


@pytest.mark.parametrize("first", [torch.optim.Adam, fopt.Adam], ids=["torch", "fastnn"])
def test_state_dict_round_trip_continues_training(first):
    model = _model()
    opt = first(model.parameters(), lr=1e-2)
    _train(model, opt, 3)
    saved = opt.state_dict()
    # The saved state resumes in either class, and both continue the same way.
    twins = [copy.deepcopy(model) for _ in range(2)]
    opts = [cls(m.parameters(), lr=1e-2) for cls, m in zip((torch.optim.Adam, fopt.Adam), twins)]
    for o in opts:
        o.load_state_dict(copy.deepcopy(saved))  # loading shares matching tensors
        assert o.state_dict()["state"][0]["step"] == 3
    for m, o in zip(twins, opts):
        _train(m, o, 3, seed=2)
    for p, q in zip(*(m.parameters() for m in twins)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(twins[0][0].weight, model[0].weight)  # they did train


@pytest.mark.parametrize(
    "kwargs",
    [{"amsgrad": True}, {"maximize": True}, {"foreach": True}, {"lr": torch.tensor(1e-3)}],
    ids=["amsgrad", "maximize", "foreach", "tensor-lr"],
)
def test_unsupported_options_run_torchs_step(kwargs, monkeypatch):
    ref, model = _model(), _model()
    want, got = torch.optim.Adam(ref.parameters(), **kwargs), fopt.Adam(model.parameters(),
                                                                         **kwargs)
    calls = _spy(monkeypatch)
    _train(ref, want, 3)
    _train(model, got, 3)
    assert calls == []
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_mixed_groups_each_take_their_own_path(monkeypatch):
    ref, model = _model(), _model()

    def groups(m):
        return [{"params": m[0].parameters(), "lr": 1e-2},
                {"params": m[2].parameters(), "lr": 3e-2, "amsgrad": True}]

    want, got = torch.optim.Adam(groups(ref)), fopt.Adam(groups(model))
    calls = _spy(monkeypatch)
    _train(ref, want, 4)
    _train(model, got, 4)
    assert len(calls) == 2 * 4  # only the first group's two tensors
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert "max_exp_avg_sq" in got.state[model[2].weight]


def test_hooks_scheduler_and_version_counter():
    model = _model()
    opt = fopt.Adam(model.parameters(), lr=0.1)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    w = model[0].weight
    version = w._version
    _train(model, opt, 1)
    sched.step()
    assert seen == ["pre", "post"]
    assert w._version > version  # autograd sees the in-place update
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="learning rate"):
        fopt.Adam(model.parameters(), lr=-1.0)  # torch's own argument checks


def test_step_count_dtype_follows_torchs_default_dtype():
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        ref, model = _model(), _model()
        want, got = torch.optim.Adam(ref.parameters()), fopt.Adam(model.parameters())
        _train(ref, want, 1)
        _train(model, got, 1)
    finally:
        torch.set_default_dtype(old)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert got.state[p]["step"].dtype == want.state[q]["step"].dtype == torch.float64


def test_closure_is_called_with_grad_enabled():
    model = _model()
    opt = fopt.Adam(model.parameters())

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(2, 7)).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss.requires_grad and opt.state[model[0].weight]["step"] == 1


def test_accelerate_swaps_the_optimizer_in_place(monkeypatch):
    ref, model = _model(), _model()
    want = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    got = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(ref, want, 2)
    _train(model, got, 2)  # state from torch's own steps first
    state = got.state
    report = ft.accelerate(model, optimizer=got)
    assert type(got) is fopt.AdamW and got.state is state
    assert report.optimizer == "AdamW -> fastnn.torch.optim.AdamW"
    assert "optimizer AdamW -> fastnn.torch.optim.AdamW" in str(report)
    calls = _spy(monkeypatch)
    _train(ref, want, 3, seed=5)
    _train(model, got, 3, seed=5)
    assert len(calls) == 4 * 3
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert "already" in ft.accelerate(model, optimizer=got).optimizer


def test_accelerate_leaves_other_optimizers_and_says_why():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert "left to torch" in ft.accelerate(model, optimizer=sgd).optimizer
    assert type(sgd) is torch.optim.SGD
    adam = torch.optim.Adam(model.parameters())
    torch.optim.lr_scheduler.StepLR(adam, step_size=1)  # binds torch's step to adam
    assert "wrapped" in ft.accelerate(model, optimizer=adam).optimizer
    assert type(adam) is torch.optim.Adam
    with pytest.raises(TypeError, match="optimizer"):
        ft.accelerate(model, optimizer=[p for p in model.parameters()])


def test_step_parks_fastnns_threads(monkeypatch):
    # The step ends a training step: fastnn's idle workers sleep instead of polling
    # on cores the user's next torch op needs.
    from fastnn.torch import optim as fopt

    parked = []
    monkeypatch.setattr(fopt, "park_threads", lambda: parked.append(1))
    p = torch.nn.Parameter(torch.randn(5))
    opt = fopt.Adam([p], lr=0.1)
    p.grad = torch.ones(5)
    opt.step()
    assert parked == [1]
