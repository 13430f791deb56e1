"""Tensor.register_post_accumulate_grad_hook: runs once per backward pass, after
a leaf's last gradient contribution, while the rest of backward is still to come."""

from __future__ import annotations

import numpy as np
import pytest

import fastnn.functional as F
from fastnn import nn
from fastnn.autograd import Tensor


def _leaf(rng: np.random.Generator, *shape: int) -> Tensor:
    return Tensor(rng.standard_normal(shape), requires_grad=True)


@pytest.mark.parametrize("uses", [1, 2, 3])
def test_hook_sees_the_final_gradient_of_a_leaf_used_several_times(rng, uses):
    w = _leaf(rng, 3, 4)
    x = _leaf(rng, 5, 3)
    seen = []
    w.register_post_accumulate_grad_hook(lambda t: seen.append(t.grad.copy()))
    out = x @ w
    for _ in range(uses - 1):
        out = out + x @ w
    out.sum().backward()
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0], w.grad)
    np.testing.assert_allclose(w.grad, uses * x.data.sum(0)[:, None] * np.ones((3, 4)))


def test_hooks_run_before_backward_reaches_earlier_layers(rng):
    # The last layer's weight is final while the first layer's is not yet computed:
    # what lets data-parallel training start reducing it early.
    model = nn.Sequential(nn.Linear(4, 8, rng=rng), nn.ReLU(), nn.Linear(8, 3, rng=rng))
    first, last = model[0].weight, model[2].weight
    state = {}
    last.register_post_accumulate_grad_hook(lambda t: state.setdefault("first", first.grad))
    first.register_post_accumulate_grad_hook(lambda t: state.setdefault("last", last.grad))
    loss = F.cross_entropy(model(Tensor(rng.standard_normal((6, 4)).astype(np.float32))),
                           np.arange(6) % 3)
    loss.backward()
    assert state["first"] is None
    assert state["last"] is not None


def test_hooks_run_in_order_once_per_pass_and_can_be_removed(rng):
    w = _leaf(rng, 4)
    calls = []
    h1 = w.register_post_accumulate_grad_hook(lambda t: calls.append("a"))
    w.register_post_accumulate_grad_hook(lambda t: calls.append("b"))
    (w * 2).sum().backward()
    assert calls == ["a", "b"]
    h1.remove()
    h1.remove()  # twice is harmless
    (w * 3).sum().backward()
    assert calls == ["a", "b", "b"]
    np.testing.assert_allclose(w.grad, np.full(4, 5.0))


def test_hook_on_a_leaf_root(rng):
    w = _leaf(rng, 1)
    calls = []
    w.register_post_accumulate_grad_hook(lambda t: calls.append(t.grad.copy()))
    w.backward()
    assert len(calls) == 1 and calls[0][0] == 1.0


def test_hook_runs_for_a_leaf_whose_branch_got_no_gradient(rng):
    # Relied on by DistributedDataParallel: every hooked leaf in the graph
    # reports once per pass, even if no gradient reached it.
    from fastnn.autograd import Function

    class Stop(Function):
        @staticmethod
        def forward(ctx, a):
            return a * 1.0

        @staticmethod
        def backward(ctx, g):
            return (None,)

    w = _leaf(rng, 3)
    calls = []
    w.register_post_accumulate_grad_hook(lambda t: calls.append(t.grad))
    (Stop.apply(w).sum() + 0.0).backward()
    assert calls == [None]


@pytest.mark.parametrize("bad", [None, 3, "f"])
def test_bad_hook_is_a_type_error(rng, bad):
    with pytest.raises(TypeError, match="hook must be callable"):
        _leaf(rng, 2).register_post_accumulate_grad_hook(bad)


def test_hook_on_a_non_leaf_is_refused(rng):
    y = _leaf(rng, 2) * 2
    with pytest.raises(RuntimeError, match="only leaf"):
        y.register_post_accumulate_grad_hook(lambda t: None)
