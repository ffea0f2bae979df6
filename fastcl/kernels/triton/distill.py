r"""Triton fused distillation: per-row T²·KL(p_t ‖ p_s) and its gradient in one kernel.

Math (contract in :mod:`fastcl.ops.distill`; one row, ``c = log₂e / T``, logits scaled to
base 2: ``a = c·z`` so that ``softmax(z/T) = 2^(a − log₂Σ2^a)``)::

    L_s = log₂ Σ_v 2^(a_s,v),   L_t = log₂ Σ_v 2^(a_t,v)
    p_s = 2^(a_s − L_s),  p_t = 2^(a_t − L_t)
    loss_row = T² · ln2 · Σ_v [p_t,v == 0 ? 0 : p_t,v · ((a_t,v − L_t) − (a_s,v − L_s))]
    grad     = grad_scale · T · (p_s − p_t)

One program per row, the vocabulary walked in ``BLOCK_V`` slices (any V, bounded
registers), twice:

1. *Statistics.* Online softmax with one running maximum per row and stream (a block
   reduction), so rescaling costs one scalar ``ex2`` per block and each element one
   ``ex2`` per stream; per-lane partial sums are summed once at the end.
2. *Gradient and loss.* ``p_s`` and ``p_t`` (one ``ex2`` each) give the gradient and
   the KL term, so every element costs 4 ``ex2`` in all.

The loss is summed in pass 2 from the final ``p_t`` itself, so the contract's
non-finite semantics hold by construction: a term is exactly 0 iff ``p_t == 0`` (a −inf
teacher logit, or underflow), every other term follows IEEE arithmetic — a NaN, a +inf
logit or an all −inf teacher row makes ``L`` or ``p`` NaN and so the row's loss and
gradient NaN; a student −inf where ``p_t > 0`` gives ``+inf``. Masked rows get loss 0 and
gradient 0. All math is float32 whatever the input dtype.

Alignment. Rows start at ``row·V`` elements, so for V not a multiple of 16 bytes (GPT-2's
50257) most rows start off a 16-byte boundary. When the student, teacher and gradient
all start on one (``ALIGNED``; fresh tensors do), row ``r`` is walked from the 16-byte
boundary ``(r·V) mod VEC`` elements below its start: a first masked block (only when the
row is not aligned), whole blocks with unmasked 16-byte vector loads and stores, a
masked tail. Otherwise the same walk runs with Triton's own alignment analysis (a view at
an odd offset gets element-wise accesses).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..._dtypes import acc_dtype
from ._launch import Launch

__all__ = ["distill", "plan", "MAX_BLOCK_V", "num_warps_for"]

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
def _load_scaled(s_base, t_base, u, inside, c, MASKED: tl.constexpr):
    """One block of both streams as float32 times ``c`` (−inf outside the row when ``MASKED``)."""
    if MASKED:
        a_s = tl.load(s_base + u, mask=inside, other=float("-inf")).to(tl.float32) * c
        a_t = tl.load(t_base + u, mask=inside, other=float("-inf")).to(tl.float32) * c
    else:
        a_s = tl.load(s_base + u).to(tl.float32) * c
        a_t = tl.load(t_base + u).to(tl.float32) * c
    return a_s, a_t


@triton.jit
def _stats_step(s_base, t_base, u, inside, c, m_s, z_s, m_t, z_t, MASKED: tl.constexpr):
    """Fold one block into the running (maximum, per-lane sums) of 2^a for both streams."""
    a_s, a_t = _load_scaled(s_base, t_base, u, inside, c, MASKED)
    neg_inf = float("-inf")
    # A maximum still at −inf shifts by 0 instead (no −inf − −inf).
    m_s_new = tl.maximum(m_s, tl.max(a_s, axis=0))
    shift_s = tl.where(m_s_new == neg_inf, 0.0, m_s_new)
    z_s = z_s * tl.exp2(m_s - shift_s) + tl.exp2(a_s - shift_s)
    m_t_new = tl.maximum(m_t, tl.max(a_t, axis=0))
    shift_t = tl.where(m_t_new == neg_inf, 0.0, m_t_new)
    z_t = z_t * tl.exp2(m_t - shift_t) + tl.exp2(a_t - shift_t)
    return m_s_new, z_s, m_t_new, z_t


@triton.jit
def _grad_step(s_base, t_base, g_base, u, inside, c, log_z_s, log_z_t, gscale, kl, MASKED: tl.constexpr):
    """Write ``gscale·(p_s − p_t)`` for one block and add its KL terms (base-2 logs) to ``kl``."""
    a_s, a_t = _load_scaled(s_base, t_base, u, inside, c, MASKED)
    log_p_s = a_s - log_z_s
    log_p_t = a_t - log_z_t
    p_t = tl.exp2(log_p_t)
    grad = (gscale * (tl.exp2(log_p_s) - p_t)).to(g_base.dtype.element_ty)
    if MASKED:
        tl.store(g_base + u, grad, mask=inside)
    else:
        tl.store(g_base + u, grad)
    return kl + tl.where(p_t == 0.0, 0.0, p_t * (log_p_t - log_p_s))


@triton.jit
def _distill_kernel(
    s_ptr,              # [R, V] student logits
    t_ptr,              # [R, V] teacher logits (student's dtype)
    mask_ptr,           # [R] uint8 (1 = row counts); unused without HAS_MASK
    loss_ptr,           # [R] float32
    grad_ptr,           # [R, V] student dtype
    V,
    c,                  # log₂e / T
    loss_factor,        # T² · ln2
    gscale,             # grad_scale · T
    HAS_MASK: tl.constexpr,
    ALIGNED: tl.constexpr,      # s, t and grad start on 16-byte boundaries
    VEC: tl.constexpr,          # elements per 16 bytes
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_V)
    start = row * V
    if ALIGNED:
        # Element ``mis`` of the 16-byte-aligned bases below is the row's first element.
        mis = (start % VEC).to(tl.int32)
        s_base = tl.multiple_of(s_ptr + (start - mis), 16)
        t_base = tl.multiple_of(t_ptr + (start - mis), 16)
        g_base = tl.multiple_of(grad_ptr + (start - mis), 16)
    else:
        mis = V * 0
        s_base = s_ptr + start
        t_base = t_ptr + start
        g_base = grad_ptr + start
    n_u = mis + V                   # row = elements [mis, n_u) from the bases (int32: V < 2³¹)
    n_full = n_u // BLOCK_V         # blocks [k·BLOCK_V, (k+1)·BLOCK_V) inside [0, n_u)
    k_first = tl.where(mis > 0, 1, 0)
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    if keep:
        neg_inf = float("-inf")
        m_s = neg_inf
        m_t = neg_inf
        z_s = tl.zeros([BLOCK_V], tl.float32)
        z_t = tl.zeros([BLOCK_V], tl.float32)
        if mis > 0:
            m_s, z_s, m_t, z_t = _stats_step(s_base, t_base, lanes, (lanes >= mis) & (lanes < n_u), c,
                                             m_s, z_s, m_t, z_t, True)
        for k in range(k_first, n_full):
            m_s, z_s, m_t, z_t = _stats_step(s_base, t_base, k * BLOCK_V + lanes, None, c, m_s, z_s, m_t, z_t, False)
        u = n_full * BLOCK_V + lanes
        if (n_full * BLOCK_V < n_u) & (n_full >= k_first):
            m_s, z_s, m_t, z_t = _stats_step(s_base, t_base, u, u < n_u, c, m_s, z_s, m_t, z_t, True)
        log_z_s = tl.where(m_s == neg_inf, 0.0, m_s) + tl.log2(tl.sum(z_s, axis=0))
        log_z_t = tl.where(m_t == neg_inf, 0.0, m_t) + tl.log2(tl.sum(z_t, axis=0))

        kl = tl.zeros([BLOCK_V], tl.float32)
        if mis > 0:
            kl = _grad_step(s_base, t_base, g_base, lanes, (lanes >= mis) & (lanes < n_u), c,
                            log_z_s, log_z_t, gscale, kl, True)
        for k in range(k_first, n_full):
            kl = _grad_step(s_base, t_base, g_base, k * BLOCK_V + lanes, None, c, log_z_s, log_z_t, gscale, kl, False)
        if (n_full * BLOCK_V < n_u) & (n_full >= k_first):
            kl = _grad_step(s_base, t_base, g_base, u, u < n_u, c, log_z_s, log_z_t, gscale, kl, True)
        tl.store(loss_ptr + row, loss_factor * tl.sum(kl, axis=0))
    else:
        tl.store(loss_ptr + row, 0.0)
        zero = tl.zeros([BLOCK_V], tl.float32).to(grad_ptr.dtype.element_ty)
        for k in range(0, tl.cdiv(n_u, BLOCK_V)):
            u = k * BLOCK_V + lanes
            tl.store(g_base + u, zero, mask=(u >= mis) & (u < n_u))


def plan(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None,
         grad_scale: float = 1.0) -> tuple[Launch, torch.Tensor, torch.Tensor]:
    """The launch of :func:`distill` and its outputs ``(row_loss, grad)`` (written by the launch)."""
    R, V = student.shape
    row_loss = torch.empty(R, dtype=acc_dtype(student.dtype), device=student.device)
    grad = torch.empty_like(student)
    vec = 16 // student.element_size()
    # At least 16 bytes: the first (masked) block must reach past the row's start.
    block_v = max(vec, min(MAX_BLOCK_V, triton.next_power_of_2(V)))
    mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else row_loss
    aligned = teacher.dtype == student.dtype and all(x.data_ptr() % 16 == 0 for x in (student, teacher, grad))
    temperature = float(temperature)
    launch = Launch(
        _distill_kernel,
        (R,),
        (student, teacher, mask_u8, row_loss, grad, V,
         math.log2(math.e) / temperature, temperature * temperature * math.log(2.0), float(grad_scale) * temperature),
        dict(
            HAS_MASK=mask is not None,
            ALIGNED=aligned,
            VEC=vec,
            BLOCK_V=block_v,
            num_warps=num_warps_for(block_v),
        ),
    )
    return launch, row_loss, grad


def distill(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None,
            grad_scale: float = 1.0):
    """``(T²·KL(softmax(t/T) ‖ softmax(s/T)) per row, grad_scale·T·(softmax(s/T) − softmax(t/T)))``.

    ``student``, ``teacher``: ``[R, V]`` contiguous, one dtype (float32, bfloat16, float16);
    ``mask``: ``None`` or ``[R]`` bool; ``grad_scale``: a Python float (``row_loss`` is not
    scaled). Returns ``row_loss`` ``[R]`` float32 and ``grad`` ``[R, V]`` in the student's
    dtype, both 0 on masked rows; non-finite inputs as the contract of
    :mod:`fastcl.ops.distill` says (NaN rows, never 0 or finite).
    """
    launch, row_loss, grad = plan(student, teacher, temperature, mask, grad_scale)
    launch(student.device)
    return row_loss, grad
