r"""``F.embedding``: ``y[t] = W[ids[t]]``.

Per sample: row ``r`` of ``∇W ℓ_b`` is ``Σ_{t: ids[b,t] = r} g[b,t]`` (the padding row gets
none): a :class:`~fastcl.importance.contributions.Sparse` contribution, repeated tokens
summed before the power. ``max_norm`` (renormalises the table in place during the forward)
and ``scale_grad_by_freq`` (couples the samples) are refused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._dtypes import acc_dtype
from ..contributions import coalesce
from .base import Call, Rule, arg


class EmbeddingRule(Rule):
    functions = (F.embedding,)
    has_forward = True

    def parse(self, args, kwargs):
        ids, w = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight")
        if arg(args, kwargs, 3, "max_norm") is not None:
            return "embedding with max_norm renormalises the table in place"
        if arg(args, kwargs, 5, "scale_grad_by_freq", False):
            return "embedding with scale_grad_by_freq couples the samples of a batch"
        if not isinstance(ids, torch.Tensor) or not isinstance(w, torch.Tensor) or w.dim() != 2:
            return None
        padding_idx = arg(args, kwargs, 2, "padding_idx")
        if padding_idx is not None and padding_idx < 0:
            padding_idx += w.shape[0]
        return Call(ids, {"weight": w}, {"padding_idx": padding_idx, "sparse": bool(arg(args, kwargs, 6, "sparse", False))})

    def sample_dim_ok(self, call, dim):
        return True

    def forward(self, call):
        return F.embedding(call.x, call.params["weight"], call.meta["padding_idx"], sparse=call.meta["sparse"]), ()

    def input_grad(self, call, saved, g):
        return None  # integer indices

    def _lookups(self, call, x):
        """``(sample, row, keep)`` of every lookup of the per-sample ids ``x [B, ...]`` (``keep``: not padding)."""
        batch = x.shape[0]
        ids = x.reshape(batch, -1)
        sample = torch.arange(batch, device=ids.device).repeat_interleave(ids.shape[1])
        ids = ids.reshape(-1).long()
        keep = None if call.meta["padding_idx"] is None else ids != call.meta["padding_idx"]
        return sample, ids, keep

    def touched(self, call, x) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(sample, row)`` pairs the per-sample gradients have rows for, sorted as :func:`coalesce` sorts them."""
        sample, ids, keep = self._lookups(call, x)
        if keep is not None:
            sample, ids = sample[keep], ids[keep]
        num_rows = call.params["weight"].shape[0]
        key = torch.unique(sample * num_rows + ids)
        return key // num_rows, key % num_rows

    def contributions(self, call, x, g, saved, slots):
        if "weight" not in slots:
            return {}
        sample, ids, keep = self._lookups(call, x)
        values = g.reshape(-1, g.shape[-1]).to(acc_dtype(g.dtype))
        if keep is not None:
            sample, ids, values = sample[keep], ids[keep], values[keep]
        return {"weight": coalesce(sample, ids, values, call.params["weight"].shape[0])}
