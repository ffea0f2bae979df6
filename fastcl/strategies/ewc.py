r"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017) and online EWC (Schwarz et al., 2018).

After task t, the diagonal Fisher ``F_t = E_x[(∂ log p(y|x)/∂θ)²]`` (mean over samples of
squared *per-sample* gradients; :func:`fastcl.importance.diagonal_fisher`) and the
weights θ*_t are stored. While training later tasks the loss gains::

    separate:  (λ/2) · Σ_t Σ_k F_t,k (θ_k − θ*_t,k)²
    online:    (λ/2) · Σ_k F̃_k (θ_k − θ*_k)²,   F̃ ← decay·F̃ + F_t,  θ* ← θ*_t

Separate mode is kept in O(P) memory with an exact value (see
:mod:`fastcl.strategies.importance_penalty`).
"""
from __future__ import annotations

import torch

from .._validate import check_int
from ..importance import diagonal_fisher
from .importance_penalty import ImportanceRegularizer

__all__ = ["EWC", "FISHER_KINDS"]

FISHER_KINDS = ("empirical", "true", "exact")


class EWC(ImportanceRegularizer):
    """EWC penalty ``(λ/2)·Σ F(θ − θ*)²`` over all consolidated tasks.

    Args:
        model: the network being retrained (DDP / torch.compile wrappers are fine).
        strength: λ ≥ 0.
        mode: ``"separate"`` (one term per task, exact, O(P)) or ``"online"``.
        decay: online mode's γ in ``F ← γ·F + F_new`` (must be 1.0 in separate mode).
        fisher: ``"empirical"`` (given labels), ``"true"`` (labels sampled from the model)
            or ``"exact"`` (expectation over all classes).
        storage_dtype: dtype of stored anchors/Fisher (``torch.bfloat16`` halves memory).
        top_k: with ``fisher="exact"``, keep only the k most probable classes.

    Usage::

        ewc = fastcl.EWC(model, strength=100.0)
        for task in tasks:
            for x, y in task.train_loader:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y) + ewc.penalty()   # 0 on the first task
                loss.backward()
                opt.step()
            ewc.consolidate(task.train_loader)
    """

    state_keys = ImportanceRegularizer.state_keys + ("fisher",)

    def __init__(self, model, strength, mode="separate", decay=1.0, fisher="empirical", *, storage_dtype=torch.float32, top_k=None):
        super().__init__(model, strength, mode=mode, decay=decay, storage_dtype=storage_dtype)
        if fisher not in FISHER_KINDS:
            raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {fisher!r}")
        if top_k is not None:
            if fisher != "exact":
                raise ValueError(f'top_k applies to fisher="exact" only, got fisher={fisher!r}')
            top_k = check_int(top_k, "top_k", low=1)
        self.fisher_kind = fisher
        self.top_k = top_k

    @property
    def consolidation_input(self) -> str:
        """``"loss"`` for the empirical Fisher (per-sample losses of the targets), else ``"outputs"`` (logits only)."""
        return "loss" if self.fisher_kind == "empirical" else "outputs"

    def consolidate(self, data, *, loss_fn=None, max_samples=None, forward=None, verbose=None, **fisher_options) -> None:
        """Compute the Fisher over ``data`` (iterable of ``(inputs, targets)`` batches) and fold it in.

        ``loss_fn(outputs, targets)`` must return per-sample losses (default: cross-entropy
        on logits). ``max_samples``, ``forward``, ``verbose`` and any other keyword go to
        :func:`fastcl.diagonal_fisher`. On any error (empty data, non-finite loss or
        Fisher; a batch the model cannot run is a ``ValueError`` naming ``data`` and the
        batch) nothing changes.
        """
        if self.top_k is not None:
            fisher_options.setdefault("top_k", self.top_k)
        fisher = diagonal_fisher(self.model, data, loss_fn=loss_fn, kind=self.fisher_kind, max_samples=max_samples,
                                 forward=forward, verbose=verbose, **fisher_options)
        self.fold(fisher)

    @property
    def fisher(self) -> dict[str, torch.Tensor]:
        """``{name: F}``: the consolidated importance (``A = ΣF_t`` in separate mode, ``F̃`` online)."""
        return self.importance

    def state_dict(self) -> dict:
        return {**super().state_dict(), "fisher": self.fisher_kind}

    def _parse_state(self, state) -> dict:
        new = super()._parse_state(state)
        if state["fisher"] not in FISHER_KINDS:  # informative only: this EWC keeps its own kind
            raise ValueError(f"state_dict['fisher'] must be one of {FISHER_KINDS}, got {state.get('fisher')!r}")
        return new
