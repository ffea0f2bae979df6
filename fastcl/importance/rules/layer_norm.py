r"""``F.layer_norm``: ``y = x̂ ⊙ w + b`` with ``x̂ = (x − μ)/√(σ² + ε)`` over the normalised dims.

Per sample: ``∇w ℓ_b = Σ_t g[b,t] ⊙ x̂[b,t]``, ``∇b ℓ_b = Σ_t g[b,t]``. ``x̂`` comes from the
forward's own statistics (``native_layer_norm``'s mean and 1/σ), never recomputed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._dtypes import acc_dtype
from ..contributions import Dense
from .base import Call, Rule, arg, ntuple, sum_middle


class LayerNormRule(Rule):
    functions = (F.layer_norm,)
    has_forward = True

    def parse(self, args, kwargs):
        x, shape = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "normalized_shape")
        if not isinstance(x, torch.Tensor):
            return None
        shape = tuple(ntuple(shape, 1))
        params = {"weight": arg(args, kwargs, 2, "weight"), "bias": arg(args, kwargs, 3, "bias")}
        return Call(x, params, {"shape": shape, "eps": arg(args, kwargs, 4, "eps", 1e-5)})

    def sample_dim_ok(self, call, dim):
        return dim < call.x.dim() - len(call.meta["shape"])

    def forward(self, call):
        out, mean, rstd = torch.native_layer_norm(
            call.x, call.meta["shape"], call.params["weight"], call.params["bias"], call.meta["eps"]
        )
        return out, (mean, rstd)

    def input_grad(self, call, saved, g):
        mean, rstd = saved
        w, b = call.params["weight"], call.params["bias"]
        return torch.ops.aten.native_layer_norm_backward(
            g, call.x, list(call.meta["shape"]), mean, rstd, w, b, [True, False, False]
        )[0]

    def contributions(self, call, x, g, saved, slots):
        acc = acc_dtype(x.dtype)
        n = len(call.meta["shape"])
        if saved:
            mean, rstd = saved
            xhat = (x.to(acc) - mean.to(acc)) * rstd.to(acc)
        else:
            dims = tuple(range(x.dim() - n, x.dim()))
            var, mean = torch.var_mean(x.to(acc), dim=dims, unbiased=False, keepdim=True)
            xhat = (x.to(acc) - mean) * torch.rsqrt(var + call.meta["eps"])
        return norm_affine(g.to(acc), xhat, n, slots)


def norm_affine(g, xhat, n_feat, slots):
    """Weight ``Σ_t g·x̂`` and bias ``Σ_t g`` per sample, ``[B, *, *feat] -> [B, numel(feat)]``."""
    out = {}
    batch = g.shape[0]
    if "weight" in slots:
        prod = g * xhat
        out["weight"] = Dense(sum_middle(prod.reshape(batch, -1, *prod.shape[prod.dim() - n_feat:])))
    if "bias" in slots:
        out["bias"] = Dense(sum_middle(g.reshape(batch, -1, *g.shape[g.dim() - n_feat:])))
    return out
