"""The cpp distill kernel (fastcl._C) against float64 formulas, directly and through fastcl.distillation_loss.

Per row: loss = T²·KL(softmax(t/T) ‖ softmax(s/T)), ∂loss/∂s = T·(softmax(s/T) − softmax(t/T)).
Skipped when fastcl._C is not built, except ``test_extension_is_built`` under
FASTCL_REQUIRE_CPP=1 (CI).
"""
import os
import zlib

import pytest
import torch

from fastcl.kernels import cpp
from fastcl.ops import distillation_loss, use_backend

needs_ext = pytest.mark.skipif(cpp._C is None, reason=f"fastcl._C not built: {cpp.BUILD_ERROR}")

GRAD_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2**-8, 1e-6), torch.float16: (2**-10, 1e-6)}  # (rtol, atol)


def test_extension_is_built():
    if cpp.BUILD_ERROR is not None:
        if os.environ.get("FASTCL_REQUIRE_CPP") == "1":
            pytest.fail(f"FASTCL_REQUIRE_CPP=1 but the C++ extension is missing: {cpp.BUILD_ERROR}")
        pytest.skip(cpp.BUILD_ERROR)
    assert "distill" in cpp.OPS
    assert cpp.unsupported_reason("distill", torch.bfloat16) is None


def expected(student, teacher, T, mask):
    """float64 (row_loss, grad) with 0·log 0 = 0."""
    s, t = student.double() / T, teacher.double() / T
    log_ps, log_pt = s.log_softmax(-1), t.log_softmax(-1)
    pt = log_pt.exp()
    terms = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt))
    row_loss = T * T * terms.sum(-1)
    grad = T * (log_ps.exp() - pt)
    if mask is not None:
        row_loss = row_loss * mask
        grad = grad * mask[:, None]
    return row_loss, grad


def logits(rows, vocab, dtype, seed, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, vocab, generator=g) * spread).to(dtype)
    teacher = (torch.randn(rows, vocab, generator=g) * spread).to(dtype)
    return student, teacher, g


def check(row_loss, grad, student, teacher, T, mask):
    want_loss, want_grad = expected(student, teacher, T, mask)
    assert row_loss.dtype == torch.float32 and row_loss.shape == (student.shape[0],)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    torch.testing.assert_close(row_loss.double(), want_loss, rtol=1e-4, atol=1e-5)
    rtol, atol = GRAD_TOL[student.dtype]
    torch.testing.assert_close(grad.double(), want_grad, rtol=rtol, atol=atol * T)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 1000), (2, 50257)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_matches_float64(dtype, shape, temperature, masked):
    student, teacher, g = logits(*shape, dtype, seed=zlib.crc32(repr((dtype, shape, temperature, masked)).encode()))
    mask = (torch.rand(shape[0], generator=g) > 0.4) if masked else None
    row_loss, grad = cpp.distill(student, teacher, temperature, mask)
    check(row_loss, grad, student, teacher, temperature, mask)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minus_inf_teacher_logits_contribute_zero(dtype):
    student, teacher, g = logits(4, 37, dtype, seed=21)
    teacher[:, ::3] = float("-inf")
    teacher[2, 2:] = float("-inf")  # one-hot teacher (column 0 is -inf already)
    row_loss, grad = cpp.distill(student, teacher, 2.0, None)
    assert torch.isfinite(row_loss).all() and torch.isfinite(grad.float()).all()
    check(row_loss, grad, student, teacher, 2.0, None)


@needs_ext
def test_large_logit_spread():
    student, teacher, _ = logits(6, 513, torch.float32, seed=22, spread=60.0)
    row_loss, grad = cpp.distill(student, teacher, 0.5, None)
    check(row_loss, grad, student, teacher, 0.5, None)


@needs_ext
def test_identical_logits_give_zero():
    student, _, _ = logits(3, 129, torch.float32, seed=23)
    row_loss, grad = cpp.distill(student, student.clone(), 1.7, None)
    assert row_loss.abs().max().item() < 1e-5
    assert grad.abs().max().item() < 1e-6


@needs_ext
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_public_loss_and_backward(reduction):
    student, teacher, g = logits(2 * 3, 301, torch.float32, seed=24)
    student = student.reshape(2, 3, 301).requires_grad_()
    teacher = teacher.reshape(2, 3, 301)
    mask = torch.rand(2, 3, generator=g) > 0.3
    with use_backend("cpp"):
        loss = distillation_loss(student, teacher, temperature=2.0, reduction=reduction, mask=mask)
    want_rows, want_grad = expected(student.detach().reshape(6, 301), teacher.reshape(6, 301), 2.0, mask.reshape(6))
    if reduction == "none":
        want, upstream = want_rows.reshape(2, 3), torch.ones(2, 3)
        loss.backward(upstream)
        scale = 1.0
    else:
        count = max(int(mask.sum()), 1) if reduction == "batchmean" else 1
        want = want_rows.sum() / count
        loss.backward()
        scale = 1.0 / count
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


ISA_NAMES = ("baseline", "avx2", "avx512")


@needs_ext
@pytest.mark.parametrize("isa", range(len(ISA_NAMES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_isa_variant_matches_float64(isa, dtype):
    """The run-time dispatch picks the widest variant; each one this CPU can run is checked here."""
    if isa > ISA_NAMES.index(cpp._C.distill_isa()):
        pytest.skip(f"this CPU cannot run the {ISA_NAMES[isa]} variant")
    gen = torch.Generator().manual_seed(100 + isa)
    R, V, T = 5, 1037, 1.7  # V not a multiple of any vector width
    student = (4 * torch.randn(R, V, generator=gen)).to(dtype)
    teacher = (4 * torch.randn(R, V, generator=gen)).to(dtype)
    teacher[1, 3] = float("-inf")
    mask = torch.tensor([1, 1, 0, 1, 1], dtype=torch.uint8)
    row_loss = torch.empty(R, dtype=torch.float32)
    grad = torch.empty(R, V, dtype=dtype)
    code = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]
    cpp._C.distill(student.data_ptr(), teacher.data_ptr(), mask.data_ptr(), row_loss.data_ptr(), grad.data_ptr(),
                   R, V, code, T, 2, isa)
    want_loss, want_grad = expected(student, teacher, T, mask.double())
    torch.testing.assert_close(row_loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.double(), want_grad, rtol=rtol, atol=atol)


@needs_ext
def test_unsupported_isa_variant_is_refused():
    best = ISA_NAMES.index(cpp._C.distill_isa())
    if best == len(ISA_NAMES) - 1:
        pytest.skip("this CPU supports every variant")
    z = torch.zeros(1, 4)
    with pytest.raises(ValueError):
        cpp._C.distill(z.data_ptr(), z.data_ptr(), 0, torch.zeros(1).data_ptr(), torch.zeros(1, 4).data_ptr(), 1, 4, 0, 1.0, 1, best + 1)
