r"""Knowledge distillation at temperature T, forward and backward fused.

For one row with student logits ``s`` and teacher logits ``t`` over a vocabulary::

    p_t = softmax(t / T),  log p_s = log_softmax(s / T)
    loss_row = T² · KL(p_t ‖ p_s) = T² · Σ_v p_t,v · (log p_t,v − log p_s,v)
    ∂loss_row/∂s = T · (softmax(s / T) − p_t)

:func:`distillation_loss` reduces over rows: ``"batchmean"`` = mean over (unmasked)
rows, ``"sum"``, or ``"none"`` (per-row losses, shape of the leading dims). This is
Hinton et al.'s ``T²``-scaled KD loss as used by LwF (Li & Hoiem 2017). Gradient flows
to the student only. Teacher probabilities of exactly 0 (``-inf`` logits) contribute 0.

Backend kernels (``OPS["distill"]``) are called as ``kernel(student, teacher,
temperature, mask)`` with ``student``, ``teacher``: ``[R, V]`` contiguous, one dtype
(float32, bfloat16, float16; float64 for torch only), ``R, V ≥ 1``; ``mask``: ``None``
or a ``[R]`` bool tensor (True = row counts); and return ``(row_loss, grad)``:
``row_loss`` ``[R]`` float32 (float64 for float64 input) and ``grad`` ``[R, V]`` in the
student's dtype, both 0 on masked rows. Math in float32 whatever the input dtype.

:func:`fused_linear_distillation` takes hidden states and the head weight instead of
logits and walks row chunks, so the full ``[rows, vocab]`` logits never exist at once.
"""
from __future__ import annotations

import math

import torch

from ._dispatch import resolve
from ._library import compiling, register

__all__ = ["distillation_loss", "fused_linear_distillation", "distill_reference", "REDUCTIONS"]

REDUCTIONS = ("batchmean", "sum", "none")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def distill_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None):
    """Plain-PyTorch reference: ``(T²·KL(p_t‖p_s) per row, T·(p_s − p_t))``."""
    acc = _acc_dtype(student.dtype)
    s = student.to(acc) / temperature
    t = teacher.to(acc) / temperature
    log_ps = torch.log_softmax(s, dim=-1)
    log_pt = torch.log_softmax(t, dim=-1)
    pt = log_pt.exp()
    kl = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt)).sum(-1)
    row_loss = temperature**2 * kl
    grad = temperature * (log_ps.exp() - pt)
    if mask is not None:
        row_loss = torch.where(mask, row_loss, torch.zeros_like(row_loss))
        grad = torch.where(mask[:, None], grad, torch.zeros_like(grad))
    return row_loss, grad.to(student.dtype)


def _check_temperature(temperature) -> float:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _flat_mask(mask, lead_shape, device) -> torch.Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(f"mask must have the logits' leading shape {tuple(lead_shape)}, got {tuple(mask.shape)}")
    return mask.reshape(-1).to(device=device, dtype=torch.bool).contiguous()


def _reduce(row_loss: torch.Tensor, mask, reduction: str, lead_shape):
    """Reduce per-row losses; return (value, per-row weight factor for the gradient)."""
    if reduction == "none":
        return row_loss.reshape(lead_shape), None
    if reduction == "sum":
        return row_loss.sum(), 1.0
    count = row_loss.numel() if mask is None else mask.sum()
    count = torch.clamp(torch.as_tensor(count, device=row_loss.device, dtype=row_loss.dtype), min=1)
    return row_loss.sum() / count, 1.0 / count


def _distill_impl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    _, kernel = resolve("distill", student.device, student.dtype)
    return kernel(student, teacher, temperature, mask)


def _distill_fake(student, teacher, temperature, mask):
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    return student.new_empty(student.shape[:1], dtype=acc), torch.empty_like(student)


_distill_op = register("fastcl::distill", _distill_impl, _distill_fake)


def _distill_rows(student, teacher, temperature, mask):
    """Per-row losses and gradients from the chosen backend (through the custom op when compiling)."""
    impl = _distill_op if (_distill_op is not None and compiling()) else _distill_impl
    return impl(student, teacher, temperature, mask)


