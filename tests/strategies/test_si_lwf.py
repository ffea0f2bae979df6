"""SI's path integral and LwF's distillation against float64 oracles."""
import pytest
import torch
import torch.nn.functional as F

import fastcl

from .conftest import make_mlp, snapshot


def si_oracle_run(model, data, steps, lr, strength, damping, tasks):
    """Plain re-implementation of Zenke et al.'s algorithm with SGD, in float64."""
    params = dict(model.named_parameters())
    omega = {n: torch.zeros_like(p) for n, p in params.items()}
    big_omega = {n: torch.zeros_like(p) for n, p in params.items()}
    anchor = None
    start = snapshot(model)
    for task in range(tasks):
        x, y = data[task]
        for _ in range(steps):
            task_loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(task_loss, list(params.values()), retain_graph=True)
            reg = 0.0
            if anchor is not None:
                reg = sum(0.5 * strength * (big_omega[n] * (p - anchor[n]).square()).sum() for n, p in params.items())
            total_grads = torch.autograd.grad(task_loss + reg, list(params.values()))
            with torch.no_grad():
                for (n, p), g, gt in zip(params.items(), grads, total_grads):
                    update = -lr * gt
                    omega[n] -= g * update
                    p += update
        with torch.no_grad():
            for n, p in params.items():
                delta = p - start[n]
                big_omega[n] += torch.relu(omega[n] / (delta.square() + damping))
                omega[n].zero_()
            start = snapshot(model)
            anchor = snapshot(model)
    return big_omega, anchor


def test_si_matches_oracle():
    torch.manual_seed(0)
    data = [(torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(3)]
    oracle_model = make_mlp()
    big_omega, anchor = si_oracle_run(oracle_model, data, steps=5, lr=0.1, strength=2.0, damping=0.1, tasks=3)

    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si = fastcl.SI(model, strength=2.0, damping=0.1).attach(opt)
    for task in range(3):
        x, y = data[task]
        for _ in range(5):
            opt.zero_grad()
            (F.cross_entropy(model(x), y) + si.penalty()).backward()
            opt.step()
        si.consolidate()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), oracle_model.get_parameter(n).detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(si.importance[n], big_omega[n], rtol=1e-8, atol=1e-12)


def test_si_fast_path_also_recovers_unregularized_gradient():
    torch.manual_seed(1)
    data = [(torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(2)]
    results = []
    for fast in (False, True):
        model = make_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        si = fastcl.SI(model, strength=5.0).attach(opt)
        for task in range(2):
            x, y = data[task]
            for _ in range(4):
                opt.zero_grad()
                if fast:
                    F.cross_entropy(model(x), y).backward()
                    si.add_penalty_grad_()
                else:
                    (F.cross_entropy(model(x), y) + 0.5 * si.penalty() + 0.5 * si.penalty()).backward()
                opt.step()
            si.consolidate()
        results.append(si.importance)
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], rtol=1e-9, atol=1e-12)


def test_si_bad_damping():
    with pytest.raises(ValueError):
        fastcl.SI(make_mlp(), 1.0, damping=0.0)


def test_lwf_penalty_matches_formula_and_zero_before():
    torch.manual_seed(2)
    model = make_mlp()
    lwf = fastcl.LwF(model, strength=0.5, temperature=3.0)
    x = torch.randn(8, 5, dtype=torch.float64)
    assert lwf.penalty(x, model(x)).item() == 0.0
    lwf.consolidate()
    teacher_out = model(x).detach()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    logits = model(x)
    old = [0, 2]
    value = lwf.penalty(x, logits, old_classes=old)
    s, t = logits[:, old].detach() / 3.0, teacher_out[:, old] / 3.0
    pt = t.softmax(-1)
    expected = 0.5 * 9.0 * (pt * (pt.log() - s.log_softmax(-1))).sum(-1).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    value.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(not p.requires_grad for p in lwf.teacher.parameters())


def test_lwf_state_round_trip_and_bad_temperature():
    model = make_mlp()
    lwf = fastcl.LwF(model, 1.0, 2.0)
    lwf.consolidate()
    state = lwf.state_dict()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    other = fastcl.LwF(model)
    other.load_state_dict(state)
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(other.teacher_logits(x), lwf.teacher_logits(x))
    with pytest.raises(ValueError):
        fastcl.LwF(model, temperature=0.0)


def test_si_with_grad_scaler_matches_unscaled_training():
    torch.manual_seed(3)
    data = [(torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(2)]
    results = []
    for use_scaler in (False, True):
        model = make_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10**6) if use_scaler else None
        si = fastcl.SI(model, strength=5.0).attach(opt, scaler=scaler)
        for task in range(2):
            x, y = data[task]
            for _ in range(4):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y) + si.penalty()
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
            si.consolidate()
        results.append(si.importance)
    for n in results[0]:
        torch.testing.assert_close(results[1][n], results[0][n], rtol=1e-9, atol=1e-12)
