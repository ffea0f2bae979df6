"""SI against an exact float64 path-integral oracle (Zenke et al.'s algorithm written out with SGD).

The oracle sees only the steps that update the weights: a step GradScaler skips, or a batch
whose gradients are thrown away, contributes nothing to ω. Parameters unfrozen or added
during a task are integrated from their first update on.
"""
import pytest
import torch
import torch.nn.functional as F

import fastcl

from .conftest import make_mlp

LR, STRENGTH, DAMPING = 0.1, 2.0, 0.1
TOL = dict(rtol=1e-9, atol=1e-12)


def data(seed, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (size,), generator=g)


class Oracle:
    """Plain SI: ω −= g·Δθ per update, Ω += relu(ω / ((θ − θ_start)² + ξ)), anchors ← θ."""

    def __init__(self, model):
        self.model = model
        self.omega, self.start, self.big_omega, self.anchor = {}, {}, {}, {}

    def step(self, x, y, applied=True):
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        grads = torch.autograd.grad(F.cross_entropy(self.model(x), y), list(params.values()))
        if not applied:
            return
        with torch.no_grad():
            for (n, p), g in zip(params.items(), grads):
                penalty = STRENGTH * self.big_omega[n] * (p - self.anchor[n]) if n in self.anchor else 0.0
                update = -LR * (g + penalty)
                if n not in self.omega:
                    self.omega[n], self.start[n] = torch.zeros_like(p), p.detach().clone()
                self.omega[n] -= g * update
                p += update

    def consolidate(self):
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for n, w in self.omega.items():
                new = torch.relu(w / ((params[n] - self.start[n]).square() + DAMPING))
                self.big_omega[n] = self.big_omega.get(n, 0.0) + new
            for n, p in params.items():
                if p.requires_grad or n in self.omega:
                    self.big_omega.setdefault(n, torch.zeros_like(p))
            for n in self.big_omega:
                self.anchor[n] = params[n].detach().clone()
        self.omega, self.start = {}, {}


def check(si, oracle, model):
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), oracle.model.get_parameter(n).detach(), **TOL, msg=n)
    assert set(si.importance) == set(oracle.big_omega)
    for n, w in oracle.big_omega.items():
        torch.testing.assert_close(si.importance[n], w, **TOL, msg=n)
    assert any(w.abs().sum() > 0 for w in si.importance.values())


@pytest.mark.parametrize("loop", ["hook_only", "penalty_in_loss", "add_penalty_grad_", "closure"])
def test_si_matches_oracle_over_three_tasks(loop):
    model, oracle = make_mlp(), Oracle(make_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    si = fastcl.SI(model, strength=STRENGTH, damping=DAMPING).attach(opt)
    for task in range(3):
        x, y = data(task)
        for _ in range(4):
            if loop == "closure":  # the gradient exists only once step() ran the closure (Lightning)
                def closure():
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                opt.step(closure)
                oracle.step(x, y)
                continue
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if loop == "penalty_in_loss":
                loss = loss + si.penalty()
            loss.backward()
            if loop == "add_penalty_grad_":
                si.add_penalty_grad_()
            opt.step()
            oracle.step(x, y)
        si.consolidate()
        oracle.consolidate()
    check(si, oracle, model)


def test_skipped_scaler_steps_and_discarded_gradients_leave_no_trace():
    """Issue 14.2: fp16-style skipped steps (inf in a gradient) and thrown-away batches."""
    model, oracle = make_mlp(), Oracle(make_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10**6)
    si = fastcl.SI(model, strength=STRENGTH, damping=DAMPING).attach(opt)
    skipped, discarded = {1, 5}, {3, 6}
    for task in range(2):
        x, y = data(10 + task)
        for step in range(8):
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y) + si.penalty()).backward()
            if step in discarded:  # e.g. a loss spike the loop decides to drop
                si.add_penalty_grad_()
                opt.zero_grad()
                oracle.step(x, y, applied=False)
                continue
            if step in skipped:
                next(model.parameters()).grad.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()
            oracle.step(x, y, applied=step not in skipped)
        si.consolidate()
        oracle.consolidate()
    assert scaler.get_scale() == 2.0**12 / 2**4  # two skipped steps per task
    check(si, oracle, model)


def test_fused_optimizer_under_scaler_records_unscaled_gradients():
    model, oracle = make_mlp(), Oracle(make_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=LR, fused=True)  # unscales inside its own step
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=10**6)
    si = fastcl.SI(model, strength=STRENGTH, damping=DAMPING).attach(opt)
    for task in range(2):
        x, y = data(20 + task)
        for step in range(4):
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            if step == 2:
                next(model.parameters()).grad.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()
            oracle.step(x, y, applied=step != 2)
        si.consolidate()
        oracle.consolidate()
    check(si, oracle, model)


def test_parameters_unfrozen_or_added_during_a_task_are_covered():
    """Issue 14.4: a layer unfrozen mid-task and a head added mid-task."""
    model, reference = make_mlp(), make_mlp()
    for m in (model, reference):
        m[0].weight.requires_grad_(False)
    oracle = Oracle(reference)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    si = fastcl.SI(model, strength=STRENGTH, damping=DAMPING).attach(opt)
    for task in range(2):
        x, y = data(30 + task)
        for step in range(6):
            if task == 0 and step == 2:
                for m in (model, reference):
                    m[0].weight.requires_grad_(True)
            if task == 1 and step == 3:
                torch.manual_seed(5)
                model.add_module("3", torch.nn.Linear(3, 3).double())
                torch.manual_seed(5)
                reference.add_module("3", torch.nn.Linear(3, 3).double())
                opt.add_param_group({"params": list(model[3].parameters())})
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            oracle.step(x, y)
        si.consolidate()
        oracle.consolidate()
    assert {"0.weight", "3.weight", "3.bias"} <= set(si.covered_names)
    assert si.importance["0.weight"].abs().sum() > 0 and si.importance["3.weight"].abs().sum() > 0
    check(si, oracle, model)


def test_consolidate_without_attach_raises_and_changes_nothing():
    """Issue 14.3: no steps were integrated, so the importance would be all zero."""
    model = make_mlp()
    si = fastcl.SI(model, strength=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = data(0)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with pytest.raises(ValueError, match="attach"):
        si.consolidate()
    assert not si.consolidated and si.num_consolidations == 0
    si.attach(opt)
    with pytest.raises(ValueError, match="no optimizer step"):  # attached, but nothing trained since
        si.consolidate()


def test_state_dict_resumes_mid_task():
    model, resumed_model = make_mlp(), make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    si = fastcl.SI(model, strength=STRENGTH).attach(opt)
    x, y = data(40)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    resumed_model.load_state_dict(model.state_dict())
    resumed = fastcl.SI(resumed_model, strength=1.0)
    resumed.load_state_dict(si.state_dict())
    si.consolidate()
    resumed.consolidate()  # the loaded path integral counts as steps
    for n, w in si.importance.items():
        assert torch.equal(w, resumed.importance[n])


@pytest.mark.parametrize("damping", [0.0, -1.0, float("nan"), 1e39, "0.1", True])
def test_bad_damping(damping):
    with pytest.raises((ValueError, TypeError), match="damping"):
        fastcl.SI(make_mlp(), 1.0, damping=damping)


def test_a_model_without_trainable_parameters_is_refused_like_l2sp():
    model = make_mlp().requires_grad_(False)
    for make in (lambda: fastcl.SI(model, 1.0), lambda: fastcl.L2SP(model, 1.0)):
        with pytest.raises(ValueError, match="no trainable parameter"):
            make()