class _Distill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, mask, reduction, lead_shape):
        row_loss, grad = _distill_rows(student, teacher, temperature, mask)
        value, factor = _reduce(row_loss, mask, reduction, lead_shape)
        ctx.factor, ctx.reduction = factor, reduction
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            scale = grad_output.reshape(-1, 1).to(_acc_dtype(grad.dtype))
            out = (grad.to(scale.dtype) * scale).to(grad.dtype)
        else:
            # A 0-dim float32 scale keeps the product in grad's dtype while TensorIterator
            # computes it in float32: one rounding, no full-size float32 temporaries.
            scale = grad_output.to(_acc_dtype(grad.dtype)) * ctx.factor
            out = grad * scale
        return out, None, None, None, None, None


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    reduction: str = "batchmean",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T² · mean over rows of KL(softmax(t/T) ‖ softmax(s/T))`` over the last dimension.

    Args:
        student_logits: ``[..., V]``; gradient flows here.
        teacher_logits: same shape; treated as a constant (detached).
        temperature: T > 0.
        reduction: ``"batchmean"`` (mean over unmasked rows), ``"sum"`` or ``"none"``.
        mask: optional bool tensor of the leading shape; False rows (padding) are ignored.
    """
    temperature = _check_temperature(temperature)
    _check_reduction(reduction)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in shape")
    if student_logits.dim() == 0:
        raise ValueError("logits need at least one dimension (the classes)")
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise TypeError(f"logits must be floating point, got {student_logits.dtype} and {teacher_logits.dtype}")
    lead = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    teacher = teacher_logits.detach().to(device=student_logits.device, dtype=student_logits.dtype)
    flat_mask = _flat_mask(mask, lead, student_logits.device)
    s = student_logits.reshape(-1, V)
    t = teacher.reshape(-1, V)
    if s.shape[0] == 0 or V == 0:
        zero = student_logits.sum() * 0.0
        return zero.reshape(lead) if reduction == "none" else zero
    return _Distill.apply(s.contiguous(), t.contiguous(), temperature, flat_mask, reduction, tuple(lead))


class _FusedLinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, temperature, mask, chunk_size, reduction):
        R, H = hidden.shape
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        acc = _acc_dtype(hidden.dtype)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if (bias is not None and ctx.needs_input_grad[2]) else None
        row_loss = torch.empty(R, dtype=acc, device=hidden.device)
        for start in range(0, R, chunk_size):
            rows = slice(start, min(R, start + chunk_size))
            h = hidden[rows]
            s = torch.nn.functional.linear(h, weight, bias)
            if teacher_logits is not None:
                t = teacher_logits[rows].to(s.dtype)
            else:
                t = torch.nn.functional.linear(teacher_hidden[rows].to(s.dtype), teacher_weight.to(s.dtype), None if teacher_bias is None else teacher_bias.to(s.dtype))
            m = None if mask is None else mask[rows]
            loss_c, grad_s = _distill_rows(s.contiguous(), t.contiguous(), temperature, m)
            row_loss[rows] = loss_c
            if grad_hidden is not None:
                grad_hidden[rows] = grad_s @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_s.t().to(acc), h.to(acc))
            if grad_bias is not None:
                grad_bias += grad_s.to(acc).sum(0)
        value, factor = _reduce(row_loss, mask, reduction, (R,))
        ctx.factor, ctx.reduction = factor, reduction
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0),
            grad_weight if grad_weight is not None else torch.empty(0),
            grad_bias if grad_bias is not None else torch.empty(0),
        )
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        gh, gw, gb = ctx.saved_tensors
        if ctx.reduction == "none":
            raise RuntimeError("fused_linear_distillation supports reduction='batchmean' or 'sum' only")
        hd, wd, bd = ctx.dtypes
        scale = grad_output.to(_acc_dtype(hd)) * ctx.factor
        out_h = (gh.to(scale.dtype) * scale).to(hd) if gh.numel() else None
        out_w = (gw * scale).to(wd) if gw.numel() else None
        out_b = (gb * scale).to(bd) if gb.numel() else None
        return out_h, out_w, out_b, None, None, None, None, None, None, None, None


def fused_linear_distillation(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 2.0,
    reduction: str = "batchmean",
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Distillation loss from hidden states and the LM head, never holding full logits.

    ``loss = distillation_loss(h_s W_sᵀ + b_s, teacher, T)`` where the teacher is either
    ``teacher_logits`` or ``teacher_hidden @ teacher_weightᵀ (+ teacher_bias)``. Rows are
    processed ``chunk_size`` at a time (default: enough rows for ~256 MiB of fp32 logits);
    the gradients for the hidden states, head weight and bias are computed during the
    forward pass and scaled by ``grad_output`` in backward, so peak memory is
    O(chunk · vocab + rows · hidden + vocab · hidden).

    Shapes: ``student_hidden [..., H]``, ``student_weight [V, H]``, ``teacher_logits
    [..., V]`` or ``teacher_hidden [..., H_t]`` with ``teacher_weight [V, H_t]``.
    """
    temperature = _check_temperature(temperature)
    _check_reduction(reduction)
    if reduction == "none":
        raise ValueError("fused_linear_distillation supports reduction='batchmean' or 'sum'")
    if (teacher_logits is None) == (teacher_hidden is None):
        raise ValueError("give exactly one of teacher_logits or teacher_hidden (+ teacher_weight)")
    if teacher_hidden is not None and teacher_weight is None:
        raise ValueError("teacher_hidden needs teacher_weight")
    if student_weight.dim() != 2 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(f"student_weight must be [V, H] with H = hidden size {student_hidden.shape[-1]}, got {tuple(student_weight.shape)}")
    lead = student_hidden.shape[:-1]
    V = student_weight.shape[0]
    if teacher_logits is not None and tuple(teacher_logits.shape) != (*lead, V):
        raise ValueError(f"teacher_logits must have shape {(*lead, V)}, got {tuple(teacher_logits.shape)}")
    if teacher_hidden is not None:
        if tuple(teacher_hidden.shape[:-1]) != tuple(lead) or teacher_weight.shape != (V, teacher_hidden.shape[-1]):
            raise ValueError(
                f"teacher_hidden {tuple(teacher_hidden.shape)} / teacher_weight {tuple(teacher_weight.shape)} do not match rows {tuple(lead)} and vocab {V}"
            )
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    R = hidden.shape[0]
    if chunk_size is None:
        chunk_size = max(1, min(R, (256 * 2**20) // (4 * max(V, 1))))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    t_logits = None if teacher_logits is None else teacher_logits.detach().reshape(R, V)
    t_hidden = None if teacher_hidden is None else teacher_hidden.detach().reshape(R, -1)
    t_weight = None if teacher_weight is None else teacher_weight.detach()
    t_bias = None if teacher_bias is None else teacher_bias.detach()
    flat_mask = _flat_mask(mask, lead, hidden.device)
    return _FusedLinearDistill.apply(
        hidden, student_weight, student_bias, t_logits, t_hidden, t_weight, t_bias, temperature, flat_mask, chunk_size, reduction
    )
