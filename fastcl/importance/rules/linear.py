r"""``F.linear``: ``y = x Wᵀ + b`` with ``x [*, I]``.

Per sample: ``∇W ℓ_b = Σ_t g[b,t]ᵀ x[b,t]`` (factored, never materialised),
``∇b ℓ_b = Σ_t g[b,t]``; ``t`` runs over every leading position of the sample's input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._dtypes import acc_dtype
from ..contributions import Dense, Factored
from .base import Call, Rule, flat_features, leading, sum_middle


class LinearRule(Rule):
    functions = (F.linear,)
    has_forward = True

    def parse(self, args, kwargs):
        x, w, b = leading(args, kwargs, "input", "weight", "bias")
        if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or w.dim() != 2:
            return None
        return Call(x, {"weight": w, "bias": b}, {})

    def forward(self, call):
        return F.linear(call.x, call.params["weight"], call.params["bias"]), ()

    def input_grad(self, call, saved, g):
        return g.matmul(call.params["weight"].to(g.dtype))

    def contributions(self, call, x, g, saved, slots):
        x3, g3 = flat_features(x, 1), flat_features(g, 1)
        weight = Factored(x3, g3)
        out = {}
        if "weight" in slots:
            out["weight"] = weight
        if "bias" in slots:
            out["bias"] = Dense(sum_middle(g3.to(acc_dtype(g3.dtype))), of=weight)  # shares |g|^p with the weight
        return out
