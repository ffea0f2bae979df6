"""fastcl.ops.distillation_loss / fused_linear_distillation and every distill backend against float64."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastcl
import fastcl.ops.distill as distill_mod
from fastcl.ops import _dispatch, distill_reference, distillation_loss, fused_linear_distillation, use_backend
from fastcl.testing import (
    KERNEL_TOLERANCES,
    TOLERANCES,
    assert_distill_matches,
    assert_nonfinite_contract,
    distill_oracle,
    logits,
    nonfinite_case,
    param_id,
)

# Triton's interpreter (numpy) warns on the NaN and inf it is given on purpose here.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def _backends():
    """Backends that run distill on CPU here (Triton under its interpreter, see tests/conftest.py)."""
    names = []
    for name in ("torch", "cpp", "triton"):
        mod, _ = _dispatch._load(name)
        if mod is not None and "distill" in mod.OPS and not mod.unavailable_reason(torch.device("cpu")):
            names.append(name)
    return names


BACKENDS = _backends()


def kernel(backend):
    return _dispatch._load(backend)[0].OPS["distill"]


def backend_tol(backend, dtype, tol):
    """Triton's interpreter converts float32 to bfloat16 and float16 by truncation (compiled Triton
    rounds to nearest even, as the other backends do): one ulp of gradient error instead of half."""
    if backend == "triton" and getattr(_dispatch._load("triton")[0], "INTERPRETED", False):
        return tol.truncating()
    return tol


def runs(backend, dtype):
    return _dispatch._why_not(backend, "distill", torch.device("cpu"), dtype) is None


# ----------------------------------------------------------------------------- the oracle


def test_reference_matches_kl_div_and_hand_formula():
    s, t = logits(6, 11, torch.float64, seed=0)
    row_loss, grad = distill_reference(s, t, 2.0, grad_scale=0.5)
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(row_loss, 4.0 * kl)
    ps, pt = (s / 2).exp(), (t / 2).exp()
    ps, pt = ps / ps.sum(-1, keepdim=True), pt / pt.sum(-1, keepdim=True)
    torch.testing.assert_close(grad, 0.5 * 2.0 * (ps - pt))
    # A −inf teacher logit drops its term (F.kl_div gives NaN there: 0·(−inf)).
    t[2, 4] = float("-inf")
    row_loss, _ = distill_reference(s, t, 2.0)
    keep = torch.arange(11) != 4
    pt2, ps2 = pt[2, keep] / pt[2, keep].sum(), ps[2]
    torch.testing.assert_close(row_loss[2], 4.0 * (pt2 * (pt2.log() - ps2[keep].log())).sum())
    mask = torch.tensor([True, False] * 3)
    masked_loss, masked_grad = distill_reference(s, t, 2.0, mask)
    assert (masked_loss[~mask] == 0).all() and (masked_grad[~mask] == 0).all()
    torch.testing.assert_close(masked_loss[mask], row_loss[mask])


# ----------------------------------------------------------------------------- backends


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", TOLERANCES, ids=param_id)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (9, 300), (2, 2111)])
def test_backend_matches_oracle(backend, dtype, tol, shape):
    if not runs(backend, dtype):
        pytest.skip(f"{backend} does not run {dtype}")
    student, teacher = logits(*shape, dtype, seed=sum(shape))
    mask = torch.arange(shape[0]) % 3 != 1
    row_loss, grad = kernel(backend)(student, teacher, 1.7, mask, 1.0 / shape[0])
    assert_distill_matches(row_loss, grad, student, teacher, 1.7, backend_tol(backend, dtype, tol), mask, 1.0 / shape[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", TOLERANCES, ids=param_id)
def test_backend_nonfinite_contract(backend, dtype, tol):
    """NaN / +inf / −inf in teacher and student: the same outcome on every backend, and the oracle's values."""
    if not runs(backend, dtype):
        pytest.skip(f"{backend} does not run {dtype}")
    student, teacher, mask, expect = nonfinite_case(dtype)
    row_loss, grad = kernel(backend)(student, teacher, 2.0, mask, 0.5)
    assert_nonfinite_contract(row_loss, grad, expect)
    assert_distill_matches(row_loss, grad, student, teacher, 2.0, backend_tol(backend, dtype, tol), mask, 0.5)


