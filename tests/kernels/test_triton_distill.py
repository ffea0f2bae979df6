"""Triton distill kernel against float64: T²·KL(softmax(t/T) ‖ softmax(s/T)) and T·(p_s − p_t)."""
import os

import pytest
import torch

# Padding lanes compute −inf − −inf and all −inf rows log2(0) (IEEE results the kernel
# relies on); the interpreter's numpy warns about them.
pytestmark = [
    pytest.mark.triton,
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

import fastcl  # noqa: E402
import fastcl.ops as ops  # noqa: E402
from fastcl.kernels import triton as kt  # noqa: E402
from fastcl.kernels.triton import distill as kdi  # noqa: E402
from fastcl.testing import TOL, assert_distill_matches, distill_oracle, logits  # noqa: E402

DEVICE = torch.device("cpu" if kt.INTERPRETED else "cuda")


def tol_of(dtype):
    """The interpreter truncates its conversions (compiled Triton rounds)."""
    return TOL[dtype].truncating() if kt.INTERPRETED else TOL[dtype]


def make(R, V, dtype, seed=0, spread=3.0):
    return logits(R, V, dtype, seed, spread, device=DEVICE)


def check(row_loss, grad, student, teacher, temperature, mask=None):
    assert torch.isfinite(row_loss).all() and torch.isfinite(grad).all()
    assert_distill_matches(row_loss, grad, student, teacher, temperature, tol_of(student.dtype), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 5, 300])
@pytest.mark.parametrize("masked, temperature", [(False, 1.0), (True, 2.5)])
def test_kernel_matches_formula(dtype, V, masked, temperature):
    student, teacher = make(5, V, dtype, seed=V)
    mask = torch.tensor([True, False, True, True, False], device=DEVICE) if masked else None
    row_loss, grad = kt.OPS["distill"](student, teacher, temperature, mask)
    check(row_loss, grad, student, teacher, temperature, mask)
    if masked:
        assert torch.all(row_loss[~mask] == 0) and torch.all(grad[~mask] == 0)


