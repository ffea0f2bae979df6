"""attach(optimizer): the penalty gradient added in the optimizer's step pre-hook.

Every run is compared with a float64 SGD loop written out by hand: the task gradient from
``torch.autograd.grad``, the penalty gradient ``λ·w·φ'(θ − a)`` from anchors and weights
the test chose itself, ``θ ← θ − lr·(g + g_pen)``. Steps that GradScaler skips (an inf
planted in a gradient, as fp16 overflow does) must leave no trace.
"""
import gc

import pytest
import torch
import torch.nn.functional as F

import fastcl

from .conftest import make_mlp, perturb_, snapshot

LR, STRENGTH = 0.1, 0.7
TOL = dict(rtol=1e-10, atol=1e-12)  # float64 end to end


def batches(n, seed=0, size=6):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def weights_for(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: 2.0 * torch.rand(p.shape, generator=g, dtype=torch.float64) for n, p in model.named_parameters()}


def make_case(name, model):
    """(regularizer, oracle pieces): anchors = the weights now, then the model is moved away."""
    anchors, form = snapshot(model), "quadratic"
    if name in ("l2sp", "l1sp"):
        reg = (fastcl.L2SP if name == "l2sp" else fastcl.L1SP)(model, STRENGTH)
        weights = {n: torch.ones_like(a) for n, a in anchors.items()}
        form = "l1" if name == "l1sp" else form
    else:
        reg = fastcl.EWC(model, STRENGTH) if name == "ewc" else fastcl.MAS(model, STRENGTH)
        weights = weights_for(model, seed=3)
        reg.fold(weights)
    perturb_(model, seed=11)
    return reg, (anchors, weights, form)


def oracle_grad(name, theta, oracle):
    anchors, weights, form = oracle
    d = theta - anchors[name]
    return STRENGTH * weights[name] * (d if form == "quadratic" else d.sign())


def oracle_value(model, oracle):
    anchors, weights, form = oracle
    total = 0.0
    for n, p in model.named_parameters():
        d = p.detach() - anchors[n]
        total += float((weights[n] * (0.5 * d.square() if form == "quadratic" else d.abs())).sum())
    return STRENGTH * total


def oracle_run(model, oracle, steps):
    """``steps``: list of lists of (x, y) micro-batches, ``None`` for a skipped step."""
    params = dict(model.named_parameters())
    for micro in steps:
        if micro is None:
            continue
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        for x, y in micro:
            for n, g in zip(params, torch.autograd.grad(F.cross_entropy(model(x), y) / len(micro), list(params.values()))):
                grads[n] += g
        with torch.no_grad():
            for n, p in params.items():
                p -= LR * (grads[n] + oracle_grad(n, p.detach(), oracle))


def poison_(model):
    """What an fp16 overflow leaves in a gradient."""
    next(model.parameters()).grad[0].view(-1)[0] = float("inf")


LOOPS = ["plain", "penalty_in_loss", "add_penalty_grad_", "accumulate", "scaler", "fused_scaler"]


def train(model, reg, opt, data, loop, scaler=None, skip=()):
    for step, micro in enumerate(data):
        opt.zero_grad()
        for x, y in micro:
            loss = F.cross_entropy(model(x), y) / len(micro)
            if loop == "penalty_in_loss":
                loss = loss + reg.penalty() / len(micro)
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        if loop == "add_penalty_grad_":
            reg.add_penalty_grad_()
        if scaler is None:
            opt.step()
        else:
            if step in skip:
                poison_(model)
            scaler.step(opt)
            scaler.update()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("name", ["l2sp", "l1sp", "ewc", "mas"])
def test_attached_training_matches_oracle(name, loop):
    model, reference = make_mlp(), make_mlp()
    reg, oracle = make_case(name, model)
    make_case(name, reference)  # the same weights, and the same move away from the anchors
    micro = 3 if loop == "accumulate" else 1
    data = [batches(micro, seed=s) for s in range(4)]
    skip = (1,) if "scaler" in loop else ()
    opt = torch.optim.SGD(model.parameters(), lr=LR, fused=True if loop == "fused_scaler" else None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if "scaler" in loop else None
    assert reg.attach(opt) is reg
    train(model, reg, opt, data, loop, scaler=scaler, skip=skip)
    if scaler is not None:
        assert scaler.get_scale() == 2.0**9  # the planted inf made the scaler skip one step and back off
    oracle_run(reference, oracle, [None if s in skip else d for s, d in enumerate(data)])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference.get_parameter(n).detach(), **TOL, msg=n)
    assert reg.last_penalty is not None and reg.last_penalty.requires_grad is False


