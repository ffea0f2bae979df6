"""The cpp distill kernel (fastcl._C) against the float64 oracle, directly and through fastcl.distillation_loss.

Per row: loss = T²·KL(softmax(t/T) ‖ softmax(s/T)), grad = grad_scale·T·(softmax(s/T) − softmax(t/T)).
Every ISA variant this CPU can run (baseline, AVX2, AVX-512) is called explicitly.
Skipped when fastcl._C is not built, except ``test_extension_is_built`` under
FASTCL_REQUIRE_CPP=1 (CI).
"""
import os
import zlib

import pytest
import torch

from fastcl import testing as ref
from fastcl.kernels import cpp
from fastcl.ops import distillation_loss, use_backend
from fastcl.testing import KERNEL_TOLERANCES, param_id

needs_ext = pytest.mark.skipif(cpp._C is None, reason=f"fastcl._C not built: {cpp.BUILD_ERROR}")

ISA_NAMES = ("baseline", "avx2", "avx512")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def test_extension_is_built():
    if cpp.BUILD_ERROR is not None:
        if os.environ.get("FASTCL_REQUIRE_CPP") == "1":
            pytest.fail(f"FASTCL_REQUIRE_CPP=1 but the C++ extension is missing: {cpp.BUILD_ERROR}")
        pytest.skip(cpp.BUILD_ERROR)
    assert "distill" in cpp.OPS
    assert cpp.unsupported_reason("distill", torch.bfloat16) is None


def run_isa(isa, student, teacher, temperature, mask=None, grad_scale=1.0, threads=2):
    """Call one ISA variant of the raw kernel (skips when this CPU cannot run it)."""
    if isa > ISA_NAMES.index(cpp._C.distill_isa()):
        pytest.skip(f"this CPU cannot run the {ISA_NAMES[isa]} variant")
    R, V = student.shape
    row_loss = torch.empty(R, dtype=torch.float32)
    grad = torch.empty(R, V, dtype=student.dtype)
    mask_u8 = None if mask is None else mask.to(torch.uint8)
    cpp._C.distill(student.data_ptr(), teacher.data_ptr(), 0 if mask_u8 is None else mask_u8.data_ptr(),
                   row_loss.data_ptr(), grad.data_ptr(), R, V, DTYPE_CODES[student.dtype], temperature,
                   grad_scale, threads, isa)
    return row_loss, grad


@needs_ext
@pytest.mark.parametrize("dtype, tol", KERNEL_TOLERANCES, ids=param_id)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 1000), (2, 50257)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_matches_float64(dtype, tol, shape, temperature, masked):
    seed = zlib.crc32(repr((dtype, shape, temperature, masked)).encode())
    student, teacher = ref.logits(*shape, dtype, seed=seed)
    mask = (torch.rand(shape[0], generator=torch.Generator().manual_seed(seed)) > 0.4) if masked else None
    grad_scale = 1.0 / shape[0]
    row_loss, grad = cpp.distill(student, teacher, temperature, mask, grad_scale)
    ref.assert_distill_matches(row_loss, grad, student, teacher, temperature, tol, mask, grad_scale)


@needs_ext
@pytest.mark.parametrize("isa", range(len(ISA_NAMES)), ids=ISA_NAMES)
@pytest.mark.parametrize("dtype, tol", KERNEL_TOLERANCES, ids=param_id)
def test_every_isa_variant_matches_float64(isa, dtype, tol):
    """The run-time dispatch picks the widest variant; each one this CPU can run is checked here."""
    student, teacher = ref.logits(5, 1037, dtype, seed=100 + isa, spread=4.0)  # V not a multiple of any vector width
    teacher[1, 3] = float("-inf")
    mask = torch.tensor([True, True, False, True, True])
    row_loss, grad = run_isa(isa, student, teacher, 1.7, mask, grad_scale=0.25)
    ref.assert_distill_matches(row_loss, grad, student, teacher, 1.7, tol, mask, grad_scale=0.25)


