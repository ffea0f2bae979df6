"""fastcl.ops.distillation_loss / fused_linear_distillation against float64 formulas."""
import pytest
import torch
import torch.nn.functional as F

from fastcl.ops import distillation_loss, fused_linear_distillation, use_backend


def oracle(s, t, T, mask=None):
    s, t = s.double() / T, t.double() / T
    pt = t.softmax(-1)
    rows = T * T * torch.where(pt > 0, pt * (t.log_softmax(-1) - s.log_softmax(-1)), torch.zeros_like(pt)).sum(-1)
    if mask is not None:
        rows = rows[mask]
    return rows.mean() if rows.numel() else rows.sum()


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 3, 17), (9, 300)])
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_value_and_grad(shape, T, dtype, tol):
    gen = torch.Generator().manual_seed(sum(shape))
    s = (3 * torch.randn(shape, generator=gen)).to(dtype).requires_grad_()
    t = (3 * torch.randn(shape, generator=gen)).to(dtype)
    with use_backend("torch"):
        loss = distillation_loss(s, t, T)
    loss.backward()
    s64 = s.detach().double().requires_grad_()
    expected = oracle(s64, t, T)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=tol, abs=tol)
    assert s.grad.dtype == dtype
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=tol, atol=tol)


def test_matches_kl_div_and_reductions():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(6, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 11, generator=gen, dtype=torch.float64)
    ref = 4.0 * F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), reduction="batchmean", log_target=True)
    torch.testing.assert_close(distillation_loss(s, t, 2.0), ref)
    torch.testing.assert_close(distillation_loss(s, t, 2.0, reduction="sum"), ref * 6)
    none = distillation_loss(s, t, 2.0, reduction="none")
    assert none.shape == (6,)
    w = torch.arange(6, dtype=torch.float64)
    (none * w).sum().backward()
    s2 = s.detach().clone().requires_grad_()
    rows = 4.0 * F.kl_div(F.log_softmax(s2 / 2, -1), F.log_softmax(t / 2, -1), reduction="none", log_target=True).sum(-1)
    (rows * w).sum().backward()
    torch.testing.assert_close(s.grad, s2.grad)


def test_mask_inf_teacher_and_non_contiguous():
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(5, 8, generator=gen, dtype=torch.float64)[:, ::2].requires_grad_()
    t = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    t[0, 1] = float("-inf")
    mask = torch.tensor([True, False, True, True, False])
    loss = distillation_loss(s, t, 1.5, mask=mask)
    assert torch.isfinite(loss)
    loss.backward()
    s64 = s.detach().clone().requires_grad_()
    oracle(s64, t, 1.5, mask).backward()
    torch.testing.assert_close(loss, oracle(s.detach(), t, 1.5, mask))
    torch.testing.assert_close(s.grad, s64.grad)
    assert torch.all(s.grad[~mask] == 0)


@pytest.mark.parametrize("teacher", ["logits", "hidden"])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_fused_linear_matches_unfused(teacher, chunk):
    gen = torch.Generator().manual_seed(chunk)
    h = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(13, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, generator=gen, dtype=torch.float64, requires_grad=True)
    th = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    tW = torch.randn(13, 4, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 5, generator=gen) > 0.3
    t_logits = th @ tW.t()
    kwargs = dict(teacher_hidden=th, teacher_weight=tW) if teacher == "hidden" else {}
    loss = fused_linear_distillation(h, W, t_logits if teacher == "logits" else None, student_bias=b, temperature=2.0, mask=mask, chunk_size=chunk, **kwargs)
    loss.backward()
    h2, W2, b2 = (v.detach().clone().requires_grad_() for v in (h, W, b))
    ref = oracle(h2 @ W2.t() + b2, t_logits, 2.0, mask)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    for got, exp in ((h.grad, h2.grad), (W.grad, W2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-13)  # float64 end to end


@pytest.mark.parametrize(
    "call",
    [
        lambda: distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4)),
        lambda: distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0),
        lambda: distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), reduction="mean"),
        lambda: distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(3, dtype=torch.bool)),
        lambda: fused_linear_distillation(torch.zeros(2, 3), torch.zeros(4, 3)),
        lambda: fused_linear_distillation(torch.zeros(2, 3), torch.zeros(4, 2), torch.zeros(2, 4)),
    ],
)
def test_bad_input(call):
    with pytest.raises(ValueError):
        call()