def test_torch_backend_chunks_rows():
    """Rows are processed in chunks: results do not depend on where the chunks fall."""
    from fastcl.ops import _torch_backend as tb

    student, teacher = logits(37, 3001, torch.float32, seed=3)  # 4 rows per 512 KiB chunk, a short last chunk
    row_loss, grad = tb.distill(student, teacher, 2.0)
    whole = [tb.distill(student[r : r + 1], teacher[r : r + 1], 2.0) for r in range(37)]
    torch.testing.assert_close(row_loss, torch.cat([w[0] for w in whole]), rtol=0, atol=0)
    torch.testing.assert_close(grad, torch.cat([w[1] for w in whole]), rtol=0, atol=0)


# ----------------------------------------------------------------------------- distillation_loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("upstream", [1.0, 2.5])
def test_loss_and_grad_match_oracle(backend, reduction, upstream):
    student, teacher = logits(2 * 5, 37, torch.float32, seed=11)
    student = student.reshape(2, 5, 37).requires_grad_()
    teacher = teacher.reshape(2, 5, 37)
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    with use_backend(backend):
        loss = distillation_loss(student, teacher, 1.5, reduction=reduction, mask=mask)
    rows, grad = distill_oracle(student.detach().reshape(10, 37), teacher.reshape(10, 37), 1.5, mask.reshape(10))
    go = upstream * (torch.linspace(0.5, 1.5, 10).reshape(2, 5) if reduction == "none" else torch.tensor(1.0))
    loss.backward(go)
    if reduction == "none":
        want, weights = rows.reshape(2, 5), go.reshape(10, 1).double()
    else:
        count = int(mask.sum()) if reduction == "batchmean" else 1
        want, weights = rows.sum() / count, upstream / count
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), (grad * weights).reshape(2, 5, 37), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_nonfinite_public(backend):
    """Through distillation_loss: NaN rows make the loss and their gradient NaN."""
    student, teacher, mask, expect = nonfinite_case(torch.float32)
    student.requires_grad_()
    with use_backend(backend):
        rows = distillation_loss(student, teacher, 2.0, reduction="none", mask=mask)
        mean = distillation_loss(student.detach(), teacher, 2.0, mask=mask)
    rows.backward(torch.ones_like(rows))
    assert_nonfinite_contract(rows.detach(), student.grad, expect)
    assert mean.isnan()
    keep = torch.tensor([kind == "finite" for kind in expect])  # the −inf rows that stay finite
    with use_backend(backend):
        value = distillation_loss(student.detach()[keep], teacher[keep], 2.0)
    torch.testing.assert_close(value.double(), distill_oracle(student.detach()[keep], teacher[keep], 2.0)[0].mean())


def test_batchmean_grad_is_the_kernels_buffer():
    """grad_output == 1: backward hands the kernel's (already 1/R-scaled) gradient to autograd, no extra pass."""
    made = []

    def recording(student, teacher, temperature, mask, grad_scale):
        row_loss, grad = distill_reference(student, teacher, temperature, mask, grad_scale)
        made.append(grad)
        return row_loss, grad

    student, teacher = logits(4, 9, torch.float32, seed=2)
    student.requires_grad_()
    original = distill_mod.choose_backend
    distill_mod.choose_backend = lambda op, device, dtype: ("recording", recording)
    try:
        distillation_loss(student, teacher, 2.0).backward()
    finally:
        distill_mod.choose_backend = original
    assert student.grad.data_ptr() == made[0].data_ptr()
    torch.testing.assert_close(student.grad.double(), distill_oracle(student.detach(), teacher, 2.0, grad_scale=0.25)[1])


def test_count_from_a_device_mask(monkeypatch):
    """Where the masked row count would need a device sync (CUDA, compiling), it is applied in backward."""
    monkeypatch.setattr(distill_mod, "compiling", lambda: True)
    student, teacher = logits(6, 9, torch.float32, seed=4)
    student.requires_grad_()
    mask = torch.tensor([True, False, True, True, False, True])
    loss = distillation_loss(student, teacher, 2.0, mask=mask)
    loss.backward(torch.tensor(3.0))
    rows, grad = distill_oracle(student.detach(), teacher, 2.0, mask)
    torch.testing.assert_close(loss.double(), rows.sum() / 4, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(student.grad.double(), grad * 3.0 / 4, rtol=1e-5, atol=1e-7)


def test_non_contiguous_and_mixed_dtypes():
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(5, 8, generator=gen, dtype=torch.float64)[:, ::2].requires_grad_()
    t = torch.randn(4, 5, generator=gen, dtype=torch.float64).t()
    loss = distillation_loss(s, t, 1.5)
    loss.backward()
    rows, grad = distill_oracle(s.detach(), t, 1.5)
    torch.testing.assert_close(loss, rows.mean())
    torch.testing.assert_close(s.grad, grad / 5)
    # A float32 teacher is not rounded to a bfloat16 student: the loss is float32-accurate.
    s16 = torch.randn(3, 50, generator=gen).to(torch.bfloat16).requires_grad_()
    t32 = 3 * torch.randn(3, 50, generator=gen)
    loss = distillation_loss(s16, t32, 2.0)
    loss.backward()
    rows, grad = distill_oracle(s16.detach(), t32, 2.0)
    assert s16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), rows.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s16.grad.double(), grad / 3, rtol=2**-8, atol=1e-7)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 7), (0, 0)])
