"""``loss + reg.penalty()`` keeps autograd's semantics whatever happens between forward and backward.

The penalty's gradient is g = λ·F·(θ−θ*) for EWC. These are the cases that rule out writing
g into an existing ``.grad`` during the forward pass (which would save AccumulateGrad's add):
``zero_grad()`` between forward and backward, ``torch.autograd.grad`` / ``backward(inputs=...)``
(which must not touch ``.grad``), a scaled loss or ``backward(gradient=...)`` (GradScaler),
a forward never followed by a backward, tensor hooks and a retained graph. Every case starts
from a stale ``.grad`` (as in gradient accumulation) and compares with float64 autograd.
"""
import pytest
import torch

import fastcl
from fastcl.testing import TOLERANCES, param_id

from .conftest import make_mlp, perturb_

STRENGTH = 2.5
# float64, and float32 (which runs the compiled store kernel where it is built)
DTYPES = pytest.mark.parametrize("dtype, tol", TOLERANCES[:2], ids=param_id)


def setup(dtype):
    """An MLP, an EWC with random importance anchored at its weights, then moved; a batch; the
    float64 gradient of task + penalty; and a stale ``.grad`` of ones on every parameter."""
    model = make_mlp(dtype)
    ewc = fastcl.EWC(model, STRENGTH)
    g = torch.Generator().manual_seed(3)
    ewc.fold({n: torch.rand(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()})
    perturb_(model, seed=4)
    x = torch.randn(6, 5, generator=g, dtype=dtype)
    want = expected(model, ewc, x)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    return model, ewc, x, want


def task(model, x):
    return model(x).square().mean()


def expected(model, ewc, x):
    """{name: ∂(task + penalty)/∂θ} in float64."""
    ref = make_mlp(torch.float64)
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    grads = torch.autograd.grad(task(ref, x.double()), list(ref.parameters()))
    out = {}
    for (n, p), tg in zip(model.named_parameters(), grads):
        a, w = ewc.anchors[n].double(), ewc.importance[n].double()
        out[n] = tg + STRENGTH * w * (p.detach().double() - a)
    return out


def close(got, want, tol):
    torch.testing.assert_close(got.double(), want, rtol=tol.grad.rtol, atol=tol.grad.atol)


def check_grads(model, want, tol, *, factor=1.0, stale=1.0):
    """Every ``.grad`` equals ``stale + factor·want``."""
    for n, p in model.named_parameters():
        close(p.grad, stale + factor * want[n], tol)


@DTYPES
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_between_forward_and_backward(dtype, tol, set_to_none):
    model, ewc, x, want = setup(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = task(model, x) + ewc.penalty()
    opt.zero_grad(set_to_none=set_to_none)
    loss.backward()
    check_grads(model, want, tol, stale=0.0)


@DTYPES
def test_autograd_grad_and_backward_inputs_leave_other_grads_alone(dtype, tol):
    model, ewc, x, want = setup(dtype)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    grads = torch.autograd.grad(task(model, x) + ewc.penalty(), params)
    for n, p, g in zip(names, params, grads):
        assert torch.equal(p.grad, torch.ones_like(p))
        close(g, want[n], tol)
    (task(model, x) + ewc.penalty()).backward(inputs=[params[0]])
    close(params[0].grad, 1 + want[names[0]], tol)
    for p in params[1:]:
        assert torch.equal(p.grad, torch.ones_like(p))


@DTYPES
def test_scaled_backward_into_present_grad(dtype, tol):
    """GradScaler multiplies the loss; backward(gradient=...) scales likewise: the penalty's part too."""
    model, ewc, x, want = setup(dtype)
    (8.0 * (task(model, x) + ewc.penalty())).backward()
    (task(model, x) + ewc.penalty()).backward(gradient=torch.tensor(0.5, dtype=dtype))
    check_grads(model, want, tol, factor=8.5)


@DTYPES
def test_forward_without_backward_changes_no_grad(dtype, tol):
    model, ewc, x, _ = setup(dtype)
    versions = [p.grad._version for p in model.parameters()]
    loss = task(model, x) + ewc.penalty()
    del loss
    for p, v in zip(model.parameters(), versions):
        assert torch.equal(p.grad, torch.ones_like(p)) and p.grad._version == v


@DTYPES
def test_tensor_hook_sees_the_penalty_gradient(dtype, tol):
    model, ewc, x, want = setup(dtype)
    first = next(model.parameters())
    seen = []
    first.register_hook(lambda g: seen.append(g.clone()) or 2 * g)
    (task(model, x) + ewc.penalty()).backward()
    close(seen[0], want[next(iter(want))], tol)
    for i, (n, p) in enumerate(model.named_parameters()):
        close(p.grad, 1 + (2 if i == 0 else 1) * want[n], tol)


@DTYPES
def test_retained_graph_adds_twice(dtype, tol):
    model, ewc, x, want = setup(dtype)
    loss = task(model, x) + ewc.penalty()
    loss.backward(retain_graph=True)
    loss.backward()
    check_grads(model, want, tol, factor=2.0)
