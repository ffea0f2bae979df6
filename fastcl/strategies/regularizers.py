r"""Unweighted penalties toward the starting point (Li, Grandvalet & Davoine, ICML 2018, "L2-SP").

* L2-SP: ``(λ/2) · Σ (θ − θ*)²``   gradient ``λ (θ − θ*)``
* L1-SP: ``λ · Σ |θ − θ*|``         (sub)gradient ``λ · sign(θ − θ*)``

θ* are the trainable parameters at construction, refreshed by :meth:`consolidate`.
"""
from __future__ import annotations

import torch

from ..distributed import shard_groups
from .base import AnchoredRegularizer, agree, value_problem

__all__ = ["L2SP", "L1SP"]


class _StartingPoint(AnchoredRegularizer):
    uses_importance = False

    def __init__(self, model, strength, *, storage_dtype=torch.float32):
        super().__init__(model, strength, storage_dtype=storage_dtype)
        self.consolidate()

    def consolidate(self, data=None) -> None:
        """Anchor to the current trainable parameters. ``data`` is ignored (uniform training loops)."""
        trainable = self._trainable()
        if not trainable:
            raise ValueError(f"{type(self).__name__}: the model has no trainable parameter to anchor")
        anchors = {name: self._store(p, p) for name, p in trainable.items()}
        problem, groups = None, {}
        for name, a in anchors.items():
            problem = problem or value_problem(a, f"parameter {name!r} (in storage dtype {a.dtype})")
            g = shard_groups(a)
            if g:
                groups.setdefault(tuple(id(x) for x in g), g)
        agree(problem, groups.values())
        self._commit(anchors, {}, 0.0)


class L2SP(_StartingPoint):
    """``(λ/2)·Σ(θ − θ*)²`` toward the weights at construction / last :meth:`consolidate`."""

    penalty_form = "quadratic"


class L1SP(_StartingPoint):
    """``λ·Σ|θ − θ*|`` toward the weights at construction / last :meth:`consolidate`."""

    penalty_form = "l1"
