"""fastcl.ops.penalty / anchored_penalty (torch backend) against float64 formulas."""
import pytest
import torch

from fastcl.ops import anchored_penalty, penalty, use_backend

SIZES = [(1,), (7,), (3, 5), (33, 17), (1000,)]


def make(dtype, storage, weighted, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in SIZES]
    anchors = [torch.randn(s, generator=g).to(storage) for s in SIZES]
    weights = [torch.rand(s, generator=g).to(storage) for s in SIZES] if weighted else None
    return params, anchors, weights


def oracle(params, anchors, weights, scale, kind):
    value, grads = 0.0, []
    for i, p in enumerate(params):
        d = p.double() - anchors[i].double()
        w = torch.ones_like(d) if weights is None else weights[i].double()
        value += scale * ((w * d * d / 2).sum() if kind == "quadratic" else (w * d.abs()).sum()).item()
        grads.append(scale * w * (d if kind == "quadratic" else d.sign()))
    return value, grads


@pytest.mark.parametrize("dtype,storage,tol", [(torch.float64, torch.float64, 1e-12), (torch.float32, torch.float32, 1e-5), (torch.bfloat16, torch.float32, 1e-5), (torch.float16, torch.bfloat16, 1e-5), (torch.float32, torch.bfloat16, 1e-5)])
@pytest.mark.parametrize("kind", ["quadratic", "l1"])
@pytest.mark.parametrize("weighted", [True, False])
def test_value_and_grads(dtype, storage, tol, kind, weighted):
    params, anchors, weights = make(dtype, storage, weighted, seed=hash((str(dtype), kind, weighted)) % 1000)
    exp_value, exp_grads = oracle(params, anchors, weights, 0.37, kind)
    start = [torch.full_like(p, 0.25) for p in params]
    grads = [s.clone() for s in start]
    with use_backend("torch"):
        value = penalty(params, anchors, weights, scale=0.37, kind=kind, grads=grads)
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert value.item() == pytest.approx(exp_value, rel=tol)
    gtol = 1e-12 if dtype == torch.float64 else {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for g, s, e in zip(grads, start, exp_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), s.double() + e, rtol=gtol, atol=gtol)


def test_non_contiguous_and_empty_tensors():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(9, 14, generator=g, dtype=torch.float64)
    params = [base[:, ::2], torch.empty(0, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    anchors = [torch.randn(9, 7, generator=g, dtype=torch.float64).t().contiguous().t(), torch.empty(0, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    weights = [torch.rand(9, 7, generator=g, dtype=torch.float64), torch.empty(0, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64)]
    grads = [torch.zeros(9, 14, dtype=torch.float64)[:, 1::2], torch.empty(0, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]
    value = penalty(params, anchors, weights, scale=2.0, grads=grads)
    exp_value, exp_grads = oracle(params, anchors, weights, 2.0, "quadratic")
    assert value.item() == pytest.approx(exp_value, rel=1e-12)
    for got, exp in zip(grads, exp_grads):
        torch.testing.assert_close(got, exp)


def test_anchored_penalty_autograd_matches_formula():
    params, anchors, weights = make(torch.float64, torch.float64, True, seed=5)
    params = [p.requires_grad_() for p in params]
    value = anchored_penalty(params, anchors, weights, scale=1.5)
    (3.0 * value).backward()
    exp_value, exp_grads = oracle(params, anchors, weights, 1.5, "quadratic")
    assert value.item() == pytest.approx(exp_value, rel=1e-12)
    for p, e in zip(params, exp_grads):
        torch.testing.assert_close(p.grad, 3.0 * e)


def test_gradcheck():
    params, anchors, weights = make(torch.float64, torch.float64, True, seed=6)
    params = [p[:4].clone().requires_grad_() for p in params[1:3]]
    anchors = [a[:4].clone() for a in anchors[1:3]]
    weights = [w[:4].clone() for w in weights[1:3]]
    assert torch.autograd.gradcheck(lambda *ps: anchored_penalty(list(ps), anchors, weights, scale=0.7), params)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(kind="l3"), ValueError),
        (dict(scale=float("nan")), ValueError),
        (dict(anchors=[torch.zeros(3)]), ValueError),
        (dict(anchors=[torch.zeros(2, 2)]), ValueError),
        (dict(anchors=[torch.zeros(4, dtype=torch.float16)]), TypeError),
        (dict(params=[torch.zeros(4, dtype=torch.int64)]), TypeError),
        (dict(grads=[torch.zeros(4, dtype=torch.float64)]), TypeError),
        (dict(weights=[torch.zeros(4), torch.zeros(4)]), ValueError),
    ],
)
def test_bad_input(kwargs, error):
    args = dict(params=[torch.zeros(4)], anchors=[torch.zeros(4)], weights=None, scale=1.0, kind="quadratic", grads=None)
    args.update(kwargs)
    with pytest.raises(error):
        penalty(args.pop("params"), args.pop("anchors"), args.pop("weights"), **args)
