"""Triton penalty kernel against the float64 formula: s·Σ w·φ(θ−a) and grad += s·w·φ'(θ−a)."""
import os

import pytest
import torch

pytestmark = pytest.mark.triton

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

import fastcl  # noqa: E402
import fastcl.ops as ops  # noqa: E402
from fastcl.kernels import triton as kt  # noqa: E402
from fastcl.kernels.triton import penalty as kpen  # noqa: E402
from fastcl.testing import TOL, assert_grads_close, assert_penalty_matches, penalty_inputs, penalty_oracle  # noqa: E402

DEVICE = torch.device("cpu" if kt.INTERPRETED else "cuda")
SIZES = (1, 7, 33, 1, 1029, 2500)


def make_inputs(sizes, p_dtype, s_dtype, with_weights, with_grads, seed=0):
    """θ, a, w (or None), grads (or None): 1-D tensors of ``sizes`` on the test device."""
    params, anchors, weights, grads = penalty_inputs([(n,) for n in sizes], p_dtype, s_dtype, with_weights, seed, device=DEVICE)
    return params, anchors, weights, grads if with_grads else None


def check(value, grads_before, grads_after, params, anchors, weights, scale, form):
    """Against the float64 formula; the interpreter truncates its conversions (compiled Triton rounds)."""
    tol = TOL[params[0].dtype]
    assert_penalty_matches(value, grads_after, params, anchors, weights, scale, form, grads_before,
                           tol=tol.truncating() if kt.INTERPRETED else tol)


@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_weights, form, grads", [
    (True, "quadratic", "accumulate"),
    (True, "l1", "store"),
    (False, "quadratic", "store"),
    (False, "l1", None),
])
def test_kernel_matches_formula(p_dtype, s_dtype, with_weights, form, grads):
    """Every dtype pair in every gradient mode; store=True gets NaN-filled grads (never read)."""
    params, anchors, weights, grad_list = make_inputs(SIZES, p_dtype, s_dtype, with_weights, grads is not None)
    store = grads == "store"
    if store:
        grad_list = [torch.full_like(g, float("nan")) for g in grad_list]
    before = None if grad_list is None else [torch.zeros_like(g) if store else g.clone() for g in grad_list]
    value = kt.OPS["penalty"](params, anchors, weights, 0.75, form, grad_list, store=store)
    check(value, before, grad_list, params, anchors, weights, 0.75, form)


@pytest.mark.parametrize("form", ["quadratic", "l1"])
def test_many_chunks_per_tensor_and_program(monkeypatch, form):
    """Small BLOCK/CHUNK: tensors span several chunks, programs walk several chunks, tails are partial."""
    monkeypatch.setattr(kpen, "BLOCK", 16)
    monkeypatch.setattr(kpen, "CHUNK", 64)
    params, anchors, weights, grads = make_inputs((1, 7, 64, 65, 1000, 3), torch.float32, torch.float32, True, True, seed=1)
    before = [g.clone() for g in grads]
    value = kt.OPS["penalty"](params, anchors, weights, 1.5, form, grads)
    check(value, before, grads, params, anchors, weights, 1.5, form)


@pytest.mark.parametrize("form", ["quadratic", "l1"])
def test_float64_anchors_and_weights_with_float32_params(form):
    """The op contract allows float64 a and w next to float32 θ; they are read and rounded to float32."""
    params, anchors, weights, grads = make_inputs((7, 1, 300), torch.float32, torch.float32, True, True, seed=8)
    anchors = [a.double() for a in anchors]
    weights = [w.double() for w in weights]
    before = [g.clone() for g in grads]
    value = kt.OPS["penalty"](params, anchors, weights, 0.25, form, grads)
    check(value, before, grads, params, anchors, weights, 0.25, form)


def test_unaligned_views_into_flat_buffer():
    """Contiguous views at odd offsets of one buffer (not 16-byte aligned)."""
    gen = torch.Generator().manual_seed(2)
    flat_p, flat_a, flat_w = (torch.randn(1 + 7 + 33 + 100, generator=gen).to(DEVICE) for _ in range(3))
    bounds = [(1, 8), (8, 41), (41, 141)]
    params = [flat_p[i:j] for i, j in bounds]
    anchors = [flat_a[i:j] for i, j in bounds]
    weights = [flat_w[i:j].abs() for i, j in bounds]
    grads = [torch.randn(j - i, generator=gen).to(DEVICE) for i, j in bounds]
    before = [g.clone() for g in grads]
    value = kt.OPS["penalty"](params, anchors, weights, 2.0, "quadratic", grads)
    check(value, before, grads, params, anchors, weights, 2.0, "quadratic")


def _heads(params, anchors, weights, grads):
    """Per tensor (head of all four, head of θ and grad) from the kernel's table."""
    table, _ = kpen._chunk_table((params, anchors, weights, grads), [p.numel() for p in params], DEVICE)
    n = len(params)
    return list(zip(table[5 * n:6 * n].tolist(), table[6 * n:7 * n].tolist()))