@pytest.mark.parametrize("max_block", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocabulary_walked_in_many_blocks(monkeypatch, max_block, dtype):
    """V = 300 over 16/64-wide blocks, with the row maximum late in the row (online rescaling)."""
    monkeypatch.setattr(kdi, "MAX_BLOCK_V", max_block)
    student, teacher = make(3, 300, dtype, seed=max_block)
    student[0, -3] = 40.0
    teacher[1, -1] = 40.0
    teacher[2, :250] = float("-inf")
    row_loss, grad = kdi.distill(student, teacher, 2.0, None)
    check(row_loss, grad, student, teacher, 2.0)


def test_teacher_minus_infinity_contributes_zero():
    student, teacher = make(4, 37, torch.float32, seed=3)
    teacher[0, ::2] = float("-inf")
    teacher[1, :36] = float("-inf")           # one-hot teacher
    teacher[2, 5] = float("-inf")
    student[3, :] = 0.0                        # uniform student
    row_loss, grad = kt.OPS["distill"](student, teacher, 1.5, None)
    check(row_loss, grad, student, teacher, 1.5)
    torch.testing.assert_close(grad[1, :36].double(), 1.5 * torch.softmax(student[1].double() / 1.5, -1)[:36], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scale_scales_gradient_only(dtype):
    student, teacher = make(3, 37, dtype, seed=12)
    row_loss, grad = kt.OPS["distill"](student, teacher, 2.0, None, 0.125)
    assert_distill_matches(row_loss, grad, student, teacher, 2.0, tol_of(dtype), grad_scale=0.125)


def test_non_finite_rows_follow_the_contract():
    """NaN anywhere, +inf teacher or student, all −inf teacher or student: NaN loss and NaN
    gradient on that row only; a student −inf under p_t > 0: +inf loss, finite gradient;
    p_t == 0 (teacher −inf) terms: exactly 0, even where the student is −inf too; a masked
    row: 0 whatever it holds."""
    inf, nan = float("inf"), float("nan")
    student, teacher = make(11, 21, torch.float32, seed=13)
    student[0, 4] = nan
    teacher[1, 7] = nan
    teacher[2, 3] = inf
    student[3, 9] = inf
    teacher[4, :] = -inf
    student[5, :] = -inf
    student[6, 2] = -inf                                  # p_t > 0 there
    teacher[7, ::3] = -inf
    student[7, ::3] = -inf                                # p_t == 0 wherever p_s == 0
    student[8, 5] = nan                                   # masked out below
    teacher[9, 0] = -inf                                  # one p_t == 0 term, row otherwise finite
    mask = torch.ones(11, dtype=torch.bool, device=DEVICE)
    mask[8] = False
    row_loss, grad = kt.OPS["distill"](student, teacher, 1.5, mask, 0.5)
    want_loss, want_grad = distill_oracle(student, teacher, 1.5, mask, grad_scale=0.5)
    nan_rows = [0, 1, 2, 3, 4, 5]
    assert torch.isnan(want_loss[nan_rows]).all() and torch.isnan(want_grad[nan_rows]).all()
    assert torch.isnan(row_loss[nan_rows]).all() and torch.isnan(grad[nan_rows]).all()
    assert row_loss[6].item() == inf == want_loss[6].item() and torch.isfinite(grad[6]).all()
    assert row_loss[8].item() == 0 and torch.all(grad[8] == 0)
    finite = [6, 7, 8, 9, 10]
    torch.testing.assert_close(grad[finite].double(), want_grad[finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row_loss[[7, 9, 10]].double(), want_loss[[7, 9, 10]], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype, rows", [(torch.float32, 4), (torch.bfloat16, 8)])
def test_rows_at_every_phase_of_a_16_byte_boundary(monkeypatch, dtype, rows):
    """V = 37 (odd): successive rows start at every element phase of a 16-byte boundary, so
    the aligned walk runs its masked head, unmasked 16-wide body blocks and masked tail."""
    monkeypatch.setattr(kdi, "MAX_BLOCK_V", 16)
    student, teacher = make(rows, 37, dtype, seed=14)
    assert kdi.plan(student, teacher, 2.0, None)[0].options["ALIGNED"]
    row_loss, grad = kdi.distill(student, teacher, 2.0, None)
    check(row_loss, grad, student, teacher, 2.0)


def test_student_view_at_odd_offset_walks_unaligned(monkeypatch):
    monkeypatch.setattr(kdi, "MAX_BLOCK_V", 16)
    student, teacher = make(3, 37, torch.float32, seed=15)
    shifted = torch.cat([student.new_zeros(1), student.reshape(-1)])[1:].view(3, 37)
    assert not kdi.plan(shifted, teacher, 2.0, None)[0].options["ALIGNED"]
    row_loss, grad = kdi.distill(shifted, teacher, 2.0, None)
    check(row_loss, grad, shifted, teacher, 2.0)


def test_large_vocabulary():
    student, teacher = make(2, 128256, torch.float32, seed=11)
    row_loss, grad = kt.OPS["distill"](student, teacher, 2.0, None)
    check(row_loss, grad, student, teacher, 2.0)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_distillation_loss_strided_masked(reduction, dtype):
    """distillation_loss on [2, 3, V] views with non-contiguous strides, a mask, and backward."""
    gen = torch.Generator().manual_seed(5)
    V = 33
    base = (2 * torch.randn(V, 3, 2, generator=gen)).to(dtype).to(DEVICE)
    student = base.permute(2, 1, 0).detach().requires_grad_(True)      # [2, 3, V], not contiguous
    teacher = (2 * torch.randn(2, V, 3, generator=gen)).to(dtype).to(DEVICE).transpose(1, 2)
    assert not student.is_contiguous() and not teacher.is_contiguous()
    mask = torch.tensor([[True, False, True], [True, True, False]], device=DEVICE)
    with fastcl.use_backend("triton"):
        assert ops.choose_backend("distill", DEVICE, dtype)[0] == "triton"
        loss = fastcl.distillation_loss(student, teacher, temperature=2.0, reduction=reduction, mask=mask)
        upstream = torch.rand(loss.shape, generator=gen).to(DEVICE) if reduction == "none" else torch.tensor(1.7, device=DEVICE)
        loss.backward(upstream.to(loss.dtype))
    rows, grads = distill_oracle(student.detach().reshape(-1, V), teacher.reshape(-1, V), 2.0, mask.reshape(-1))
    count = mask.sum().double()
    if reduction == "none":
        want, want_grad = rows.reshape(2, 3), grads * upstream.double().reshape(-1, 1)
    elif reduction == "sum":
        want, want_grad = rows.sum(), grads * 1.7
    else:
        want, want_grad = rows.sum() / count, grads * 1.7 / count
    tol = tol_of(dtype).truncating()  # two roundings into the dtype: the kernel's, then the upstream gradient's product
    torch.testing.assert_close(loss.double(), want, rtol=tol.loss.rtol, atol=tol.loss.atol * 2.0**2)
    torch.testing.assert_close(student.grad.double().reshape(-1, V), want_grad, rtol=tol.grad.rtol, atol=tol.grad.atol * 2.0 * 1.7)


@pytest.mark.parametrize("with_bias", [False, True])
def test_public_fused_linear_distillation(with_bias):
    """Loss and gradients of hidden, head weight and bias against float64 autograd of the formula."""
    gen = torch.Generator().manual_seed(8)
    R, H, V = 7, 5, 19
    hidden = torch.randn(R, H, generator=gen).to(DEVICE).requires_grad_(True)
    weight = torch.randn(V, H, generator=gen).to(DEVICE).requires_grad_(True)
    bias = torch.randn(V, generator=gen).to(DEVICE).requires_grad_(True) if with_bias else None
    teacher = (2 * torch.randn(R, V, generator=gen)).to(DEVICE)
    mask = torch.tensor([True, True, False, True, True, True, False], device=DEVICE)
    with fastcl.use_backend("triton"):
        loss = fastcl.fused_linear_distillation(
            hidden, weight, teacher, student_bias=bias, temperature=3.0, mask=mask, chunk_size=3
        )
        loss.backward()

    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    b64 = bias.detach().double().requires_grad_(True) if with_bias else None
    logits = h64 @ w64.t() + (b64 if with_bias else 0.0)
    s, t = logits / 3.0, teacher.double() / 3.0
    pt = torch.softmax(t, -1)
    rows = 9.0 * (pt * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1)
    want = (rows * mask).sum() / mask.sum()
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
    if with_bias:
        torch.testing.assert_close(bias.grad.double(), b64.grad, rtol=1e-4, atol=1e-5)


def test_float64_is_refused():
    assert "float64" in kt.unsupported_reason("distill", torch.float64)
    s = torch.randn(2, 3, dtype=torch.float64, device=DEVICE)
    with fastcl.use_backend("triton"), pytest.raises(fastcl.BackendUnavailableError, match="float64"):
        fastcl.distillation_loss(s, s.clone())
