"""L2-SP and L1-SP against hand-written float64 formulas."""
import pytest
import torch

import fastcl

from .conftest import make_mlp, perturb_, snapshot


@pytest.mark.parametrize("cls,form", [(fastcl.L2SP, "l2"), (fastcl.L1SP, "l1")])
def test_value_and_gradients_match_formula(cls, form):
    model = make_mlp()
    start = snapshot(model)
    reg = cls(model, strength=0.7)
    assert reg.penalty().item() == 0.0
    perturb_(model, seed=1)
    value = reg.penalty()
    value.backward()
    expected = 0.0
    for n, p in model.named_parameters():
        d = p.detach().double() - start[n]
        expected += (0.5 * 0.7 * d.square().sum()) if form == "l2" else 0.7 * d.abs().sum()
        grad = 0.7 * d if form == "l2" else 0.7 * d.sign()
        torch.testing.assert_close(p.grad, grad, rtol=1e-12, atol=1e-12)
    assert value.item() == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("cls", [fastcl.L2SP, fastcl.L1SP])
def test_fast_path_equals_autograd(cls):
    model = make_mlp()
    reg = cls(model, strength=1.3)
    perturb_(model, seed=2)
    value = reg.penalty()
    value.backward()
    auto = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # fast path must add, not overwrite
    fast_value = reg.add_penalty_grad_()
    assert fast_value.item() == pytest.approx(value.item(), rel=1e-12)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, auto[n] + 1.0)


def test_consolidate_refreshes_anchor_and_frozen_params_not_covered():
    model = make_mlp()
    model[0].weight.requires_grad_(False)
    reg = fastcl.L2SP(model, 2.0)
    assert "0.weight" not in reg.covered_names
    perturb_(model, seed=3)
    assert reg.penalty().item() > 0
    reg.consolidate()
    assert reg.penalty().item() == 0.0


def test_state_dict_round_trip_and_shape_mismatch():
    model = make_mlp()
    reg = fastcl.L2SP(model, 0.5)
    perturb_(model, seed=4)
    state = reg.state_dict()
    other = fastcl.L2SP(model, 9.0)  # anchors at the perturbed weights
    other.load_state_dict(state)
    assert other.strength == 0.5
    assert other.penalty().item() == pytest.approx(reg.penalty().item(), rel=1e-12)
    wrong = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    with pytest.raises(ValueError, match="0.weight"):
        fastcl.L2SP(wrong, 1.0).load_state_dict(state)


@pytest.mark.parametrize("bad, error", [(-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                        (1e39, ValueError), ("1", TypeError), (True, TypeError)])
def test_bad_strength(bad, error):
    with pytest.raises(error, match="strength"):
        fastcl.L2SP(make_mlp(), bad)


def test_works_after_dtype_change_and_with_wrapped_names():
    model = make_mlp(torch.float32)
    reg = fastcl.L2SP(model, 1.0)
    perturb_(model, seed=5)
    expected = reg.penalty().item()
    model.to(torch.bfloat16)
    assert reg.penalty().item() == pytest.approx(expected, rel=2e-2)
    wrapped = torch.nn.Module()
    wrapped.module = model  # looks like DDP's naming: "module.0.weight"
    reg2 = fastcl.L2SP(wrapped, 1.0)
    assert reg2.covered_names == [n for n, _ in model.named_parameters()]


def test_cached_parameter_lookup_follows_module_replacement_and_removal():
    model = make_mlp()
    reg = fastcl.L2SP(model, 2.0)
    start = snapshot(model)
    assert reg.penalty().item() == 0.0  # the lookup is cached now
    torch.manual_seed(9)
    model[2] = torch.nn.Linear(7, 3).double()  # same names and shapes, new parameters
    expected = sum(float((p.detach() - start[n]).square().sum()) for n, p in model.named_parameters())
    assert reg.penalty().item() == pytest.approx(expected, rel=1e-12)
    del model[2]
    with pytest.raises(ValueError, match="2.weight"):
        reg.penalty()
