r"""Memory Aware Synapses (Aljundi et al., ECCV 2018).

Importance is the mean over samples of the absolute per-sample gradient of the squared
L2 norm of the model's output, ``Ω = E_x |∂‖f(x)‖²₂ / ∂θ|`` — unsupervised, so any
data works (targets are ignored). Importances add up over tasks (``Ω ← decay·Ω + Ω_new``)
and the anchor becomes the latest weights. Penalty: ``(λ/2)·Σ Ω(θ − θ*)²`` (the paper's
λ equals this λ/2).
"""
from __future__ import annotations

import torch

from ..importance import mas_importance
from .importance_penalty import ImportanceRegularizer

__all__ = ["MAS"]


class MAS(ImportanceRegularizer):
    """MAS penalty ``(λ/2)·Σ Ω(θ − θ*)²`` with ``Ω`` from :func:`fastcl.importance.mas_importance`."""

    consolidation_input = "outputs"

    def __init__(self, model, strength, decay=1.0, *, storage_dtype=torch.float32):
        super().__init__(model, strength, mode="online", decay=decay, storage_dtype=storage_dtype)

    def consolidate(self, data, *, max_samples=None, forward=None, verbose=None, **options) -> None:
        """Estimate Ω over ``data`` (batches of inputs or ``(inputs, targets)``) and fold it in.

        ``max_samples``, ``forward``, ``verbose`` and any other keyword go to
        :func:`fastcl.importance.mas_importance`. On any error nothing changes (a batch the
        model cannot run is a ``ValueError`` naming ``data`` and the batch).
        """
        self.fold(mas_importance(self.model, data, max_samples=max_samples, forward=forward, verbose=verbose, **options))
