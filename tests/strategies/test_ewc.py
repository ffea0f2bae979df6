"""EWC (separate and online) against float64 oracles written out task by task."""
import pytest
import torch

import fastcl
import fastcl.strategies.ewc as ewc_module

from .conftest import make_mlp, perturb_, snapshot


def random_fishers(model, n_tasks, seed=0, frozen=()):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_tasks):
        f = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) * 3 for n, p in model.named_parameters() if n not in frozen}
        for t in f.values():  # some exact zeros, as a Fisher has for dead units
            t[torch.rand(t.shape, generator=g) < 0.2] = 0.0
        out.append(f)
    return out


@pytest.fixture
def fake_fisher(monkeypatch):
    """Feed EWC.consolidate pre-computed Fishers (the Fisher engine is tested on its own)."""
    def fake(model, data, loss_fn=None, kind="empirical", max_samples=None, **kwargs):
        fake.calls.append(dict(loss_fn=loss_fn, kind=kind, max_samples=max_samples, **kwargs))
        return fake.queue.pop(0)

    fake.calls = []
    monkeypatch.setattr(ewc_module, "diagonal_fisher", fake)
    fake.queue = _Queue()
    fake.queue.calls = fake.calls
    return fake.queue


class _Queue(list):
    """A list that also records the calls made with it."""


def test_consolidate_passes_every_option_through(fake_fisher):
    model = make_mlp()
    ewc = fastcl.EWC(model, 1.0, fisher="exact", top_k=2)
    fake_fisher.append(random_fishers(model, 1)[0])
    forward, output_fn = (lambda m, b: b), (lambda out: out)
    ewc.consolidate([None], max_samples=5, forward=forward, verbose=False, output_fn=output_fn)
    assert fake_fisher.calls == [dict(loss_fn=None, kind="exact", max_samples=5, forward=forward, verbose=False,
                                      output_fn=output_fn, top_k=2)]
    with pytest.raises(TypeError):
        ewc.consolidate([None], None, 5)  # options are keyword-only


def test_fold_is_consolidate_without_the_fisher_pass(fake_fisher):
    model = make_mlp()
    fisher = random_fishers(model, 1, seed=4)[0]
    by_fold, by_consolidate = fastcl.EWC(model, 1.0), fastcl.EWC(model, 1.0)
    by_fold.fold(fisher)
    fake_fisher.append(fisher)
    by_consolidate.consolidate([None])
    for n in fisher:
        assert torch.equal(by_fold.fisher[n], by_consolidate.fisher[n]) and torch.equal(by_fold.anchors[n], by_consolidate.anchors[n])


def separate_oracle(model, history, strength):
    total = 0.0
    for fisher, anchor in history:
        for n, p in model.named_parameters():
            if n in fisher:
                total += 0.5 * strength * (fisher[n] * (p.detach().double() - anchor[n]).square()).sum().item()
    return total


def test_zero_before_consolidation(fake_fisher):
    model = make_mlp()
    ewc = fastcl.EWC(model, 10.0)
    value = ewc.penalty()
    assert value.item() == 0.0 and value.dim() == 0
    assert ewc.add_penalty_grad_().item() == 0.0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("n_tasks", [1, 2, 4])
def test_separate_mode_exact_over_tasks(fake_fisher, n_tasks):
    model = make_mlp()
    ewc = fastcl.EWC(model, 3.0)
    fishers = random_fishers(model, n_tasks, seed=n_tasks)
    history = []
    for t in range(n_tasks):
        perturb_(model, seed=10 + t)
        fake_fisher.append(fishers[t])
        ewc.consolidate([None])
        history.append((fishers[t], snapshot(model)))
    perturb_(model, seed=99)
    value = ewc.penalty()
    assert value.item() == pytest.approx(separate_oracle(model, history, 3.0), rel=1e-9)
    value.backward()
    for n, p in model.named_parameters():
        expected = sum(3.0 * f[n] * (p.detach().double() - a[n]) for f, a in history)
        torch.testing.assert_close(p.grad, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ewc.fisher["0.weight"], sum(f["0.weight"] for f, _ in history))