@pytest.mark.parametrize("store", [False, True])
def test_per_tensor_alignment_paths(monkeypatch, store):
    """One list mixing every alignment: all aligned; all at one odd phase (peeled head); θ and
    grad aligned with a, w at odd offsets; nothing common (element-wise). BLOCK=16, CHUNK=64
    so heads, whole blocks and tails recur in several chunks."""
    monkeypatch.setattr(kpen, "BLOCK", 16)
    monkeypatch.setattr(kpen, "CHUNK", 64)
    gen = torch.Generator().manual_seed(10)
    sizes = (150, 150, 150, 150)

    def buffer(name):
        data = torch.randn(200, generator=gen)
        return (data.abs() if name == "w" else data).to(torch.bfloat16 if name in "pg" else torch.float32).to(DEVICE)

    # Offsets in elements (θ and grad bf16, a and w fp32) of each tensor's four views.
    offsets = [
        {"p": 0, "g": 0, "a": 0, "w": 0},      # all aligned: head 0
        {"p": 5, "g": 5, "a": 1, "w": 1},      # element 3 aligned in all four: head 3
        {"p": 0, "g": 0, "a": 1, "w": 3},      # θ, grad aligned; a, w never with them
        {"p": 1, "g": 2, "a": 1, "w": 1},      # θ and grad never together: element-wise
    ]
    views = {name: [buffer(name)[o[name]:o[name] + n] for o, n in zip(offsets, sizes)] for name in "pgaw"}
    params, grads, anchors, weights = views["p"], views["g"], views["a"], views["w"]
    assert _heads(params, anchors, weights, grads) == [(0, 0), (3, 3), (-1, 0), (-1, -1)]
    before = [g.clone() for g in grads]
    value = kt.OPS["penalty"](params, anchors, weights, 1.25, "quadratic", grads, store=store)
    start = [torch.zeros_like(g) for g in grads] if store else before
    check(value, start, grads, params, anchors, weights, 1.25, "quadratic")


def test_value_is_bitwise_deterministic():
    params, anchors, weights, _ = make_inputs((3000, 1, 257, 4096), torch.float32, torch.float32, True, False, seed=3)
    first = kt.OPS["penalty"](params, anchors, weights, 0.3, "quadratic", None)
    kpen._tables.clear()
    second = kt.OPS["penalty"](params, anchors, weights, 0.3, "quadratic", None)
    assert torch.equal(first, second)


def test_cached_table_sees_new_values_at_same_addresses():
    params, anchors, weights, _ = make_inputs(SIZES, torch.float32, torch.float32, True, False, seed=4)
    kt.OPS["penalty"](params, anchors, weights, 1.0, "quadratic", None)
    for p in params:
        p.mul_(-2.0)
    value = kt.OPS["penalty"](params, anchors, weights, 1.0, "quadratic", None)
    check(value, None, None, params, anchors, weights, 1.0, "quadratic")


@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16])
def test_public_op_with_strided_tensor(p_dtype):
    """Through fastcl.ops.penalty: contiguous tensors go to the kernel, a transposed one to the strided path."""
    params, anchors, weights, grads = make_inputs((7, 1, 1000), p_dtype, torch.float32, True, True, seed=5)
    gen = torch.Generator().manual_seed(6)
    params.append(torch.randn(5, 9, generator=gen).to(p_dtype).to(DEVICE).t())
    anchors.append(torch.randn(9, 5, generator=gen).to(DEVICE))
    weights.append(torch.rand(9, 5, generator=gen).to(DEVICE))
    grads.append(torch.randn(9, 5, generator=gen).to(p_dtype).to(DEVICE))
    before = [g.clone() for g in grads]
    with fastcl.use_backend("triton"):
        assert ops.choose_backend("penalty", DEVICE, p_dtype)[0] == "triton"
        value = ops.penalty(params, anchors, weights, scale=0.5, form="quadratic", grads=grads)
    check(value, before, grads, params, anchors, weights, 0.5, "quadratic")


def test_anchored_penalty_autograd():
    params, anchors, weights, _ = make_inputs((7, 33), torch.float32, torch.float32, True, False, seed=7)
    leaves = [p.clone().requires_grad_(True) for p in params]
    with fastcl.use_backend("triton"):
        loss = ops.anchored_penalty(leaves, anchors, weights, scale=3.0, form="l1")
        (2 * loss).backward()
    want, steps = penalty_oracle(params, anchors, weights, 3.0, "l1", [torch.zeros_like(p) for p in params])
    assert loss.item() == pytest.approx(want, rel=TOL[torch.float32].sum.rtol)
    assert_grads_close([leaf.grad / 2 for leaf in leaves], steps, torch.float32)


def test_backend_reports_triton_and_refuses_float64():
    if kt.INTERPRETED and os.environ.get("FASTCL_BACKEND") == "triton":
        assert fastcl.backend_info("cpu") == {"penalty": "triton", "sqgrad": "triton", "distill": "triton"}
    with fastcl.use_backend("triton"):
        assert fastcl.backend_info(DEVICE) == {"penalty": "triton", "sqgrad": "triton", "distill": "triton"}
        with pytest.raises(fastcl.BackendUnavailableError, match="float64"):
            ops.penalty([torch.ones(3, dtype=torch.float64, device=DEVICE)], [torch.zeros(3, dtype=torch.float64, device=DEVICE)])
    assert kt.unavailable_reason(DEVICE) is None
    assert "float64" in kt.unsupported_reason("penalty", torch.float64)
    assert kt.unsupported_reason("penalty", torch.bfloat16) is None
    assert isinstance(kt.unavailable_reason(torch.device("meta")), str)
    other = torch.device("cuda" if DEVICE.type == "cpu" else "cpu")
    assert isinstance(kt.unavailable_reason(other), str)
