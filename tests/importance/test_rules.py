"""``register_rule``: teaching the engine an op of one's own (here ``F.prelu``, which has no built-in rule)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcl.importance import Call, PerSampleFallbackWarning, Rule, diagonal_fisher, register_rule
from fastcl.importance.rules import base

from .reference import assert_matches, cross_entropy_loss, float64_copy, per_sample_importance, split


class PReLURule(Rule):
    """``y = max(0, x) + w[c]·min(0, x)``, channels on dim 1: per sample ``∇w[c] = Σ g·min(0, x)`` over channel ``c``."""

    functions = (F.prelu,)

    def __init__(self, fast: bool):
        self.has_forward = fast
        self.calls = 0

    def parse(self, args, kwargs):
        x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
        return Call(x, {"weight": w}, {})

    def sample_dim_ok(self, call, dim):
        return dim != 1

    def forward(self, call):
        return F.prelu(call.x, call.params["weight"]), ()

    def input_grad(self, call, saved, g):
        w = call.params["weight"].view(1, -1, *[1] * (call.x.dim() - 2))
        return torch.where(call.x > 0, g, g * w)

    def contributions(self, call, x, g, saved, slots):
        self.calls += 1
        per = g * x.clamp(max=0)  # [B, M, C, *]: the channel dim is 2
        return {"weight": per.transpose(1, 2).reshape(per.shape[0], per.shape[2], -1).sum(2)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.act = nn.PReLU(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean(2))


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))


@pytest.mark.parametrize("fast", [True, False], ids=["autograd_function", "output_hook"])
def test_registered_rule_is_used_and_exact(registry, fast):
    torch.manual_seed(1)
    model = float64_copy(Net())
    with torch.no_grad():
        model.act.weight.uniform_(0.1, 0.5)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    rule = register_rule(PReLURule(fast))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)
        got = diagonal_fisher(model, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert rule.calls == 2
    assert_matches(got, per_sample_importance(model, split(x, y), cross_entropy_loss))


def test_register_rule_refuses_duplicates_and_bad_rules(registry):
    register_rule(PReLURule(True))
    with pytest.raises(ValueError, match="already has the rule"):
        register_rule(PReLURule(True))
    register_rule(PReLURule(False), replace=True)
    with pytest.raises(TypeError, match="instance of fastcl.importance.Rule"):
        register_rule(F.prelu)
    with pytest.raises(ValueError, match="lists no functions"):
        register_rule(Rule())


def test_without_a_rule_the_op_is_still_exact():
    """No rule for ``F.prelu``: its weight is followed to where it meets the batch, exactly."""
    torch.manual_seed(3)
    model = float64_copy(Net())
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)
        got = diagonal_fisher(model, [(x, y)])
    assert_matches(got, per_sample_importance(model, split(x, y), cross_entropy_loss))
