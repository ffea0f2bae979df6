"""fastcl.ops.penalty / anchored_penalty on every CPU backend against float64 formulas.

value = s·Σ w·φ(θ−a); penalty(grads=g): g += s·w·φ'(θ−a) (store=True: g = s·w·φ'(θ−a));
φ = d²/2 (quadratic) or |d| (l1). Also: the guarantees of the op (atomic refusals of
aliased, sparse and inference-mode gradients, version counters, a validation cache that
never accepts a changed list) and of the autograd path (buffers adopted as .grad,
create_graph, retain_graph, partial requires_grad, thread-count determinism).
"""
import importlib
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcl.ops import anchored_penalty, op_backends, penalty, use_backend
from fastcl.testing import (
    TOL,
    assert_grads_close,
    assert_penalty_matches,
    at_thread_counts,
    penalty_inputs,
    penalty_oracle,
    seed_of,
)

penalty_module = importlib.import_module("fastcl.ops.penalty")

SIZES = [(1,), (7,), (3, 5), (33, 17), (1000,)]


def backends():
    """Backends that run the penalty on CPU here (triton only under its interpreter)."""
    out = []
    for name in ("torch", "cpp", "triton"):
        if name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        with use_backend(name):
            if op_backends("cpu")["penalty"].available:
                out.append(name)
    return out


BACKENDS = backends()
CASES = [  # (θ dtype, a/w dtype)
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16),
    (torch.float32, torch.bfloat16),
]