def test_last_penalty_is_the_value_at_the_last_step():
    model = make_mlp()
    reg, oracle = make_case("ewc", model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    reg.attach(opt)
    assert reg.last_penalty is None
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    expected = oracle_value(model, oracle)
    opt.step()
    assert reg.last_penalty.item() == pytest.approx(expected, rel=1e-12)


def test_penalty_has_no_graph_while_attached_and_detach_restores_it():
    model = make_mlp()
    reg, _ = make_case("l2sp", model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    reg.attach(opt)
    reg.attach(opt)  # idempotent: one hook
    assert not reg.penalty().requires_grad
    reg.detach()
    assert reg.penalty().requires_grad
    before = snapshot(model)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    task = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()  # detached: the step uses the task gradient only
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - LR * task[n], **TOL)


def test_a_garbage_collected_optimizer_no_longer_counts():
    model = make_mlp()
    reg, _ = make_case("l2sp", model)
    reg.attach(torch.optim.SGD(model.parameters(), lr=LR))
    gc.collect()
    assert not reg.attached and reg.penalty().requires_grad


def test_two_optimizers_each_add_their_own_parameters_once():
    model, reference = make_mlp(), make_mlp()
    reg, oracle = make_case("ewc", model)
    make_case("ewc", reference)
    body = torch.optim.SGD(model[0].parameters(), lr=LR)
    head = torch.optim.SGD(model[2].parameters(), lr=LR)
    reg.attach(body).attach(head)
    data = [batches(1, seed=s) for s in range(3)]
    for micro in data:
        body.zero_grad()
        head.zero_grad()
        x, y = micro[0]
        F.cross_entropy(model(x), y).backward()
        body.step()
        head.step()
    oracle_run(reference, oracle, data)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference.get_parameter(n).detach(), **TOL, msg=n)


def test_a_covered_parameter_in_no_attached_optimizer_is_refused_before_anything_changes():
    model = make_mlp()
    reg, _ = make_case("l2sp", model)
    body = torch.optim.SGD(model[0].parameters(), lr=LR)
    reg.attach(body)  # the head's parameters are in no attached optimizer
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    params, grads = snapshot(model), {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="2.weight"):
        body.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]) and torch.equal(p.grad, grads[n])


def test_refusals():
    model = make_mlp()
    reg, _ = make_case("l2sp", model)
    with pytest.raises(TypeError, match="optimizer"):
        reg.attach("sgd")
    with pytest.raises(ValueError, match="L-BFGS"):
        reg.attach(torch.optim.LBFGS(model.parameters()))
    with pytest.raises(ValueError, match="none of"):
        reg.attach(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=LR))


@pytest.mark.parametrize("positional", [True, False])
def test_step_with_a_closure_adds_the_penalty_after_the_closure(positional):
    """Lightning's automatic optimization: zero_grad, forward and backward run inside step(closure)."""
    model, reference = make_mlp(), make_mlp()
    reg, oracle = make_case("ewc", model)
    make_case("ewc", reference)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    reg.attach(opt)
    data = [batches(1, seed=s) for s in range(3)]
    for micro in data:
        x, y = micro[0]

        def closure():
            opt.zero_grad()  # would wipe a penalty gradient added before the closure
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure) if positional else opt.step(closure=closure)
        assert loss.item() == pytest.approx(F.cross_entropy(reference(x), y).item(), rel=1e-12)
        oracle_run(reference, oracle, [micro])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference.get_parameter(n).detach(), **TOL, msg=n)


def test_unconsolidated_or_zero_strength_adds_nothing():
    model = make_mlp()
    ewc = fastcl.EWC(model, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ewc.attach(opt)  # nothing covered yet: allowed
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = snapshot(model)
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - LR * grads[n], **TOL)
    assert ewc.last_penalty is None


def test_a_copy_of_an_attached_regularizer_is_not_attached():
    import copy

    model = make_mlp()
    reg, _ = make_case("l2sp", model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    reg.attach(opt)
    clone = copy.deepcopy(reg)
    assert reg.attached and not clone.attached and clone.penalty().requires_grad  # no hook runs the copy


@pytest.mark.parametrize("name", ["l2sp", "ewc", "si"])
def test_an_optimizer_of_another_model_is_refused_before_consolidation(name):
    model, other = make_mlp(), make_mlp(seed=1)
    reg = fastcl.SI(model, 1.0) if name == "si" else fastcl.EWC(model, 1.0) if name == "ewc" else fastcl.L2SP(model, 1.0)
    assert reg.consolidated == (name == "l2sp")
    opt = torch.optim.SGD(other.parameters(), lr=LR)
    with pytest.raises(ValueError, match="none of"):
        reg.attach(opt)
    assert not opt._optimizer_step_pre_hooks and not reg.attached
    own = torch.optim.SGD(list(model.parameters())[:1], lr=LR)
    reg.attach(own)  # one of its own parameters is enough
    assert reg.attached


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("attached", [False, True])
def test_fused_gradient_after_create_graph_is_refused_before_anything_changes(attached):
    model = make_mlp()
    reg = fastcl.L2SP(model, 1.0)
    perturb_(model, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    if attached:
        reg.attach(opt)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward(create_graph=True)
    params, grads = snapshot(model), {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"create_graph.*penalty\(\)"):
        opt.step() if attached else reg.add_penalty_grad_()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach().double(), params[n]) and torch.equal(p.grad.detach(), grads[n])
