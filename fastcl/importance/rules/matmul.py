r"""``torch.addmm(b, x, W)`` and ``x @ W`` with the parameter ``W [I, O]`` on the right.

``y = β·b + α·x W`` (Hugging Face's GPT-2 ``Conv1D``; ``x @ W`` has ``α = 1`` and no ``b``).
Per sample: ``∇W ℓ_b = α Σ_t x[b,t]ᵀ g[b,t]`` (factored with the roles of ``x`` and ``g``
swapped, since ``W`` is stored ``[I, O]``), ``∇b ℓ_b = β Σ_t g[b,t]``.
"""
from __future__ import annotations

import torch

from ..._dtypes import acc_dtype
from ..contributions import Dense, Factored
from .base import Call, Rule, arg, flat_features, sum_middle


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class AddmmRule(Rule):
    functions = (torch.addmm, torch.Tensor.addmm)
    has_forward = True

    def parse(self, args, kwargs):
        b, x, w = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "mat1"), arg(args, kwargs, 2, "mat2")
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        if len(args) > 3 or set(kwargs) - {"input", "mat1", "mat2", "beta", "alpha"} or not (_number(beta) and _number(alpha)):
            return None
        if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor)):
            return None
        if b.dim() > 1 and any(s != 1 for s in b.shape[:-1]):
            return None
        return Call(x, {"weight": w, "bias": b}, {"alpha": alpha, "beta": beta})

    def sample_dim_ok(self, call, dim):
        return dim == 0

    def forward(self, call):
        m = call.meta
        return torch.addmm(call.params["bias"], call.x, call.params["weight"], beta=m["beta"], alpha=m["alpha"]), ()

    def input_grad(self, call, saved, g):
        grad = g.matmul(call.params["weight"].to(g.dtype).t())
        return grad if call.meta["alpha"] == 1 else grad * call.meta["alpha"]

    def contributions(self, call, x, g, saved, slots):
        return _contributions(x, g, slots, call.meta["alpha"], call.meta["beta"])


class MatmulRule(Rule):
    """``x @ W`` (``torch.matmul``, ``torch.mm`` and the ``@`` operator) with a 2-d parameter ``W`` on the right."""

    functions = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm)
    has_forward = True

    def parse(self, args, kwargs):
        if len(args) != 2 or kwargs:
            return None
        x, w = args
        if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)) or w.dim() != 2 or x.dim() < 2:
            return None
        if not isinstance(w, torch.nn.Parameter):
            return None
        return Call(x, {"weight": w}, {})

    def forward(self, call):
        return torch.matmul(call.x, call.params["weight"]), ()

    def input_grad(self, call, saved, g):
        return g.matmul(call.params["weight"].to(g.dtype).t())

    def contributions(self, call, x, g, saved, slots):
        return _contributions(x, g, slots, 1, 1)


def _contributions(x, g, slots, alpha, beta):
    x3, g3 = flat_features(x, 1), flat_features(g, 1)
    out = {}
    if "weight" in slots:
        out["weight"] = Factored(g3 if alpha == 1 else g3 * alpha, x3)  # ∇W = α xᵀ g: rows I, cols O
    if "bias" in slots:
        values = sum_middle(g3.to(acc_dtype(g3.dtype)))
        out["bias"] = Dense(values if beta == 1 else values * beta)
    return out