def test_empty_batch(reduction, shape):
    student = torch.zeros(shape, requires_grad=True)
    loss = distillation_loss(student, torch.zeros(shape), reduction=reduction, mask=torch.zeros(shape[:-1], dtype=torch.bool))
    assert loss.shape == (shape[:-1] if reduction == "none" else ())
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert student.grad.shape == shape and not student.grad.any()


@pytest.mark.parametrize("fused", [False, True])
def test_double_backward_is_refused(fused):
    """create_graph=True works, but a second backward through the distillation term raises (not a silent 0)."""
    student, teacher = logits(3, 5, torch.float64, seed=5)
    student.requires_grad_()
    W = torch.eye(5, dtype=torch.float64, requires_grad=True)
    distill = fused_linear_distillation(student, W, teacher) if fused else distillation_loss(student, teacher)
    (g,) = torch.autograd.grad(distill + (student**3).sum(), student, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_lwf_penalty_nonfinite_teacher():
    """LwF.penalty goes through distillation_loss: a NaN or inf teacher output is a NaN penalty, not 0."""
    model = torch.nn.Linear(4, 3)
    lwf = fastcl.LwF(model, strength=1.0, temperature=2.0)
    lwf.consolidate()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            lwf.teacher.bias[1] = bad
        logits_ = model(x)
        penalty = lwf.penalty(x, logits_)
        assert penalty.isnan(), bad
        penalty.backward()
        assert model.weight.grad.isnan().all()
        model.zero_grad()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 6),
    vocab=st.integers(1, 70),
    dtype_index=st.integers(0, len(TOLERANCES) - 1),
    temperature=st.floats(0.25, 8.0),
    transposed=st.booleans(),
    masked=st.booleans(),
    reduction=st.sampled_from(["batchmean", "sum", "none"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_any_shape_stride_dtype(rows, vocab, dtype_index, temperature, transposed, masked, reduction, seed):
    """distillation_loss on the default backend vs the float64 oracle over shapes, strides and dtypes."""
    dtype, tol = TOLERANCES[dtype_index]
    gen = torch.Generator().manual_seed(seed)
    if transposed:  # [rows, vocab] views of [vocab, rows] storage
        s = (3 * torch.randn(vocab, rows, generator=gen)).to(dtype).t()
        t = (3 * torch.randn(vocab, rows, generator=gen)).to(dtype).t()
    else:
        s, t = logits(rows, vocab, dtype, seed)
    s.requires_grad_()
    mask = (torch.rand(rows, generator=gen) > 0.3) if masked else None
    loss = distillation_loss(s, t, temperature, reduction=reduction, mask=mask)
    loss.sum().backward()
    want_rows, want_grad = distill_oracle(s.detach(), t, temperature, mask)
    if reduction == "none":
        want = want_rows
    else:
        count = (rows if mask is None else max(int(mask.sum()), 1)) if reduction == "batchmean" else 1
        want, want_grad = want_rows.sum() / count, want_grad / count
    torch.testing.assert_close(loss.double(), want, rtol=tol.loss.rtol, atol=tol.loss.atol * temperature**2 * rows)
    torch.testing.assert_close(s.grad.double(), want_grad, rtol=tol.grad.rtol, atol=tol.grad.atol * temperature + tol.floor)


def test_inductor_compiles_training_step():
    """torch.compile with the default (inductor) backend, forward and backward, fullgraph."""
    torch._dynamo.reset()
    student, teacher = logits(4, 9, torch.float32, seed=6)
    student.requires_grad_()
    mask = torch.tensor([True, True, False, True])

    def step(s):
        return distillation_loss(s, teacher, 2.0, mask=mask)

    eager = step(student)
    (eager_grad,) = torch.autograd.grad(eager, student)
    compiled = torch.compile(step, fullgraph=True)(student)
    (compiled_grad,) = torch.autograd.grad(compiled, student)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


# ----------------------------------------------------------------------------- fused linear


@pytest.mark.parametrize("teacher", ["logits", "hidden"])
@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_fused_linear_matches_unfused(teacher, chunk, reduction):
    gen = torch.Generator().manual_seed(chunk)
    h = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(13, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, generator=gen, dtype=torch.float64, requires_grad=True)
    th = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    tW = torch.randn(13, 4, generator=gen, dtype=torch.float64)
    tb = torch.randn(13, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 5, generator=gen) > 0.3
    t_logits = th @ tW.t() + tb
    kwargs = dict(teacher_hidden=th, teacher_weight=tW, teacher_bias=tb) if teacher == "hidden" else {}
    loss = fused_linear_distillation(h, W, t_logits if teacher == "logits" else None, student_bias=b, temperature=2.0,
                                     mask=mask, chunk_size=chunk, reduction=reduction, **kwargs)
    loss.backward(torch.tensor(1.5, dtype=torch.float64))
    h2, W2, b2 = (v.detach().clone().requires_grad_() for v in (h, W, b))
    ref = distillation_loss(h2 @ W2.t() + b2, t_logits, 2.0, mask=mask, reduction=reduction)
    ref.backward(torch.tensor(1.5, dtype=torch.float64))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    for got, exp in ((h.grad, h2.grad), (W.grad, W2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-13)  # float64 end to end


def _fused_case(dtype, device="cpu", R=48, V=301, H=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(R, H, generator=gen)
    W = torch.randn(V, H, generator=gen) / math.sqrt(H)
    th = torch.randn(R, H, generator=gen)
    tW = torch.randn(V, H, generator=gen) / math.sqrt(H)
    return [x.to(device, dtype) for x in (h, W, th, tW)]


def _fused_vs_float64(dtype, device):
    h, W, th, tW = _fused_case(dtype, device)
    h.requires_grad_()
    W.requires_grad_()
    loss = fused_linear_distillation(h, W, teacher_hidden=th, teacher_weight=tW, temperature=2.0, chunk_size=16)
    loss.backward()
    h64, W64 = (x.detach().double().requires_grad_() for x in (h, W))
    ref = distillation_loss(h64 @ W64.t(), th.double() @ tW.double().t(), 2.0)
    ref.backward()
    return loss, ref, h.grad, h64.grad, W.grad, W64.grad


# (loss rtol, ∂h and ∂W tolerance relative to the largest entry): the logits are computed
# in the inputs' dtype, so a bf16 case is bf16-accurate, not better.
@pytest.mark.parametrize("dtype,loss_rtol,grad_tol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 3e-2, 2e-2)])
def test_fused_linear_precision_cpu(dtype, loss_rtol, grad_tol):
    loss, ref, gh, gh64, gW, gW64 = _fused_vs_float64(dtype, "cpu")
    assert gh.dtype == gW.dtype == dtype
    assert abs(loss.item() - ref.item()) <= loss_rtol * ref.item()
    for got, want in ((gh, gh64), (gW, gW64)):
        assert (got.double() - want).abs().max() <= grad_tol * want.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,loss_rtol,grad_tol", [(torch.bfloat16, 3e-2, 2e-2), (torch.float16, 5e-3, 4e-3)])
def test_fused_linear_precision_cuda(dtype, loss_rtol, grad_tol):
    """∂W from bf16/fp16 tensor-core products accumulated in float32, within the dtype's own accuracy."""
    loss, ref, gh, gh64, gW, gW64 = _fused_vs_float64(dtype, "cuda")
    assert abs(loss.item() - ref.item()) <= loss_rtol * ref.item()
    for got, want in ((gh, gh64), (gW, gW64)):
        assert (got.double() - want).abs().max() <= grad_tol * want.abs().max()


def test_fused_linear_nonfinite_teacher():
    h, W, th, tW = _fused_case(torch.float32, R=6, V=11, H=5)
    th[2, 1] = float("nan")
    W.requires_grad_()
    loss = fused_linear_distillation(h, W, teacher_hidden=th, teacher_weight=tW)
    loss.backward()
    assert loss.isnan() and W.grad.isnan().all()
    t_logits = h @ W.detach().t()
    t_logits[4, :] = float("-inf")  # an all −inf teacher row: not a distribution
    assert fused_linear_distillation(h, W.detach(), t_logits).isnan()


def test_fused_linear_empty_rows():
    h = torch.zeros(0, 4, requires_grad=True)
    W = torch.randn(7, 4, requires_grad=True)
    loss = fused_linear_distillation(h, W, torch.zeros(0, 7))
    assert loss.item() == 0.0
    loss.backward()
    assert not W.grad.any()


# ----------------------------------------------------------------------------- bad input

Z23, Z24 = torch.zeros(2, 3), torch.zeros(2, 4)


@pytest.mark.parametrize(
    "call,error,name",
    [
        (lambda: distillation_loss(Z23, Z24), ValueError, "teacher_logits"),
        (lambda: distillation_loss(Z23, Z23, temperature=0), ValueError, "temperature"),
        (lambda: distillation_loss(Z23, Z23, temperature=-1.0), ValueError, "temperature"),
        (lambda: distillation_loss(Z23, Z23, temperature=float("nan")), ValueError, "temperature"),
        (lambda: distillation_loss(Z23, Z23, temperature=1e39), ValueError, "temperature"),
        (lambda: distillation_loss(Z23, Z23, temperature=True), TypeError, "temperature"),
        (lambda: distillation_loss(Z23, Z23, temperature="2"), TypeError, "temperature"),
        (lambda: distillation_loss(Z23, Z23, reduction="mean"), ValueError, "reduction"),
        (lambda: distillation_loss(Z23, Z23, mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask"),
        (lambda: distillation_loss(Z23, Z23, mask=torch.ones(2)), TypeError, "mask"),
        (lambda: distillation_loss(Z23, Z23.long()), TypeError, "teacher_logits"),
        (lambda: distillation_loss(Z23.long(), Z23), TypeError, "student_logits"),
        (lambda: distillation_loss([[0.0]], Z23), TypeError, "student_logits"),
        (lambda: distillation_loss(torch.zeros(()), torch.zeros(())), ValueError, "student_logits"),
        (lambda: distillation_loss(torch.zeros(2, 0), torch.zeros(2, 0)), ValueError, "student_logits"),
        (lambda: fused_linear_distillation(Z23, torch.zeros(4, 3)), ValueError, "teacher_logits"),
        (lambda: fused_linear_distillation(Z23, torch.zeros(4, 2), Z24), ValueError, "student_weight"),
        (lambda: fused_linear_distillation(Z23, torch.zeros(4, 3).double(), Z24), TypeError, "student_weight"),
        (lambda: fused_linear_distillation(Z23, torch.zeros(4, 3), torch.zeros(2, 5)), ValueError, "teacher_logits"),
        (lambda: fused_linear_distillation(Z23, torch.zeros(4, 3), Z24, student_bias=torch.zeros(3)), ValueError, "student_bias"),
        (lambda: fused_linear_distillation(Z23, torch.zeros(4, 3), Z24, chunk_size=0), ValueError, "chunk_size"),
        (lambda: fused_linear_distillation(Z23, torch.zeros(4, 3), Z24, chunk_size=2.5), TypeError, "chunk_size"),
        (lambda: fused_linear_distillation(Z23, torch.zeros(4, 3), Z24, temperature=0), ValueError, "temperature"),
        (lambda: fused_linear_distillation(Z23, torch.zeros(4, 3), Z24, reduction="none"), ValueError, "reduction"),
        (lambda: fused_linear_distillation(Z23, torch.zeros(4, 3), Z24, mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask"),
        (lambda: fused_linear_distillation(Z23, torch.zeros(4, 3), teacher_hidden=Z23), ValueError, "teacher_weight"),
        (lambda: fused_linear_distillation(Z23, torch.zeros(4, 3), teacher_hidden=Z23, teacher_weight=torch.zeros(4, 3).double()),
         TypeError, "teacher_weight"),
    ],
)
def test_bad_input_names_the_parameter(call, error, name):
    with pytest.raises(error, match=name):
        call()


@pytest.mark.parametrize("dtype, tol", KERNEL_TOLERANCES, ids=param_id)
def test_default_backend_matches_oracle(dtype, tol):
    """Whatever backend the dispatcher picks on this machine."""
    student, teacher = logits(7, 513, dtype, seed=9)
    row_loss, grad = _dispatch.choose_backend("distill", "cpu", dtype)[1](student, teacher, 3.0, None, 0.125)
    assert_distill_matches(row_loss, grad, student, teacher, 3.0, tol, None, 0.125)