def run_case(backend, dtype, storage, form, weighted, store, shapes=SIZES, scale=0.37):
    if backend != "torch" and dtype == torch.float64:
        pytest.skip("float64 runs on the torch backend only")
    params, anchors, weights, start = penalty_inputs(shapes, dtype, storage, weighted, seed_of(backend, dtype, form, weighted))
    grads = [torch.full_like(g, float("nan")) for g in start] if store else [g.clone() for g in start]
    with use_backend(backend):
        value = penalty(params, anchors, weights, scale=scale, form=form, grads=grads, store=store)
    tol = TOL[dtype].truncating() if backend == "triton" else TOL[dtype]  # Triton's CPU interpreter truncates
    assert_penalty_matches(value, grads, params, anchors, weights, scale, form, start, store=store, tol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,storage", CASES)
@pytest.mark.parametrize("form", ["quadratic", "l1"])
@pytest.mark.parametrize("store", [False, True])
def test_value_and_grads_every_backend(backend, dtype, storage, form, store):
    if backend == "triton" and storage == torch.float64:
        pytest.skip("float64 anchors run on the torch backend")
    run_case(backend, dtype, storage, form, weighted=(form == "quadratic"), store=store,
             shapes=[(1,), (7,), (3, 5), (40,)] if backend == "triton" else SIZES)


@pytest.mark.parametrize("weighted", [True, False])
def test_value_only_and_unweighted(weighted):
    params, anchors, weights, _ = penalty_inputs(SIZES, torch.float32, torch.float32, weighted, seed=4)
    value = penalty(params, anchors, weights, scale=2.0)
    assert value.item() == pytest.approx(penalty_oracle(params, anchors, weights, 2.0, "quadratic", None)[0], rel=1e-5)


def test_non_contiguous_and_empty_tensors():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(9, 14, generator=g, dtype=torch.float64)
    params = [base[:, ::2], torch.empty(0, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    anchors = [torch.randn(9, 7, generator=g, dtype=torch.float64).t().contiguous().t(), torch.empty(0, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    weights = [torch.rand(9, 7, generator=g, dtype=torch.float64), torch.empty(0, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64)]
    start = [torch.randn(9, 14, dtype=torch.float64)[:, 1::2], torch.empty(0, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]
    for store in (False, True):
        grads = [s.clone() if not store else torch.full_like(s, float("nan")) for s in start]
        grads[0] = torch.zeros(9, 14, dtype=torch.float64)[:, 1::2].copy_(grads[0])  # a strided view, as given
        value = penalty(params, anchors, weights, scale=2.0, grads=grads, store=store)
        exp_value, exp_grads = penalty_oracle(params, anchors, weights, 2.0, "quadratic", start, store=store)
        assert value.item() == pytest.approx(exp_value, rel=1e-12)
        for got, exp in zip(grads, exp_grads):
            torch.testing.assert_close(got, exp)


def channels_last_set(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 16, 33, 31), (64, 3, 7, 7), (5,)]
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    params = [p.to(memory_format=torch.channels_last) if p.dim() == 4 else p for p in params]
    anchors = [torch.empty_like(p).copy_(p + 0.3 * torch.randn(p.shape, generator=g)) for p in params]
    weights = [torch.empty_like(p).copy_(torch.rand(p.shape, generator=g)) for p in params]
    grads = [torch.empty_like(p).copy_(torch.randn(p.shape, generator=g)) for p in params]
    return params, anchors, weights, grads


@pytest.mark.parametrize("store", [False, True])
def test_channels_last_runs_the_kernel_bitwise_across_threads(monkeypatch, store):
    """Dense tensors sharing one memory layout are flat memory to an elementwise op: they
    reach the kernel (not the strided reference path), which is bitwise thread-count independent."""
    params, anchors, weights, start = channels_last_set()
    assert not params[0].is_contiguous()
    monkeypatch.setattr(penalty_module, "penalty_reference", lambda *a, **k: pytest.fail("took the strided path"))

    def run():
        grads = [s.clone() for s in start]
        return penalty(params, anchors, weights, scale=0.7, grads=grads, store=store), grads

    (v1, g1), (v2, g2) = at_thread_counts(run)
    assert torch.equal(v1, v2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert all(g.stride() == p.stride() for g, p in zip(g1, params))
    assert_penalty_matches(v1, g1, params, anchors, weights, 0.7, "quadratic", start, store=store)


def test_mixed_layouts_take_the_reference_path():
    """A channels_last θ with a contiguous anchor is not one layout: reference path, still exact."""
    params, anchors, weights, start = channels_last_set(seed=1)
    anchors[0] = anchors[0].contiguous()
    grads = [s.clone() for s in start]
    value = penalty(params, anchors, weights, scale=0.7, grads=grads)
    assert_penalty_matches(value, grads, params, anchors, weights, 0.7, "quadratic", start)


# ----------------------------------------------------------------------------- the op's guarantees

def small_set(seed=0, n=3):
    return penalty_inputs([(4, 3)] * n, torch.float32, torch.float32, True, seed)


def test_version_counters_are_bumped():
    params, anchors, weights, grads = small_set()
    before = [g._version for g in grads]
    for store in (False, True):
        penalty(params, anchors, weights, grads=grads, store=store)
    assert all(g._version >= b + 2 for g, b in zip(grads, before))
    # autograd now sees the in-place write: a graph that saved a gradient refuses to use it
    x = torch.ones(4, 3, requires_grad=True)
    y = (x * grads[0]).sum()
    penalty(params, anchors, weights, grads=grads)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def assert_unchanged(grads, snapshot):
    assert all(torch.equal(g, s) for g, s in zip(grads, snapshot))


@pytest.mark.parametrize("make_grads", [
    pytest.param(lambda g: [g[0], g[1], g[0]], id="same-tensor-twice"),
    pytest.param(lambda g: [g[0], g[1], g[0].view(-1)[:12].view(4, 3)], id="same-memory-other-view"),
    pytest.param(lambda g: (lambda flat: [g[0], flat[:12].view(4, 3), flat[6:18].view(4, 3)])(torch.zeros(18)), id="overlapping-views"),
])
def test_aliased_gradients_are_refused_before_any_write(make_grads):
    params, anchors, weights, grads = small_set()
    grads = make_grads(grads)
    snapshot = [g.clone() for g in grads]
    with pytest.raises(ValueError, match="shares memory"):
        penalty(params, anchors, weights, grads=grads)
    assert_unchanged(grads, snapshot)


def test_gradient_aliasing_an_input_or_itself_is_refused():
    params, anchors, weights, grads = small_set()
    with pytest.raises(ValueError, match=r"grads\[1\] shares memory with params\[1\]"):
        penalty(params, anchors, weights, grads=[grads[0], params[1], grads[2]])
    with pytest.raises(ValueError, match="overlapping elements"):
        penalty(params, anchors, weights, grads=[grads[0], torch.zeros(3).expand(4, 3), grads[2]])


def test_interleaved_views_of_one_buffer_are_not_aliases():
    """g[:, 0::2] and g[:, 1::2] share a buffer but no element: accepted, exact."""
    params, anchors, weights, _ = small_set(seed=2, n=2)
    buffer = torch.zeros(4, 6)
    grads = [buffer[:, 0::2], buffer[:, 1::2]]
    penalty(params, anchors, weights, scale=1.5, grads=grads)
    want = penalty_oracle(params, anchors, weights, 1.5, "quadratic", [torch.zeros(4, 3)] * 2)[1]
    assert_grads_close(grads, want, torch.float32)


def test_inference_tensors_are_refused():
    params, anchors, weights, grads = small_set()
    with torch.inference_mode():
        frozen = torch.zeros(4, 3)
    snapshot = [g.clone() for g in grads]
    with pytest.raises(ValueError, match=r"grads\[2\] is an inference tensor"):
        penalty(params, anchors, weights, grads=[grads[0], grads[1], frozen])
    assert_unchanged(grads, snapshot)
    assert torch.equal(frozen, torch.zeros(4, 3))


def test_sparse_gradients_are_refused_before_any_write():
    """Embedding(sparse=True): refused by the op itself, so every caller is atomic."""
    emb = torch.nn.Embedding(10, 3, sparse=True)
    lin = torch.nn.Linear(3, 2)
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    params = [lin.weight, lin.bias, emb.weight]
    anchors = [torch.zeros_like(p) for p in params]
    grads = [p.grad for p in params]
    snapshot = [g.clone() for g in grads[:2]]
    with pytest.raises(TypeError, match=r"grads\[2\] is a torch.sparse_coo tensor.*Embedding\(sparse=True\)"):
        penalty(params, anchors, grads=grads)
    assert_unchanged(grads[:2], snapshot)
    with pytest.raises(TypeError, match=r"params\[0\] is a torch.sparse_coo"):
        penalty([torch.zeros(3).to_sparse()], [torch.zeros(3)])


def test_validation_cache_never_accepts_a_changed_list():
    """Same addresses, changed metadata: each change is seen (re-validated), never trusted."""
    params, anchors, weights, grads = small_set(seed=3)
    penalty(params, anchors, weights, grads=grads)  # validated and cached
    address = grads[0].data_ptr()
    grads[0].resize_(3, 3)  # smaller: same address, other shape
    assert grads[0].data_ptr() == address
    with pytest.raises(ValueError, match=r"grads\[0\] has shape"):
        penalty(params, anchors, weights, grads=grads)
    grads[0].resize_(4, 3)
    grads[0].data = grads[0].data.view(torch.int32)  # same memory, other dtype
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype torch.int32"):
        penalty(params, anchors, weights, grads=grads)
    # same address and shape, transposed strides: correct through the strided path
    square = [torch.randn(5, 5) for _ in range(4)]
    p, a, w, g = ([t] for t in square)
    penalty(p, a, w, grads=g)
    start = g[0].clone()
    g[0].t_()
    penalty(p, a, w, scale=2.0, grads=g)
    assert_grads_close(g, penalty_oracle(p, a, w, 2.0, "quadratic", [start.t()])[1], torch.float32)


def test_cache_sees_new_values_and_new_tensors_at_old_addresses():
    params, anchors, weights, grads = small_set(seed=5)
    for _ in range(2):
        with torch.no_grad():
            params[0].add_(1.0)
        start = [g.clone() for g in grads]
        value = penalty(params, anchors, weights, grads=grads)
        assert_penalty_matches(value, grads, params, anchors, weights, 1.0, "quadratic", start)


def test_one_tensor_at_several_positions_is_cached_and_rechecked():
    """One weight tensor for every position (a tensor object listed twice) is fine and cached;
    gradients that are new tensors after zero_grad(set_to_none=True) are checked again."""
    params, anchors, _, start = small_set(seed=6)
    weights = [torch.rand(4, 3, generator=torch.Generator().manual_seed(7))] * 3
    for _ in range(2):
        grads = [s.clone() for s in start]
        value = penalty(params, anchors, weights, scale=0.5, grads=grads)
        assert_penalty_matches(value, grads, params, anchors, weights, 0.5, "quadratic", start)
    with pytest.raises(ValueError, match="shares memory"):
        penalty(params, anchors, weights, grads=[grads[0], grads[1], grads[1]])
    weights[0].resize_(2, 6)
    with pytest.raises(ValueError, match=r"weights\[0\] has shape"):
        penalty(params, anchors, weights, grads=grads)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(form="l3"), ValueError),
        (dict(scale=float("nan")), ValueError),
        (dict(scale=1e39), ValueError),
        (dict(scale=True), TypeError),
        (dict(scale=-1.0), ValueError),
        (dict(scale=-1e-30), ValueError),
        (dict(scale="1"), TypeError),
        (dict(anchors=[torch.zeros(3)]), ValueError),
        (dict(anchors=[torch.zeros(2, 2)]), ValueError),
        (dict(anchors=[torch.zeros(4), torch.zeros(4)]), ValueError),
        (dict(anchors=[torch.zeros(4, dtype=torch.float16)]), TypeError),
        (dict(anchors=[[0.0] * 4]), TypeError),
        (dict(params=[torch.zeros(4, dtype=torch.int64)]), TypeError),
        (dict(grads=[torch.zeros(4, dtype=torch.float64)]), TypeError),
        (dict(grads=[torch.zeros(4), torch.zeros(4)]), ValueError),
        (dict(weights=[torch.zeros(4), torch.zeros(4)]), ValueError),
        (dict(store=True), ValueError),
        (dict(store=1, grads=[torch.zeros(4)]), TypeError),
    ],
)
def test_bad_input(kwargs, error):
    args = dict(params=[torch.zeros(4)], anchors=[torch.zeros(4)], weights=None, scale=1.0, form="quadratic", grads=None)
    args.update(kwargs)
    with pytest.raises(error):
        penalty(args.pop("params"), args.pop("anchors"), args.pop("weights"), **args)


def test_scale_accepts_numpy_and_0dim_tensors():
    np = pytest.importorskip("numpy")
    params, anchors, weights, _ = small_set()
    want = penalty_oracle(params, anchors, weights, 0.5, "quadratic", None)[0]
    for scale in (np.float32(0.5), torch.tensor(0.5), 0.5):
        assert penalty(params, anchors, weights, scale=scale).item() == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- autograd

def leaf_set(dtype=torch.float64, storage=torch.float64, seed=5):
    params, anchors, weights, _ = penalty_inputs(SIZES, dtype, storage, True, seed)
    return [p.requires_grad_() for p in params], anchors, weights


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("dtype,storage", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("form", ["quadratic", "l1"])
def test_anchored_penalty_gradient_every_backend(backend, dtype, storage, form):
    params, anchors, weights = leaf_set(dtype, storage, seed=seed_of(backend, dtype, form))
    with use_backend(backend):
        value = anchored_penalty(params, anchors, weights, scale=1.5, form=form)
        value.backward()
    assert_penalty_matches(value, [p.grad for p in params], params, anchors, weights, 1.5, form, [torch.zeros_like(p) for p in params])


def test_buffers_become_grad_and_accumulate():
    """With .grad None autograd adopts the forward-pass buffer (no copy); with .grad present it adds."""
    params, anchors, weights = leaf_set(torch.float32, torch.float32)
    value = anchored_penalty(params, anchors, weights, scale=1.5)
    buffers = [b.data_ptr() for b in value.grad_fn.buffers]
    value.backward()
    assert [p.grad.data_ptr() for p in params] == buffers
    assert value.grad_fn.buffers is None  # released: held no longer than the graph needed it
    anchored_penalty(params, anchors, weights, scale=1.5).backward()
    want = penalty_oracle(params, anchors, weights, 1.5, "quadratic", [torch.zeros_like(p) for p in params])[1]
    assert_grads_close([p.grad for p in params], [2 * w for w in want], torch.float32)


def test_grad_output_scales_the_gradient():
    params, anchors, weights = leaf_set()
    value = anchored_penalty(params, anchors, weights, scale=1.5)
    (3.0 * value).backward()
    exp_value, exp_grads = penalty_oracle(params, anchors, weights, 1.5, "quadratic", [torch.zeros_like(p) for p in params])
    assert value.item() == pytest.approx(exp_value, rel=1e-12)
    for p, e in zip(params, exp_grads):
        torch.testing.assert_close(p.grad, 3.0 * e)


def test_partial_requires_grad_and_no_grad():
    params, anchors, weights = leaf_set()
    params[1].requires_grad_(False)
    value = anchored_penalty(params, anchors, weights, scale=0.5)
    value.backward()
    assert params[1].grad is None
    want_value, want_grads = penalty_oracle(params, anchors, weights, 0.5, "quadratic", [torch.zeros_like(p) for p in params])
    assert value.item() == pytest.approx(want_value, rel=1e-12)
    for i in (0, 2, 3, 4):
        torch.testing.assert_close(params[i].grad, want_grads[i])
    with torch.no_grad():
        quiet = anchored_penalty(params, anchors, weights, scale=0.5)
    assert quiet.grad_fn is None and quiet.item() == pytest.approx(want_value, rel=1e-12)


def test_retain_graph_second_backward():
    params, anchors, weights = leaf_set()
    value = anchored_penalty(params, anchors, weights, scale=0.5, form="l1")
    value.backward(retain_graph=True)
    value.backward()
    want = penalty_oracle(params, anchors, weights, 0.5, "l1", [torch.zeros_like(p) for p in params])[1]
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, 2 * w)


def test_second_backward_after_in_place_change_raises():
    params, anchors, weights = leaf_set()
    value = anchored_penalty(params, anchors, weights)
    value.backward(retain_graph=True)
    with torch.no_grad():
        params[0].add_(1.0)
    with pytest.raises(RuntimeError, match="inplace"):
        value.backward()


def test_create_graph_gives_exact_second_order_terms():
    """∂/∂θ ⟨∇penalty, v⟩ = s·w·v (quadratic); the L1 term has zero curvature."""
    params, anchors, weights = leaf_set()
    v = [torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) for p in params]
    for form in ("quadratic", "l1"):
        value = anchored_penalty(params, anchors, weights, scale=0.7, form=form)
        grads = torch.autograd.grad(2.0 * value, params, create_graph=True)
        want = penalty_oracle(params, anchors, weights, 0.7, form, [torch.zeros_like(p) for p in params])[1]
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, 2.0 * w)
        hvp = torch.autograd.grad(sum((g * vi).sum() for g, vi in zip(grads, v)), params, allow_unused=True)
        for h, vi, w in zip(hvp, v, weights):
            expect = 2.0 * 0.7 * w * vi if form == "quadratic" else torch.zeros_like(vi)
            torch.testing.assert_close(torch.zeros_like(vi) if h is None else h, expect)


def test_gradcheck_and_gradgradcheck():
    params, anchors, weights = leaf_set(seed=6)
    params = [p[:4].detach().clone().requires_grad_() for p in params[1:3]]
    anchors = [a[:4].clone() for a in anchors[1:3]]
    weights = [w[:4].clone() for w in weights[1:3]]
    f = lambda *ps: anchored_penalty(list(ps), anchors, weights, scale=0.7)  # noqa: E731
    assert torch.autograd.gradcheck(f, params)
    assert torch.autograd.gradgradcheck(f, params)


# ----------------------------------------------------------------------------- property tests

LAYOUTS = ("contiguous", "transposed", "sliced", "channels_last")


def shaped(base: torch.Tensor, layout: str, shape) -> torch.Tensor:
    """``base`` (contiguous, ``shape``) re-laid out in memory without changing its values."""
    if layout == "transposed" and base.dim() >= 2:
        return base.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "sliced":
        wide = torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=base.dtype)
        wide[..., ::2] = base
        return wide[..., ::2]
    if layout == "channels_last" and base.dim() == 4:
        return base.to(memory_format=torch.channels_last)
    return base


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple), min_size=1, max_size=4),
    layouts=st.lists(st.sampled_from(LAYOUTS), min_size=4, max_size=4),
    case=st.sampled_from(CASES),
    form=st.sampled_from(("quadratic", "l1")),
    weighted=st.booleans(),
    store=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_any_shapes_strides_dtypes(shapes, layouts, case, form, weighted, store, seed):
    """Whatever the shapes, memory layouts (shared or not) and dtypes, the op equals the float64 formula."""
    dtype, storage = case
    params, anchors, weights, start = penalty_inputs(shapes, dtype, storage, weighted, seed)
    params = [shaped(p, layouts[0], s) for p, s in zip(params, shapes)]
    anchors = [shaped(a, layouts[1], s) for a, s in zip(anchors, shapes)]
    weights = None if weights is None else [shaped(w, layouts[2], s) for w, s in zip(weights, shapes)]
    grads = [shaped(g.clone(), layouts[3], s) for g, s in zip(start, shapes)]
    value = penalty(params, anchors, weights, scale=0.9, form=form, grads=grads, store=store)
    assert_penalty_matches(value, grads, params, anchors, weights, 0.9, form, start, store=store)


@pytest.mark.parametrize("fn", [penalty, anchored_penalty])
def test_negative_scale_is_refused_naming_scale(fn):
    params = [torch.randn(4, requires_grad=True)]
    with pytest.raises(ValueError, match="scale must be >= 0"):
        fn(params, [torch.zeros(4)], [torch.ones(4)], scale=-1.0)
    assert fn(params, [params[0].detach().clone()], [torch.ones(4)], scale=0.0).item() == 0.0
