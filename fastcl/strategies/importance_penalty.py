r"""Importance-weighted quadratic penalties and how their state grows over tasks.

Every importance method here (EWC, MAS, SI) uses::

    penalty(θ) = (λ/2) · Σ_k w_k (θ_k − a_k)²       gradient λ · w · (θ − a)

and differs only in where ``w`` comes from. Two ways to combine tasks t = 1..T:

* ``mode="separate"`` (Kirkpatrick et al. 2017, one penalty per task)::

      (λ/2) Σ_t Σ_k F_t,k (θ_k − θ*_t,k)²  =  (λ/2) [ Σ_k A_k (θ_k − m_k)² + C ]

  with ``A = Σ_t F_t``, ``m = Σ_t F_t θ*_t / A`` and ``C = Σ_t Σ_k F_t,k (m_k − θ*_t,k)²``.
  Memory and cost stay O(P) for any number of tasks and the *value* is exact. Adding a
  task with importance F and anchor θ* (parallel-axis theorem)::

      A' = A + F,   m' = (A m + F θ*) / A',   C' = C + Σ A (m − m')² + F (θ* − m')²

* ``mode="online"`` (Schwarz et al. 2018, online EWC): ``F ← decay · F + F_new`` and the
  anchor becomes the latest θ*; ``C = 0``.
"""
from __future__ import annotations

import torch

from .._names import named_parameters
from ..distributed import all_reduce_sum, local_tensor, shard_groups, shard_like
from .base import AnchoredRegularizer

__all__ = ["ImportanceRegularizer", "MODES"]

MODES = ("separate", "online")


class ImportanceRegularizer(AnchoredRegularizer):
    """An anchored quadratic penalty whose importance accumulates over consolidations."""

    kind = "quadratic"
    uses_importance = True

    def __init__(self, model, strength, *, mode: str = "separate", decay: float = 1.0, storage_dtype=torch.float32):
        super().__init__(model, strength, storage_dtype=storage_dtype)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (0.0 <= decay <= 1.0):
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        if mode == "separate" and decay != 1.0:
            raise ValueError("decay applies to mode='online' only; separate mode keeps every task at full weight")
        self.mode = mode
        self.decay = float(decay)

    def _merge(self, new_importance: dict[str, torch.Tensor]) -> None:
        """Fold one task's importance (``{name: tensor}``) and the current θ into the state.

        All new tensors are computed first and checked; only then is the state replaced,
        so an error leaves the regularizer exactly as it was.

        FSDP2 (DTensor parameters): everything is computed on this rank's shards (the new
        importance may be a DTensor or a full tensor, see :func:`fastcl.distributed.shard_like`);
        the separate-mode constant's per-shard increments are summed over the ranks, so
        the constant is global and identical everywhere. The finiteness/sign checks are
        agreed on by all ranks (one raises, all raise).
        """
        params = named_parameters(self.model)
        shards: dict[str, torch.Tensor] = {}  # this rank's part of each new importance
        sharded_groups: dict[tuple, tuple] = {}  # {group ids: groups} of the DTensor parameters
        problem = None
        for name, f in new_importance.items():
            p = params.get(name)
            if p is None:
                raise ValueError(f"importance given for {name!r}, which is not a parameter of the model")
            if tuple(f.shape) != tuple(p.shape):
                raise ValueError(f"importance for {name!r} has shape {tuple(f.shape)}, parameter has {tuple(p.shape)}")
            groups = shard_groups(p)
            if groups:
                sharded_groups.setdefault(tuple(id(g) for g in groups), groups)
            with torch.no_grad():
                shards[name] = local = shard_like(f.detach(), p)
            if problem is None and not torch.isfinite(local).all():
                problem = f"importance for {name!r} is not finite; state left unchanged"
            if problem is None and (local < 0).any():
                problem = f"importance for {name!r} has negative entries; state left unchanged"
        for groups in sharded_groups.values():  # one rank's bad shard must stop every rank
            if all_reduce_sum(int(problem is not None), groups) and problem is None:
                problem = "importance is not finite or has negative entries on another rank; state left unchanged"
        if problem is not None:
            raise ValueError(problem)
        missing = [n for n in self._anchors if n not in params]
        if missing:
            raise ValueError(f"consolidated parameters missing from the model: {missing}")

        anchors, importance = dict(self._anchors), dict(self._importance)
        constant = self._constant
        sharded_delta: dict[tuple, list] = {}  # per shard groups: Σ over this rank's shards of the C increments
        names = list(self._anchors) + [n for n in new_importance if n not in self._anchors]
        for name in names:
            p = params[name]
            acc = torch.float64 if p.dtype == torch.float64 else torch.float32
            with torch.no_grad():
                theta = local_tensor(p.detach()).to(acc)
            f_new = shards.get(name)
            f_new = None if f_new is None else f_new.to(device=theta.device, dtype=acc)
            if self.mode == "online":
                old = importance.get(name)
                f = f_new if old is None else self.decay * local_tensor(old).to(acc) + (0 if f_new is None else f_new)
                if f is None:
                    continue
                importance[name] = self._store(p, f)
                anchors[name] = self._store(p, theta)
                continue
            if f_new is None:  # parameter frozen for this task: F_t = 0 leaves A, m, C unchanged
                continue
            if name not in anchors:
                importance[name] = self._store(p, f_new)
                anchors[name] = self._store(p, theta)
                continue
            a_old = local_tensor(importance[name]).to(acc)
            m_old = local_tensor(anchors[name]).to(acc)
            a_new = a_old + f_new
            safe = torch.where(a_new > 0, a_new, torch.ones_like(a_new))
            m_new = torch.where(a_new > 0, (a_old * m_old + f_new * theta) / safe, theta)
            delta_c = (a_old * (m_old - m_new).square() + f_new * (theta - m_new).square()).sum(dtype=torch.float64)
            groups = shard_groups(p)
            if groups:
                sharded_delta.setdefault(tuple(id(g) for g in groups), [groups, torch.zeros_like(delta_c)])[1] += delta_c
            else:
                constant += 0.5 * float(delta_c)  # φ = d²/2, so C enters as C/2
            importance[name] = self._store(p, a_new)
            anchors[name] = self._store(p, m_new)
        for groups, delta_c in sharded_delta.values():  # one all-reduce per mesh, same order on every rank
            constant += 0.5 * float(all_reduce_sum(delta_c, groups))
        self._commit(anchors, importance, constant if self.mode == "separate" else 0.0)

    def _extra_state(self) -> dict:
        return {"mode": self.mode, "decay": self.decay}

    def _load_extra_state(self, state) -> None:
        if "mode" in state and state["mode"] != self.mode:
            raise ValueError(f"state_dict was saved in mode={state['mode']!r}, this {type(self).__name__} uses mode={self.mode!r}")
        self.decay = float(state.get("decay", self.decay))
