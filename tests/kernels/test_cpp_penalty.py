"""The cpp penalty kernel (fastcl._C) against float64 formulas, directly and through fastcl.ops.penalty.

value = s·Σ w·φ(θ−a), grads += s·w·φ'(θ−a) (store mode: grads = s·w·φ'(θ−a)),
φ = d²/2 (quadratic) or |d| (l1). Skipped when fastcl._C is not built, except
``test_extension_is_built`` under FASTCL_REQUIRE_CPP=1 (CI), so a broken build cannot
hide behind the skips.
"""
import os
import re
from pathlib import Path

import pytest
import torch

from fastcl.kernels import _checks, cpp
from fastcl.ops import BackendUnavailableError, penalty, use_backend
from fastcl.testing import (
    KERNEL_TOLERANCES,
    PENALTY_GRID,
    assert_penalty_matches,
    at_thread_counts,
    check_penalty_kernel,
    param_id,
    penalty_inputs,
)

needs_ext = pytest.mark.skipif(cpp._C is None, reason=f"fastcl._C not built: {cpp.BUILD_ERROR}")

ODD_SIZES = [(1,), (7,), (65537,), (200003,)]
ROOT = Path(__file__).resolve().parents[2]


def test_python_codes_match_csrc_common():
    """fastcl/kernels/_checks.py and csrc/common/codes.h agree on every integer code."""
    text = (ROOT / "csrc/common/codes.h").read_text()
    code = {name: int(value) for name, value in re.findall(r"\b(k\w+) = (-?\d+)", text)}
    assert {dtype: code[name] for dtype, name in ((torch.float32, "kFloat32"), (torch.bfloat16, "kBFloat16"),
                                                 (torch.float16, "kFloat16"))} == _checks.DTYPE_CODES
    assert _checks.NO_WEIGHTS == code["kNone"]
    assert _checks.FORM_CODES == {"quadratic": code["kQuadratic"], "l1": code["kL1"]}
    assert _checks.GRAD_MODES == {"value": code["kValueOnly"], "accumulate": code["kAccumulate"], "store": code["kStore"]}


def test_extension_is_built():
    if cpp.BUILD_ERROR is not None:
        if os.environ.get("FASTCL_REQUIRE_CPP") == "1":
            pytest.fail(f"FASTCL_REQUIRE_CPP=1 but the C++ extension is missing: {cpp.BUILD_ERROR}")
        pytest.skip(cpp.BUILD_ERROR)
    assert cpp.unavailable_reason("cpu") is None
    assert cpp.unsupported_reason("penalty", torch.float64) is not None
    assert cpp.unavailable_reason("meta") is not None


@needs_ext
@pytest.mark.parametrize("dtype, tol", KERNEL_TOLERANCES, ids=param_id)
@pytest.mark.parametrize("storage, weighted, form, store", PENALTY_GRID)
def test_kernel_matches_float64(dtype, tol, storage, weighted, form, store):
    check_penalty_kernel(cpp.penalty, ODD_SIZES, dtype, tol, storage, weighted, form, store)


@needs_ext
@pytest.mark.parametrize("form", ["quadratic", "l1"])
def test_value_only_leaves_inputs_alone(form):
    params, anchors, weights, _ = penalty_inputs(ODD_SIZES[:3], torch.float32, torch.float32, True, seed=3)
    before = [p.clone() for p in params]
    value = cpp.penalty(params, anchors, weights, 2.0, form, None)
    assert_penalty_matches(value, None, params, anchors, weights, 2.0, form, None)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_rounding_matches_torch(dtype):
    """Grads are rounded like torch's float32 -> dtype conversion: overflow, subnormals, ties."""
    g = torch.Generator().manual_seed(11)
    n = 4099
    magnitude = 10.0 ** (torch.rand(n, generator=g) * 14 - 9)  # 1e-9 .. 1e5: fp16 subnormals; sums overflow fp16
    theta = (torch.randn(n, generator=g) * magnitude).clamp(-6e4, 6e4).to(dtype)
    anchors = torch.randn(n, generator=g) * magnitude * 0.1
    start = (torch.randn(n, generator=g) * magnitude).clamp(-6e4, 6e4).to(dtype)
    grad = start.clone()
    cpp.penalty([theta], [anchors], None, 3.0, "quadratic", [grad])
    d = theta.float() - anchors
    want = (start.float() + 3.0 * d).to(dtype)
    assert torch.equal(grad.view(torch.int16), want.view(torch.int16))


@needs_ext
def test_many_tensors_one_call():
    g = torch.Generator().manual_seed(5)
    shapes = [(int(n),) for n in torch.randint(1, 3000, (300,), generator=g)] + [(70000,), (3, 5, 7)]
    params, anchors, weights, start = penalty_inputs(shapes, torch.float32, torch.bfloat16, True, seed=6)
    grads = [s.clone() for s in start]
    value = cpp.penalty(params, anchors, weights, 0.5, "quadratic", grads)
    assert_penalty_matches(value, grads, params, anchors, weights, 0.5, "quadratic", start)


