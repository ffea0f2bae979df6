r"""``F.group_norm``: per sample and group, ``x̂ = (x − μ)/√(σ² + ε)``; ``y = x̂ ⊙ w[c] + b[c]``.

Per sample: ``∇w ℓ_b[c] = Σ g[b,c,·] x̂[b,c,·]``, ``∇b ℓ_b[c] = Σ g[b,c,·]``, with the forward's
own statistics (``native_group_norm``). Samples on dim 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..._dtypes import acc_dtype
from .base import Call, Rule, arg
from .batch_norm import channel_affine


class GroupNormRule(Rule):
    functions = (F.group_norm,)
    has_forward = True

    def parse(self, args, kwargs):
        x = arg(args, kwargs, 0, "input")
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return None
        params = {"weight": arg(args, kwargs, 2, "weight"), "bias": arg(args, kwargs, 3, "bias")}
        return Call(x, params, {"groups": int(arg(args, kwargs, 1, "num_groups")), "eps": arg(args, kwargs, 4, "eps", 1e-5)})

    def sample_dim_ok(self, call, dim):
        return dim == 0

    def forward(self, call):
        x = call.x
        n, c = x.shape[:2]
        out, mean, rstd = torch.native_group_norm(
            x, call.params["weight"], call.params["bias"], n, c, math.prod(x.shape[2:]), call.meta["groups"], call.meta["eps"]
        )
        aligned = (n, call.meta["groups"]) + (1,) * (x.dim() - 2)
        return out, (mean.reshape(aligned), rstd.reshape(aligned))

    def input_grad(self, call, saved, g):
        x = call.x
        n, c = x.shape[:2]
        mean, rstd = (s.reshape(n, call.meta["groups"]) for s in saved)
        return torch.ops.aten.native_group_norm_backward(
            g, x, mean, rstd, call.params["weight"], n, c, math.prod(x.shape[2:]), call.meta["groups"], [True, False, False]
        )[0]

    def contributions(self, call, x, g, saved, slots):
        # x: [B, M, C, *spatial]; saved stats [B, M, G, 1, ...]
        acc = acc_dtype(x.dtype)
        groups = call.meta["groups"]
        b, m, c = x.shape[:3]
        grouped = x.to(acc).reshape(b, m, groups, -1)
        if saved:
            mean, rstd = (s.to(acc).reshape(b, m, groups, 1) for s in saved)
        else:
            var, mean = torch.var_mean(grouped, dim=3, unbiased=False, keepdim=True)
            rstd = torch.rsqrt(var + call.meta["eps"])
        xhat = ((grouped - mean) * rstd).reshape(x.shape)
        return channel_affine(g.to(acc), xhat, slots)
