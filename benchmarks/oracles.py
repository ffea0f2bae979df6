"""float64 oracles and error bounds for ``gpu_check.py``'s correctness checks.

The oracles and the output rounding per dtype are those the tests use (:mod:`fastcl.testing`);
this module adds the magnitudes that bound the float32 error at real sizes, and feeds large
inputs in chunks (tensors, rows, samples) so that the float64 working set stays bounded.

A kernel's output passes when ``|got − want| ≤ bound`` element-wise: the bound is the
output dtype's rounding (``OUT_RTOL·|want|``) plus the float32 compute error allowed by the
magnitudes of the terms involved (``mag``, also computed in float64). ``worst_ratio`` reports
``max |got − want| / bound``: pass ≤ 1; NaN/inf never passes; an exact 0 must stay 0.
"""
from __future__ import annotations

import math

import torch

from fastcl.testing import KERNEL_TOLERANCES, distill_oracle, penalty_oracle, sqgrad_oracle

__all__ = [
    "OUT_RTOL", "EPS32", "worst_ratio", "norm_errors", "rows_for", "grad_bound",
    "penalty_expected", "sqgrad_expected", "distill_expected", "fused_expected",
]

F64 = torch.float64
# Rounding of one float32 value to the output dtype, relative to the result (DtypeTol.rounding).
OUT_RTOL = {dtype: tol.rounding for dtype, tol in KERNEL_TOLERANCES}
EPS32 = 2.0**-24


# ---------------------------------------------------------------------------- comparisons


def worst_ratio(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> float:
    """``max |got − want| / bound`` (``inf`` for a non-finite ``got``; 0/0 counts as 0)."""
    got = got.to(F64)
    if not bool(torch.isfinite(got).all()):
        return math.inf
    err = (got - want).abs()
    ratio = torch.where(err == 0, torch.zeros_like(err), err / bound)
    return float(ratio.max()) if ratio.numel() else 0.0


def norm_errors(got: torch.Tensor, want: torch.Tensor, rows_per_chunk: int) -> tuple[float, float]:
    """``(‖got − want‖ / ‖want‖, max over rows of the same per row)``, computed in row chunks."""
    num = den = 0.0
    worst_row = 0.0
    for start in range(0, want.shape[0], rows_per_chunk):
        g = got[start:start + rows_per_chunk].to(F64)
        w = want[start:start + rows_per_chunk]
        if not bool(torch.isfinite(g).all()):
            return math.inf, math.inf
        d2 = (g - w).reshape(g.shape[0], -1).square().sum(1)
        w2 = w.reshape(w.shape[0], -1).square().sum(1)
        num += float(d2.sum())
        den += float(w2.sum())
        nz = w2 > 0
        if bool((~nz & (d2 > 0)).any()):
            worst_row = math.inf
        if bool(nz.any()):
            worst_row = max(worst_row, float((d2[nz] / w2[nz]).sqrt().max()))
    return (math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)), worst_row


def rows_for(nbytes_per_row: int, budget: int) -> int:
    """Rows per chunk so that a chunk of ``nbytes_per_row``-byte rows fits in ``budget`` bytes."""
    return max(1, budget // max(1, nbytes_per_row))


def grad_bound(want: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype, rounding: float = 1.0) -> torch.Tensor:
    """Output rounding of ``dtype`` (``rounding`` ulps) plus float32 error ``2e-5·mag`` plus the smallest subnormal step."""
    return rounding * OUT_RTOL[dtype] * want.abs() + 2e-5 * mag + torch.finfo(dtype).tiny * torch.finfo(dtype).eps


# ---------------------------------------------------------------------------- oracles


def penalty_expected(param, anchor, weight, grad_before, *, scale: float, form: str):
    """float64 ``(value, grad after, |step|)`` of one tensor: ``value = s·Σ w·φ(θ−a)``,
    ``grad after = grad_before + s·w·φ'(θ−a)`` (``None`` without ``grad_before``)."""
    weights = None if weight is None else [weight]
    grads = None if grad_before is None else [grad_before]
    value, after = penalty_oracle([param], [anchor], weights, scale, form, grads)
    value = torch.tensor(value, dtype=F64)
    if grads is None:
        return value, None, None
    return value, after[0], (after[0] - grad_before.to(F64)).abs()


def sqgrad_expected(x: torch.Tensor, g: torch.Tensor, power: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``Σ_b |g_bᵀ x_b|^p`` and its magnitude ``Σ_b (|g_b|ᵀ|x_b|)^p`` (which bounds the float32 error)."""
    return sqgrad_oracle(x, g, power), sqgrad_oracle(x.abs(), g.abs(), power)


def distill_expected(s: torch.Tensor, t: torch.Tensor, T: float, mask: torch.Tensor | None):
    """float64 per-row ``(loss, ∂loss/∂s, gradient magnitude, loss magnitude)`` of rows ``s``, ``t``.

    Loss ``T²·KL(softmax(t/T) ‖ softmax(s/T))`` and gradient ``T·(p_s − p_t)``, masked rows 0.
    The gradient magnitude is ``T·(p_s + p_t)``; the loss magnitude ``T²·(1 + max|s/T| +
    max finite |t/T| + log V)`` bounds the float32 error of its logsumexps and cross term."""
    s64, t64 = s.to(F64), t.to(F64)
    loss, grad = distill_oracle(s64, t64, T, mask)
    pt = torch.softmax(t64 / T, dim=-1)
    grad_mag = grad + 2 * T * pt  # T·(p_s − p_t) + 2T·p_t
    finite_t = torch.where(torch.isfinite(t64), t64.abs(), torch.zeros_like(t64)) / T
    loss_mag = T * T * (1.0 + (s64.abs() / T).amax(-1) + finite_t.amax(-1) + math.log(s.shape[-1]))
    if mask is not None:
        keep = mask.to(F64)
        grad_mag, loss_mag = grad_mag * keep[:, None], loss_mag * keep
    return loss, grad, grad_mag, loss_mag


def fused_expected(h, W, b, t_logits, ht, Wt, T, mask, chunk_bytes):
    """float64 loss (batchmean over unmasked rows) and gradients for ``h``, ``W``, ``b`` of
    ``distill(h Wᵀ + b, teacher)`` with teacher logits ``t_logits`` or ``ht Wtᵀ``.

    Logits are formed in row chunks of about ``chunk_bytes`` each; the float64 logit gradients
    of all rows are kept (``R·V·8`` bytes) so that ∂h and ∂W are one matmul each, not one pass
    over the ``V×H`` weight per chunk."""
    R, H = h.shape
    V = W.shape[0]
    W64 = W.to(F64)
    h64 = h.to(F64)
    b64 = None if b is None else b.to(F64)
    Wt64 = None if Wt is None else Wt.to(F64)
    grad_s = torch.empty(R, V, dtype=F64, device=h.device)
    total = 0.0
    step = rows_for(6 * V * 8, chunk_bytes)
    for r in range(0, R, step):
        s = h64[r:r + step] @ W64.t()
        if b64 is not None:
            s += b64
        t = t_logits[r:r + step].to(F64) if t_logits is not None else ht[r:r + step].to(F64) @ Wt64.t()
        m = None if mask is None else mask[r:r + step]
        loss, grad_s[r:r + step] = distill_oracle(s, t, T, m)
        total += float(loss.sum())
        del s, t
    del Wt64
    count = R if mask is None else max(1, int(mask.sum()))
    gh = (grad_s @ W64) / count
    del W64
    gW = (grad_s.t() @ h64) / count
    gb = None if b is None else grad_s.sum(0) / count
    return total / count, gh, gW, gb