@needs_ext
@pytest.mark.parametrize("isa", range(len(ISA_NAMES)), ids=ISA_NAMES)
@pytest.mark.parametrize("dtype, tol", KERNEL_TOLERANCES, ids=param_id)
def test_every_isa_variant_nonfinite(isa, dtype, tol):
    """NaN, ±inf in teacher and student: the contract's outcome per row, and the oracle's values."""
    student, teacher, mask, expect = ref.nonfinite_case(dtype)
    row_loss, grad = run_isa(isa, student, teacher, 2.0, mask, grad_scale=0.5)
    ref.assert_nonfinite_contract(row_loss, grad, expect)
    ref.assert_distill_matches(row_loss, grad, student, teacher, 2.0, tol, mask, grad_scale=0.5)


@needs_ext
@pytest.mark.parametrize("isa", range(len(ISA_NAMES)), ids=ISA_NAMES)
def test_every_isa_variant_long_rows_and_extreme_spread(isa):
    """Rows longer than the kernel's reduction blocks, logits far apart (exp underflow)."""
    student, teacher = ref.logits(3, 70001, torch.float32, seed=7, spread=60.0)
    row_loss, grad = run_isa(isa, student, teacher, 0.5)
    want_loss, want_grad = ref.distill_oracle(student, teacher, 0.5)
    torch.testing.assert_close(row_loss.double(), want_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


@needs_ext
def test_thread_count_does_not_change_results():
    student, teacher = ref.logits(7, 333, torch.bfloat16, seed=8)
    one = run_isa(-1, student, teacher, 2.0, threads=1)
    two = run_isa(-1, student, teacher, 2.0, threads=2)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@needs_ext
def test_identical_logits_give_zero():
    student, _ = ref.logits(3, 129, torch.float32, seed=23)
    row_loss, grad = cpp.distill(student, student.clone(), 1.7, None)
    assert row_loss.abs().max().item() < 1e-5
    assert grad.abs().max().item() < 1e-6


@needs_ext
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_public_loss_and_backward(reduction):
    student, teacher = ref.logits(2 * 3, 301, torch.float32, seed=24)
    student = student.reshape(2, 3, 301).requires_grad_()
    teacher = teacher.reshape(2, 3, 301)
    mask = torch.rand(2, 3, generator=torch.Generator().manual_seed(24)) > 0.3
    with use_backend("cpp"):
        loss = distillation_loss(student, teacher, temperature=2.0, reduction=reduction, mask=mask)
    want_rows, want_grad = ref.distill_oracle(student.detach().reshape(6, 301), teacher.reshape(6, 301), 2.0, mask.reshape(6))
    upstream = torch.linspace(0.5, 2.0, 6).reshape(2, 3) if reduction == "none" else torch.tensor(1.0)
    loss.backward(upstream)
    if reduction == "none":
        want, scale = want_rows.reshape(2, 3), upstream.reshape(6, 1).double()
    else:
        count = max(int(mask.sum()), 1) if reduction == "batchmean" else 1
        want, scale = want_rows.sum() / count, 1.0 / count
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), (want_grad * scale).reshape(2, 3, 301), rtol=1e-4, atol=1e-6)


@needs_ext
def test_rejects_bad_arguments():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match="contiguous"):
        cpp.distill(torch.randn(5, 3).t(), t, 1.0, None)
    with pytest.raises(TypeError, match="dtype"):
        cpp.distill(s, t.double(), 1.0, None)
    with pytest.raises(ValueError, match="shape"):
        cpp.distill(s, torch.randn(3, 6), 1.0, None)
    with pytest.raises(ValueError, match="mask"):
        cpp.distill(s, t, 1.0, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        cpp.distill(s, t, 0.0, None)
    with pytest.raises(ValueError, match="grad_scale"):
        cpp.distill(s, t, 1.0, None, float("nan"))


@needs_ext
def test_unsupported_isa_variant_is_refused():
    best = ISA_NAMES.index(cpp._C.distill_isa())
    if best == len(ISA_NAMES) - 1:
        pytest.skip("this CPU supports every variant")
    z = torch.zeros(1, 4)
    with pytest.raises(ValueError):
        cpp._C.distill(z.data_ptr(), z.data_ptr(), 0, torch.zeros(1).data_ptr(), torch.zeros(1, 4).data_ptr(), 1, 4, 0,
                       1.0, 1.0, 1, best + 1)
