r"""``F.rms_norm``: ``y = x̂ ⊙ w`` with ``x̂ = x / √(mean(x²) + ε)`` over the normalised dims.

Per sample: ``∇w ℓ_b = Σ_t g[b,t] ⊙ x̂[b,t]``, with ``1/√(mean(x²) + ε)`` from the forward.
(Hugging Face's ``RMSNorm`` modules multiply by their weight in Python: that product is
followed to where it meets the batch like any elementwise use of a parameter.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._dtypes import acc_dtype
from .base import Call, Rule, arg, ntuple
from .layer_norm import norm_affine

_FUSED = getattr(torch, "_fused_rms_norm", None)


class RMSNormRule(Rule):
    functions = (F.rms_norm,) if hasattr(F, "rms_norm") else ()
    has_forward = True

    def parse(self, args, kwargs):
        x, shape = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "normalized_shape")
        if not isinstance(x, torch.Tensor):
            return None
        eps = arg(args, kwargs, 3, "eps")
        if eps is None:
            eps = torch.finfo(x.dtype).eps
        return Call(x, {"weight": arg(args, kwargs, 2, "weight")}, {"shape": tuple(ntuple(shape, 1)), "eps": eps})

    def sample_dim_ok(self, call, dim):
        return dim < call.x.dim() - len(call.meta["shape"])

    def _dims(self, call):
        return tuple(range(call.x.dim() - len(call.meta["shape"]), call.x.dim()))

    def forward(self, call):
        if _FUSED is not None:
            out, rstd = _FUSED(call.x, list(call.meta["shape"]), call.params["weight"], call.meta["eps"])
            return out, (rstd.reshape(call.x.shape[: call.x.dim() - len(call.meta["shape"])] + (1,) * len(call.meta["shape"])),)
        out = F.rms_norm(call.x, call.meta["shape"], call.params["weight"], call.meta["eps"])
        acc = acc_dtype(call.x.dtype)
        rstd = torch.rsqrt(call.x.to(acc).square().mean(self._dims(call), keepdim=True) + call.meta["eps"])
        return out, (rstd,)

    def input_grad(self, call, saved, g):
        (rstd,) = saved
        acc = acc_dtype(g.dtype)
        x, w = call.x.to(acc), call.params["weight"]
        xhat = x * rstd.to(acc)
        gw = g.to(acc) if w is None else g.to(acc) * w.to(acc)
        dot = (gw * xhat).mean(self._dims(call), keepdim=True)
        return (rstd.to(acc) * (gw - xhat * dot)).to(g.dtype)

    def contributions(self, call, x, g, saved, slots):
        acc = acc_dtype(x.dtype)
        if saved:
            xhat = x.to(acc) * saved[0].to(acc)
        else:
            n = len(call.meta["shape"])
            dims = tuple(range(x.dim() - n, x.dim()))
            xhat = x.to(acc) * torch.rsqrt(x.to(acc).square().mean(dims, keepdim=True) + call.meta["eps"])
        return norm_affine(g.to(acc), xhat, len(call.meta["shape"]), slots)
