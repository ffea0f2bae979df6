r"""Per-sample squared-gradient accumulation for linear maps (the Fisher engine's core).

For a linear map ``y[b,t,:] = W x[b,t,:]`` the gradient of sample ``b``'s loss with
respect to ``W`` is ``Σ_t g[b,t,:] ⊗ x[b,t,:]`` where ``g = ∂loss/∂y``. This op adds

    norm="squared":  out[o, i] += Σ_b (Σ_t g[b,t,o] · x[b,t,i])²      (the Fisher's numerator)
    norm="abs":      out[o, i] += Σ_b |Σ_t g[b,t,o] · x[b,t,i]|       (MAS: absolute values)

i.e. ``Σ_b |∇ℓ_b|^p`` with ``p = 2`` or ``p = 1``; the backend kernels take ``p`` as
``power``.

* No ``t`` dimension (or ``T = 1``): ``Σ_b (g_bo x_bi)² = ((g²)ᵀ (x²))_oi`` — one matmul,
  computed here directly for every backend (``|g|ᵀ|x|`` for ``p = 1``).
* ``T > 1``: a backend kernel; it must not materialise the ``[B, O, I]`` per-sample
  gradients (tile one sample's product in registers, raise to ``p``, accumulate). The
  torch reference materialises them in chunks of samples whose buffers stay within the size of ``x`` and
  ``g`` (at least 1 MiB, at most 64 MiB).

Backend kernels (``OPS["sqgrad"]``) are called as ``kernel(x, g, out, power)`` with
``x: [B, T, I]``, ``g: [B, T, O]`` contiguous (strided for the torch reference and the cpp
kernel), one dtype (float32, bfloat16, float16; float64 for torch only), ``B, T, I, O ≥ 1``,
``out: [O, I]`` contiguous float32 (float64 when x is float64) on the same device; they
accumulate into ``out``.
"""
from __future__ import annotations

import torch

from .._dtypes import acc_dtype
from ._dispatch import choose_backend
from ._library import compiling, register

__all__ = ["sqgrad", "sqgrad_into", "sqgrad_reference"]

_CHUNK_BYTES = 64 * 2**20
NORMS = {"squared": 2, "abs": 1}


def sqgrad_reference(x: torch.Tensor, g: torch.Tensor, out: torch.Tensor, power: int = 2) -> torch.Tensor:
    """Plain-PyTorch reference: per-sample gradients by ``bmm`` in bounded chunks of samples."""
    B, T, I = x.shape
    O = g.shape[-1]
    acc = out.dtype
    per_sample_bytes = O * I * torch.finfo(acc).bits // 8
    # Per-sample buffers stay within the size of x and g themselves (1 MiB to 64 MiB).
    budget = min(_CHUNK_BYTES, max(2**20, x.numel() * x.element_size() + g.numel() * g.element_size()))
    chunk = max(1, min(B, budget // max(per_sample_bytes, 1)))
    for start in range(0, B, chunk):
        xs = x[start:start + chunk].to(acc)
        gs = g[start:start + chunk].to(acc)
        per_sample = torch.bmm(gs.transpose(1, 2), xs)  # [b, O, I], a fresh buffer: raise it in place
        out += (per_sample.square_() if power == 2 else per_sample.abs_()).sum(0)
    return out


def sqgrad(
    x: torch.Tensor,
    g: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    norm: str = "squared",
) -> torch.Tensor:
    """Add ``Σ_b (Σ_t g[b,t,:] ⊗ x[b,t,:])²`` (``norm="abs"``: ``Σ_b |…|``) into ``out`` and return it.

    ``x``: ``[B, I]`` or ``[B, T, I]`` layer inputs; ``g``: ``[B, O]`` or ``[B, T, O]``
    gradients of the per-sample losses with respect to the layer outputs; any strides.
    ``out``: ``[O, I]`` float32 (float64 for float64 inputs), created (zeros) when ``None``.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be 'squared' or 'abs', got {norm!r}")
    power = NORMS[norm]
    if x.dim() not in (2, 3) or g.dim() != x.dim():
        raise ValueError(f"x and g must both be [B, I]/[B, O] or [B, T, I]/[B, T, O]; got {tuple(x.shape)} and {tuple(g.shape)}")
    if x.shape[:-1] != g.shape[:-1]:
        raise ValueError(f"x {tuple(x.shape)} and g {tuple(g.shape)} disagree on the leading (sample/sequence) dims")
    if x.device != g.device:
        raise ValueError(f"x is on {x.device} but g is on {g.device}")
    if not (x.is_floating_point() and g.is_floating_point()):
        raise TypeError(f"x and g must be floating point, got {x.dtype} and {g.dtype}")
    if g.dtype != x.dtype:
        g = g.to(x.dtype)
    acc = acc_dtype(x.dtype)
    O, I = g.shape[-1], x.shape[-1]
    if out is None:
        out = torch.zeros((O, I), dtype=acc, device=x.device)
    elif out.shape != (O, I) or out.dtype not in (torch.float32, torch.float64) or out.device != x.device:
        raise ValueError(f"out must be a float32/float64 [{O}, {I}] tensor on {x.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    return sqgrad_into(x, g, out, power)


def sqgrad_into(x: torch.Tensor, g: torch.Tensor, out: torch.Tensor, power: int) -> torch.Tensor:
    """:func:`sqgrad` without the argument checks, for callers that guarantee them (the Fisher engine).

    ``x`` and ``g`` share dtype and device, ``[B, I]``/``[B, O]`` or ``[B, T, I]``/``[B, T, O]``;
    ``out`` is ``[O, I]`` in their accumulation dtype; ``power`` is 2 or 1.
    """
    O, I = g.shape[-1], x.shape[-1]
    if x.shape[0] == 0 or O == 0 or I == 0:
        return out
    if g.dtype != x.dtype:
        g = g.to(x.dtype)
    if x.dim() == 2 or x.shape[1] == 1:
        x2 = x.reshape(x.shape[0], I).to(out.dtype)
        g2 = g.reshape(g.shape[0], O).to(out.dtype)
        if power == 2:
            out.addmm_(g2.square().t(), x2.square())
        else:
            out.addmm_(g2.abs().t(), x2.abs())
        return out
    if x.shape[1] == 0:
        return out
    impl = _sqgrad_op if compiling() else _sqgrad_impl
    if out.is_contiguous():
        impl(x, g, out, power)
    else:
        tmp = torch.zeros((O, I), dtype=out.dtype, device=out.device)
        impl(x, g, tmp, power)
        out += tmp
    return out


def _sqgrad_impl(x: torch.Tensor, g: torch.Tensor, out: torch.Tensor, power: int) -> None:
    name, kernel = choose_backend("sqgrad", x.device, x.dtype)
    if name not in ("torch", "cpp"):
        # These kernels index raw rows; the torch reference (bmm) and the cpp kernel (which
        # packs its panels from any strides) read strided views such as a transposed im2col.
        x, g = x.contiguous(), g.contiguous()
    kernel(x, g, out, power)


def _sqgrad_fake(x, g, out, power) -> None:
    return None


_sqgrad_op = register("fastcl::sqgrad", _sqgrad_impl, _sqgrad_fake, mutates_args=("out",))
