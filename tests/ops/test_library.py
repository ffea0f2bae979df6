"""The torch.library registrations of fastcl's ops: opcheck on every registered op, and
torch.compile with the default (inductor) backend on code calling the penalty.

opcheck verifies the schema (declared mutations), the fake implementation against the
real one, and that the ops trace under AOT dispatch.
"""
import pytest
import torch

from fastcl.ops import anchored_penalty, penalty
from fastcl.ops._library import REGISTERED


def penalty_args(weighted=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g).to(torch.bfloat16)]
    anchors = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    weights = [torch.rand(5, 3, generator=g), torch.rand(7, generator=g)] if weighted else []
    return params, anchors, weights


def sample_calls():
    """``{qualname: [(args, kwargs), ...]}`` for every op fastcl registers."""
    g = torch.Generator().manual_seed(1)
    params, anchors, weights = penalty_args()
    grads = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g).to(torch.bfloat16)]
    x, go = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 2, generator=g)
    student, teacher = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    return {
        "fastcl::penalty": [((params, anchors, weights, 0.5, "quadratic"), {}),
                            ((params, anchors, [], 2.0, "l1"), {})],
        "fastcl::penalty_grad_": [((params, anchors, weights, 0.5, "quadratic", grads, False), {}),
                                  ((params, anchors, [], 0.5, "l1", grads, True), {})],
        "fastcl::penalty_with_grad": [((params, anchors, weights, 0.5, "quadratic"), {})],
        "fastcl::sqgrad": [((x, go, torch.zeros(2, 5), 2), {})],
        "fastcl::distill": [((student, teacher, 2.0, None, 1.0), {}),
                            ((student, teacher, 1.0, torch.tensor([True, False, True, True]), 0.25), {})],
    }


SAMPLES = sample_calls()


def test_every_registered_op_has_samples():
    assert set(REGISTERED) == set(SAMPLES)


@pytest.mark.parametrize("qualname,call", [(q, c) for q, calls in SAMPLES.items() for c in calls],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(qualname, call):
    args, kwargs = call
    torch.library.opcheck(REGISTERED[qualname], args, kwargs,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_inductor_compiles_penalty_code():
    """The default backend: anchored_penalty in a loss, penalty() value-only and with grads."""
    torch._dynamo.reset()
    params, anchors, weights = penalty_args(seed=2)
    params = [p.float().requires_grad_() for p in params]
    x = torch.randn(4, 15, generator=torch.Generator().manual_seed(3))

    def loss_fn(params):
        task = (x @ params[0].reshape(15)).square().mean() + params[1].sum()
        return task + anchored_penalty(params, anchors, weights, scale=0.5) + penalty(params, anchors, None, scale=0.1)

    def fused(params, grads):
        return penalty(params, anchors, weights, scale=2.0, form="l1", grads=grads)

    eager = loss_fn(params)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(loss_fn, fullgraph=True)(params)
    compiled_grads = torch.autograd.grad(compiled, params)
    torch.testing.assert_close(compiled, eager)
    for c, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(c, e)

    grads_e = [torch.ones(5, 3), torch.ones(7)]
    grads_c = [torch.ones(5, 3), torch.ones(7)]
    value_e = fused([p.detach() for p in params], grads_e)
    value_c = torch.compile(fused, fullgraph=True)([p.detach() for p in params], grads_c)
    torch.testing.assert_close(value_c, value_e)
    for c, e in zip(grads_c, grads_e):
        torch.testing.assert_close(c, e)
