"""The ``torch`` backend: plain PyTorch, which runs on any device and dtype.

penalty and sqgrad run their references. distill has its own implementation, because
the reference (:func:`fastcl.ops.distill_reference`, the float64 oracle) makes full-size
temporaries and would be slower than the ``F.kl_div(log_softmax)`` users would otherwise
write; :func:`distill` below is never slower than that.
"""
from __future__ import annotations

import torch

from .._dtypes import acc_dtype
from .penalty import penalty_reference
from .sqgrad import sqgrad_reference

# Row chunks of about this many bytes per float32 temporary: on CPU they stay in L2 and
# skip the page faults of fresh full-size buffers; on GPUs, big enough to fill the device.
_CHUNK_BYTES = {"cpu": 1 << 19}
_DEFAULT_CHUNK_BYTES = 1 << 28


def distill(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None = None,
            grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The distill kernel (contract in :mod:`fastcl.ops.distill`) in chunks of rows.

    Per chunk, with ``a = s/T − max``, ``b = t/T − max``, ``e = exp``, ``Z = Σ e``::

        loss = T²·(Σ_{e_b ≠ 0} e_b·(b − a) / Z_b − log Z_b + log Z_a)
        grad = (g·T/Z_a)·e_a − (g·T/Z_b)·e_b

    which is what the C++ kernel computes; the ``e_b ≠ 0`` terms are summed without a
    mask pass, and only rows whose sum came out NaN (where ``0·inf`` may have hidden a
    skipped term) are summed again with the mask.
    """
    R, V = student.shape
    acc = acc_dtype(student.dtype)
    row_loss = torch.empty(R, dtype=acc, device=student.device)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    chunk = max(1, _CHUNK_BYTES.get(student.device.type, _DEFAULT_CHUNK_BYTES) // (4 * V))
    inv_T, gT = 1.0 / temperature, grad_scale * temperature
    for r0 in range(0, R, chunk):
        rows = slice(r0, min(R, r0 + chunk))
        a = _scaled(student[rows], inv_T, acc)
        b = _scaled(teacher[rows], inv_T, acc)
        a.sub_(a.amax(-1, keepdim=True))
        b.sub_(b.amax(-1, keepdim=True))
        e_a, e_b = a.exp(), b.exp()
        z_a, z_b = e_a.sum(-1, keepdim=True), e_b.sum(-1, keepdim=True)
        diff = b.sub_(a)
        cross = torch.linalg.vecdot(e_b, diff)
        bad = cross.isnan()
        if bad.any():
            cross = torch.where(bad, torch.where(e_b == 0, 0.0, e_b * diff).sum(-1), cross)
        row_loss[rows] = cross / z_b[:, 0] - z_b[:, 0].log() + z_a[:, 0].log()
        c_a, c_b = gT / z_a, -gT / z_b
        if grad.dtype == acc:
            torch.mul(e_a, c_a, out=grad[rows]).addcmul_(e_b, c_b)
        else:
            grad[rows] = e_a.mul_(c_a).addcmul_(e_b, c_b)
    row_loss.mul_(temperature * temperature)
    if mask is not None:
        row_loss.masked_fill_(~mask, 0.0)
        grad.masked_fill_(~mask[:, None], 0.0)
    return row_loss, grad


def _scaled(x: torch.Tensor, factor: float, acc: torch.dtype) -> torch.Tensor:
    """A new ``acc`` tensor holding ``x·factor`` (the product rounded once, in ``acc``)."""
    return x * factor if x.dtype == acc else x.to(acc).mul_(factor)


OPS = {"penalty": penalty_reference, "sqgrad": sqgrad_reference, "distill": distill}


def unavailable_reason(device: torch.device) -> str | None:
    return None


def unsupported_reason(op: str, dtype: torch.dtype) -> str | None:
    return None
