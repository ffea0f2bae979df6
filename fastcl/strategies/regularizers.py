r"""Unweighted penalties toward the starting point (Li, Grandvalet & Davoine, ICML 2018, "L2-SP").

* L2-SP: ``(λ/2) · Σ (θ − θ*)²``   gradient ``λ (θ − θ*)``
* L1-SP: ``λ · Σ |θ − θ*|``         (sub)gradient ``λ · sign(θ − θ*)``

θ* are the trainable parameters at construction, refreshed by :meth:`consolidate`.
"""
from __future__ import annotations

import torch

from .base import AnchoredRegularizer

__all__ = ["L2SP", "L1SP"]


class _StartingPoint(AnchoredRegularizer):
    uses_importance = False

    def __init__(self, model, strength, *, storage_dtype=torch.float32):
        super().__init__(model, strength, storage_dtype=storage_dtype)
        self.consolidate()

    def consolidate(self, data=None) -> None:
        """Anchor to the current trainable parameters. ``data`` is ignored (uniform training loops)."""
        anchors = {name: self._store(p, p) for name, p in self._trainable().items()}
        self._commit(anchors, {}, 0.0)


class L2SP(_StartingPoint):
    """``(λ/2)·Σ(θ − θ*)²`` toward the weights at construction / last :meth:`consolidate`."""

    kind = "quadratic"


class L1SP(_StartingPoint):
    """``λ·Σ|θ − θ*|`` toward the weights at construction / last :meth:`consolidate`."""

    kind = "l1"
