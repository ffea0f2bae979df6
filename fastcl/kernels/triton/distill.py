r"""Triton fused distillation: per-row T²·KL(p_t ‖ p_s) and its gradient in one kernel.

Math (contract in :mod:`fastcl.ops.distill`; s' = s/T, t' = t/T, one row)::

    p_t = softmax(t'),  p_s = softmax(s')
    KL  = Σ_v p_t,v (t'_v − s'_v) − logsumexp(t') + logsumexp(s')     (Σ p_t = 1)
    loss_row = T² · KL,   grad = T · (p_s − p_t)

One program per row, the vocabulary walked in ``BLOCK_V`` slices (any V, bounded
registers). Pass 1 keeps, per lane, online-softmax running maxima and sums for s' and
t' and the running ``Σ exp(t' − m_t)·(t' − s')`` (rescaled whenever ``m_t`` grows);
the lanes are merged once at the end. Pass 2 re-reads the row and writes the gradient.
Teacher lanes with p_t = 0 (−inf logits) contribute exactly 0 to the loss. All math is
float32 whatever the input dtype; masked rows get loss 0 and gradient 0.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["distill", "MAX_BLOCK_V", "num_warps_for"]

# Tunables (H100 defaults).
MAX_BLOCK_V = 4096      # vocabulary slice per step (a power of two)


def num_warps_for(block_v: int) -> int:
    """Warps per row program for a given vocabulary slice."""
    if block_v >= 4096:
        return 8
    if block_v >= 1024:
        return 4
    return 2


@triton.jit
def _distill_kernel(
    s_ptr,              # [R, V] student logits
    t_ptr,              # [R, V] teacher logits
    mask_ptr,           # [R] uint8 (1 = row counts); unused without HAS_MASK
    loss_ptr,           # [R] float32
    grad_ptr,           # [R, V] student dtype
    V,
    temperature,
    inv_temperature,
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_V)
    s_row = s_ptr + row.to(tl.int64) * V
    t_row = t_ptr + row.to(tl.int64) * V
    g_row = grad_ptr + row.to(tl.int64) * V
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    if keep:
        neg_inf = float("-inf")
        m_s = tl.full([BLOCK_V], neg_inf, tl.float32)
        z_s = tl.zeros([BLOCK_V], tl.float32)
        m_t = tl.full([BLOCK_V], neg_inf, tl.float32)
        z_t = tl.zeros([BLOCK_V], tl.float32)
        cross = tl.zeros([BLOCK_V], tl.float32)     # Σ exp(t' − m_t)·(t' − s')
        for v0 in range(0, V, BLOCK_V):
            inside = v0 + lanes < V
            s = tl.load(s_row + v0 + lanes, mask=inside, other=neg_inf).to(tl.float32) * inv_temperature
            t = tl.load(t_row + v0 + lanes, mask=inside, other=neg_inf).to(tl.float32) * inv_temperature
            # Online softmax per lane; a lane still at −inf uses 0 as its shift (no −inf − −inf).
            m_s_new = tl.maximum(m_s, s)
            shift_s = tl.where(m_s_new == neg_inf, 0.0, m_s_new)
            z_s = z_s * tl.exp(m_s - shift_s) + tl.exp(s - shift_s)
            m_s = m_s_new
            m_t_new = tl.maximum(m_t, t)
            shift_t = tl.where(m_t_new == neg_inf, 0.0, m_t_new)
            rescale_t = tl.exp(m_t - shift_t)
            e_t = tl.exp(t - shift_t)
            # Lanes with p_t = 0 add exactly 0 (their t' − s' may be −inf − −inf).
            support = e_t > 0.0
            gap = tl.where(support, t, 0.0) - tl.where(support, s, 0.0)
            cross = cross * rescale_t + e_t * gap
            z_t = z_t * rescale_t + e_t
            m_t = m_t_new
        # Merge the lanes.
        max_s = tl.max(m_s, axis=0)
        max_t = tl.max(m_t, axis=0)
        sum_s = tl.sum(z_s * tl.exp(m_s - max_s), axis=0)
        lane_t = tl.exp(m_t - max_t)
        sum_t = tl.sum(z_t * lane_t, axis=0)
        expected_gap = tl.sum(cross * lane_t, axis=0) / sum_t
        log_z_s = max_s + tl.log(sum_s)
        log_z_t = max_t + tl.log(sum_t)
        tl.store(loss_ptr + row, temperature * temperature * (expected_gap - log_z_t + log_z_s))
        for v0 in range(0, V, BLOCK_V):
            inside = v0 + lanes < V
            s = tl.load(s_row + v0 + lanes, mask=inside, other=0.0).to(tl.float32) * inv_temperature
            t = tl.load(t_row + v0 + lanes, mask=inside, other=0.0).to(tl.float32) * inv_temperature
            grad = temperature * (tl.exp(s - log_z_s) - tl.exp(t - log_z_t))
            tl.store(g_row + v0 + lanes, grad.to(g_row.dtype.element_ty), mask=inside)
    else:
        tl.store(loss_ptr + row, 0.0)
        zero = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            tl.store(g_row + v0 + lanes, zero.to(g_row.dtype.element_ty), mask=v0 + lanes < V)


def _on(device: torch.device):
    """Make ``device`` current for a launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def distill(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None):
    """``(T²·KL(softmax(t/T) ‖ softmax(s/T)) per row, T·(softmax(s/T) − softmax(t/T)))``.

    ``student``, ``teacher``: ``[R, V]`` contiguous, one dtype (float32, bfloat16, float16);
    ``mask``: ``None`` or ``[R]`` bool. Returns ``row_loss`` ``[R]`` float32 and ``grad``
    ``[R, V]`` in the student's dtype, both 0 on masked rows.
    """
    R, V = student.shape
    row_loss = torch.empty(R, dtype=torch.float32, device=student.device)
    grad = torch.empty_like(student)
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else row_loss
    with _on(student.device):
        _distill_kernel[(R,)](
            student, teacher, mask_u8, row_loss, grad, V,
            float(temperature), 1.0 / float(temperature),
            HAS_MASK=mask is not None,
            BLOCK_V=block_v,
            num_warps=num_warps_for(block_v),
        )
    return row_loss, grad
