r"""``F.batch_norm`` in eval mode: ``y = (x − μ_run)/√(σ²_run + ε) ⊙ w[c] + b[c]``, channels on dim 1.

Per sample: ``∇w ℓ_b[c] = Σ g[b,c,·] x̂[b,c,·]``, ``∇b ℓ_b[c] = Σ g[b,c,·]``. Batch statistics
(training mode, or no running statistics) couple the samples; the engine refuses them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._dtypes import acc_dtype
from ..contributions import Dense
from .base import Call, Rule, arg, leading


class BatchNormRule(Rule):
    functions = (F.batch_norm,)
    has_forward = True

    def parse(self, args, kwargs):
        x, mean, var = leading(args, kwargs, "input", "running_mean", "running_var")
        if arg(args, kwargs, 5, "training", False) or mean is None or var is None:
            return "batch norm with batch statistics couples the samples"
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return None
        params = {"weight": arg(args, kwargs, 3, "weight"), "bias": arg(args, kwargs, 4, "bias")}
        return Call(x, params, {"mean": mean.detach(), "var": var.detach(), "eps": arg(args, kwargs, 7, "eps", 1e-5)})

    def sample_dim_ok(self, call, dim):
        return dim != 1

    def forward(self, call):
        m = call.meta
        return F.batch_norm(call.x, m["mean"], m["var"], call.params["weight"], call.params["bias"], False, 0.0, m["eps"]), ()

    def _scale(self, call, dtype):
        m = call.meta
        scale = torch.rsqrt(m["var"].to(dtype) + m["eps"])
        w = call.params["weight"]
        return scale if w is None else scale * w.to(dtype)

    def input_grad(self, call, saved, g):
        shape = (1, -1) + (1,) * (g.dim() - 2)
        return g * self._scale(call, g.dtype).reshape(shape)

    def contributions(self, call, x, g, saved, slots):
        # x: [B, *x.shape with the sample dim reduced]: the channel dim is dim 2
        acc = acc_dtype(x.dtype)
        m = call.meta
        shape = (1, 1, -1) + (1,) * (x.dim() - 3)
        xhat = (x.to(acc) - m["mean"].to(acc).reshape(shape)) * torch.rsqrt(m["var"].to(acc).reshape(shape) + m["eps"])
        return channel_affine(g.to(acc), xhat, slots)


def channel_affine(g, xhat, slots):
    """Per-channel weight ``Σ g·x̂`` and bias ``Σ g`` per sample; channels on dim 2 of ``[B, M, C, *]``."""
    b, c = g.shape[0], g.shape[2]
    out = {}
    if "weight" in slots:
        out["weight"] = Dense((g * xhat).transpose(1, 2).reshape(b, c, -1).sum(2))
    if "bias" in slots:
        out["bias"] = Dense(g.transpose(1, 2).reshape(b, c, -1).sum(2))
    return out
