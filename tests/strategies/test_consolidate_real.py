"""EWC and MAS consolidating through the real importance engine, against per-sample float64 loops."""
import pytest
import torch
import torch.nn.functional as F

import fastcl

from .conftest import make_mlp, perturb_, snapshot


def batches(seed, sizes=(6, 4, 1)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def per_sample_loop(model, data, loss):
    params = dict(model.named_parameters())
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for x, y in data:
        for i in range(len(x)):
            grads = torch.autograd.grad(loss(model(x[i : i + 1]), y[i : i + 1]), list(params.values()))
            for n, g in zip(params, grads):
                out[n] += g.square() if loss is not mas_loss else g.abs()
            count += 1
    return {n: v / count for n, v in out.items()}


def ce_loss(out, y):
    return F.cross_entropy(out, y)


def mas_loss(out, y):
    return out.square().sum()


def test_ewc_two_tasks_with_real_fisher():
    model = make_mlp()
    ewc = fastcl.EWC(model, strength=5.0)
    history = []
    for t in range(2):
        perturb_(model, seed=t)
        data = batches(seed=100 + t)
        expected = per_sample_loop(model, data, ce_loss)
        ewc.consolidate(data, verbose=False)
        history.append((expected, snapshot(model)))
    for n, f in ewc.fisher.items():
        torch.testing.assert_close(f, history[0][0][n] + history[1][0][n], rtol=1e-9, atol=1e-12)
    perturb_(model, seed=7)
    expected_value = sum(
        (0.5 * 5.0 * f[n] * (p.detach() - a[n]).square()).sum().item() for f, a in history for n, p in model.named_parameters()
    )
    assert ewc.penalty().item() == pytest.approx(expected_value, rel=1e-9)


def test_mas_accumulates_real_importance():
    model = make_mlp()
    mas = fastcl.MAS(model, strength=2.0)
    total = None
    for t in range(2):
        perturb_(model, seed=10 + t)
        data = batches(seed=200 + t)
        expected = per_sample_loop(model, data, mas_loss)
        total = expected if total is None else {n: total[n] + expected[n] for n in total}
        mas.consolidate(data, verbose=False)
    anchor = snapshot(model)
    for n in total:
        torch.testing.assert_close(mas.importance[n], total[n], rtol=1e-9, atol=1e-12)
    perturb_(model, seed=30)
    expected_value = sum((0.5 * 2.0 * total[n] * (p.detach() - anchor[n]).square()).sum().item() for n, p in model.named_parameters())
    assert mas.penalty().item() == pytest.approx(expected_value, rel=1e-9)


def test_ewc_consolidate_empty_and_nan_data_leave_state_untouched():
    model = make_mlp()
    ewc = fastcl.EWC(model, 1.0)
    with pytest.raises(ValueError):
        ewc.consolidate([], verbose=False)
    assert not ewc.consolidated and ewc.penalty().item() == 0.0
    ewc.consolidate(batches(1), verbose=False)
    state = ewc.state_dict()
    bad = batches(2)
    bad[0][0][0, 0] = float("nan")
    with pytest.raises(ValueError):
        ewc.consolidate(bad, verbose=False)
    for n, t in ewc.state_dict()["importance"].items():
        assert torch.equal(t, state["importance"][n])
    assert ewc.num_consolidations == 1


def test_ewc_on_wrapped_model_uses_plain_names():
    model = make_mlp()
    wrapper = torch.nn.Module()
    wrapper.module = model
    wrapper.forward = model.forward
    ewc = fastcl.EWC(wrapper, 1.0)
    ewc.consolidate(batches(3), verbose=False)
    assert sorted(ewc.fisher) == sorted(n for n, _ in model.named_parameters())


def test_ewc_on_torch_compile_wrapper_matches_plain_model():
    model = make_mlp()
    compiled = torch.compile(model, backend="eager")
    data = batches(4)
    plain = fastcl.EWC(model, 2.0)
    wrapped = fastcl.EWC(compiled, 2.0)
    plain.consolidate(data, verbose=False)
    wrapped.consolidate(data, verbose=False)
    assert sorted(wrapped.fisher) == sorted(n for n, _ in model.named_parameters())
    perturb_(model, seed=8)
    assert wrapped.penalty().item() == pytest.approx(plain.penalty().item(), rel=1e-12)
    state = wrapped.state_dict()
    fastcl.EWC(model, 1.0).load_state_dict(state)  # names interchangeable with the plain model