def test_online_mode_decay(fake_fisher):
    model = make_mlp()
    ewc = fastcl.EWC(model, 2.0, mode="online", decay=0.5)
    fishers = random_fishers(model, 3, seed=7)
    acc = None
    for t in range(3):
        perturb_(model, seed=20 + t)
        fake_fisher.append(fishers[t])
        ewc.consolidate([None])
        acc = fishers[t] if acc is None else {n: 0.5 * acc[n] + fishers[t][n] for n in acc}
    anchor = snapshot(model)
    perturb_(model, seed=30)
    expected = sum((0.5 * 2.0 * acc[n] * (p.detach().double() - anchor[n]).square()).sum().item() for n, p in model.named_parameters())
    assert ewc.penalty().item() == pytest.approx(expected, rel=1e-9)
    for n in acc:
        torch.testing.assert_close(ewc.fisher[n], acc[n])


def test_frozen_then_added_parameters(fake_fisher):
    model = make_mlp()
    model[2].weight.requires_grad_(False)
    ewc = fastcl.EWC(model, 1.0)
    fishers = random_fishers(model, 2, seed=3, frozen=("2.weight",))
    perturb_(model, seed=1)
    fake_fisher.append(fishers[0])
    ewc.consolidate([None])
    assert "2.weight" not in ewc.covered_names
    history = [(fishers[0], snapshot(model))]
    model[2].weight.requires_grad_(True)
    perturb_(model, seed=2)
    fishers[1]["2.weight"] = torch.rand(3, 7, dtype=torch.float64)
    fake_fisher.append(fishers[1])
    ewc.consolidate([None])
    history.append((fishers[1], snapshot(model)))
    model.add_module("3", torch.nn.Linear(3, 2).double())  # a new head: not penalized
    perturb_(model, seed=3)
    assert "3.weight" not in ewc.covered_names
    assert ewc.penalty().item() == pytest.approx(separate_oracle(model, history, 1.0), rel=1e-9)


def test_failed_consolidation_changes_nothing(fake_fisher):
    model = make_mlp()
    ewc = fastcl.EWC(model, 1.0)
    fake_fisher.append(random_fishers(model, 1)[0])
    ewc.consolidate([None])
    perturb_(model, seed=5)
    before = ewc.state_dict()
    value = ewc.penalty().item()
    bad = random_fishers(model, 1, seed=9)[0]
    bad["2.bias"][0] = float("nan")
    fake_fisher.append(bad)
    with pytest.raises(ValueError, match="2.bias"):
        ewc.consolidate([None])
    assert ewc.penalty().item() == value
    after = ewc.state_dict()
    assert after["num_consolidations"] == before["num_consolidations"] == 1
    for n in before["anchors"]:
        assert torch.equal(before["anchors"][n], after["anchors"][n])
        assert torch.equal(before["importance"][n], after["importance"][n])


def test_state_dict_round_trip(fake_fisher):
    model = make_mlp()
    ewc = fastcl.EWC(model, 4.0)
    for t, f in enumerate(random_fishers(model, 2, seed=11)):
        perturb_(model, seed=40 + t)
        fake_fisher.append(f)
        ewc.consolidate([None])
    perturb_(model, seed=50)
    clone = fastcl.EWC(model, 1.0)
    clone.load_state_dict(ewc.state_dict())
    assert clone.penalty().item() == pytest.approx(ewc.penalty().item(), rel=1e-12)
    with pytest.raises(ValueError, match="mode"):
        fastcl.EWC(model, 1.0, mode="online").load_state_dict(ewc.state_dict())


@pytest.mark.parametrize("kwargs", [dict(mode="both"), dict(fisher="diag"), dict(decay=1.5, mode="online"), dict(decay=0.5), dict(strength=-1)])
def test_bad_arguments(kwargs):
    args = dict(strength=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError):
        fastcl.EWC(make_mlp(), **args)


def test_bf16_storage_halves_memory_and_stays_close(fake_fisher):
    model = make_mlp(torch.float32)
    f = {n: t.float() for n, t in random_fishers(model, 1)[0].items()}
    ewc32 = fastcl.EWC(model, 1.0)
    ewc16 = fastcl.EWC(model, 1.0, storage_dtype=torch.bfloat16)
    fake_fisher.extend([f, f])
    ewc32.consolidate([None])
    ewc16.consolidate([None])
    assert ewc16.fisher["0.weight"].dtype == torch.bfloat16
    perturb_(model, seed=6)
    assert ewc16.penalty().item() == pytest.approx(ewc32.penalty().item(), rel=2e-2)