@needs_ext
@pytest.mark.parametrize("form", ["quadratic", "l1"])
@pytest.mark.parametrize("store", [False, True])
def test_value_is_bitwise_independent_of_thread_count(form, store):
    params, anchors, weights, start = penalty_inputs([(150001,), (3,), (65536,), (131073,)], torch.float32, torch.float32, True, seed=8)

    def run():
        grads = [s.clone() for s in start]
        return cpp.penalty(params, anchors, weights, 0.9, form, grads, store=store), grads

    (v1, g1), (v2, g2) = at_thread_counts(run)
    assert torch.equal(v1, v2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@needs_ext
@pytest.mark.parametrize("form", ["quadratic", "l1"])
def test_public_op_with_strided_params(form):
    """Contiguous tensors go to the kernel, strided ones to the reference path; the sum is checked."""
    g = torch.Generator().manual_seed(9)
    params = [torch.randn(33, 17, generator=g).t(), torch.randn(1001, generator=g), torch.randn(64, 64, generator=g)[:, ::2], torch.randn(5, generator=g)]
    anchors = [torch.randn(p.shape, generator=g) for p in params]
    weights = [torch.rand(p.shape, generator=g) for p in params]
    start = [torch.randn(p.shape, generator=g) for p in params]
    grads = [s.clone() for s in start]
    with use_backend("cpp"):
        value = penalty(params, anchors, weights, scale=1.3, form=form, grads=grads)
    assert_penalty_matches(value, grads, params, anchors, weights, 1.3, form, start)


@needs_ext
def test_public_op_mixed_storage_dtypes_and_unweighted():
    params, anchors, _, start = penalty_inputs([(7,), (65537,), (12, 11)], torch.bfloat16, torch.float32, False, seed=10)
    anchors[1] = anchors[1].to(torch.bfloat16)  # its own kernel call
    grads = [s.clone() for s in start]
    with use_backend("cpp"):
        value = penalty(params, anchors, None, scale=0.25, form="quadratic", grads=grads)
    assert_penalty_matches(value, grads, params, anchors, None, 0.25, "quadratic", start)


@needs_ext
def test_empty_lists_and_empty_tensors():
    with use_backend("cpp"):
        assert penalty([], [], None).item() == 0.0
        p, a = torch.randn(0), torch.randn(0)
        assert penalty([p, torch.ones(3)], [a, torch.zeros(3)], None, form="l1").item() == pytest.approx(3.0)
    assert cpp.penalty([], [], None, 1.0, "quadratic", None).item() == 0.0


@needs_ext
def test_float64_storage_goes_to_the_torch_backend():
    """The kernel refuses float64 anchors; the op sends them to the reference, and a forced cpp says why not."""
    params, anchors, weights, start = penalty_inputs([(9,), (70000,)], torch.float32, torch.float64, True, seed=12)
    grads = [s.clone() for s in start]
    with pytest.raises(TypeError, match="anchors"):
        cpp.penalty(params, anchors, weights, 0.8, "l1", grads)
    with use_backend("cpp"), pytest.raises(BackendUnavailableError, match="float64"):
        penalty(params, anchors, weights, scale=0.8, form="l1", grads=grads)
    assert all(torch.equal(g, s) for g, s in zip(grads, start))
    value = penalty(params, anchors, weights, scale=0.8, form="l1", grads=grads)
    assert_penalty_matches(value, grads, params, anchors, weights, 0.8, "l1", start)


@needs_ext
def test_rejects_bad_arguments():
    p, a = torch.randn(4, 4), torch.randn(4, 4)
    with pytest.raises(ValueError, match="contiguous"):
        cpp.penalty([p.t()], [a], None, 1.0, "quadratic", None)
    with pytest.raises(TypeError, match="grads"):
        cpp.penalty([p], [a], None, 1.0, "quadratic", [torch.zeros(4, 4, dtype=torch.float16)])
    with pytest.raises(ValueError, match="shape"):
        cpp.penalty([p], [torch.randn(16)], None, 1.0, "quadratic", None)
    with pytest.raises(ValueError, match="form"):
        cpp.penalty([p], [a], None, 1.0, "huber", None)
    with pytest.raises(TypeError, match="params"):
        cpp.penalty([p.double()], [a], None, 1.0, "quadratic", None)
    with pytest.raises(ValueError, match="store"):
        cpp.penalty([p], [a], None, 1.0, "quadratic", None, store=True)
    with pytest.raises(TypeError, match="sparse|strided"):
        cpp.penalty([p], [a], None, 1.0, "quadratic", [torch.zeros(4, 4).to_sparse()])
