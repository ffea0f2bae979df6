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

from collections.abc import Mapping

import torch

from .._names import named_parameters
from .._validate import check_real
from ..distributed import all_reduce_sum, local_tensor, shard_groups, shard_like
from .base import AnchoredRegularizer, agree, value_problem

__all__ = ["ImportanceRegularizer", "MODES"]

MODES = ("separate", "online")


class ImportanceRegularizer(AnchoredRegularizer):
    """An anchored quadratic penalty whose importance accumulates over consolidations."""

    penalty_form = "quadratic"
    uses_importance = True
    state_keys = AnchoredRegularizer.state_keys + ("mode", "decay")

    def __init__(self, model, strength, *, mode: str = "separate", decay: float = 1.0, storage_dtype=torch.float32):
        super().__init__(model, strength, storage_dtype=storage_dtype)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.decay = _check_decay(decay, mode)

    def fold(self, importance: Mapping[str, torch.Tensor]) -> None:
        """Fold one task's importance (``{name: tensor}``) and the current θ into the state.

        ``importance`` maps canonical parameter names (as :meth:`state_dict` uses them) to
        non-negative finite tensors of the parameters' shapes; parameters it does not name
        keep their state (separate mode) or only decay (online mode). This is what
        ``consolidate`` does after computing the importance, for importance computed
        elsewhere. All new tensors are computed first and checked; only then is the state
        replaced, so an error leaves the regularizer exactly as it was.

        FSDP2 (DTensor parameters): everything is computed on this rank's shards (the new
        importance may be a DTensor or a full tensor, see :func:`fastcl.distributed.shard_like`);
        the separate-mode constant's per-shard increments are summed over the ranks, so
        the constant is global and identical everywhere. The finiteness/sign checks are
        agreed on by all ranks (one raises, all raise).
        """
        if not isinstance(importance, Mapping):
            raise TypeError(f"importance must be a mapping {{parameter name: tensor}}, got {type(importance).__name__}")
        if not importance:
            raise ValueError("importance is empty: no parameter to fold in (were all parameters frozen?)")
        params = named_parameters(self.model)
        shards: dict[str, torch.Tensor] = {}  # this rank's part of each new importance
        sharded_groups: dict[tuple, tuple] = {}  # {group ids: groups} of the DTensor parameters
        problem = None
        for name, f in importance.items():
            p = params.get(name)
            if p is None:
                raise ValueError(f"importance given for {name!r}, which is not a parameter of the model")
            if not isinstance(f, torch.Tensor) or not f.is_floating_point():
                got = f"a {f.dtype} tensor" if isinstance(f, torch.Tensor) else type(f).__name__
                raise TypeError(f"importance[{name!r}] must be a floating-point tensor, got {got}")
            if tuple(f.shape) != tuple(p.shape):
                raise ValueError(f"importance for {name!r} has shape {tuple(f.shape)}, parameter has {tuple(p.shape)}")
            if name in self._anchors and tuple(self._anchors[name].shape) != tuple(p.shape):
                raise ValueError(
                    f"parameter {name!r} now has shape {tuple(p.shape)} but was consolidated with "
                    f"{tuple(self._anchors[name].shape)}; state left unchanged"
                )
            groups = shard_groups(p)
            if groups:
                sharded_groups.setdefault(tuple(id(g) for g in groups), groups)
            with torch.no_grad():
                shards[name] = local = shard_like(f.detach(), p)
            problem = problem or value_problem(local, f"importance for {name!r}", nonnegative=True)
        agree(problem, sharded_groups.values())
        missing = [n for n in self._anchors if n not in params]
        if missing:
            raise ValueError(f"consolidated parameters missing from the model: {missing}")

        anchors, stored = dict(self._anchors), dict(self._importance)
        constant = self._constant
        sharded_delta: dict[tuple, list] = {}  # per shard groups: Σ over this rank's shards of the C increments
        names = list(self._anchors) + [n for n in shards if n not in self._anchors]
        for name in names:
            p = params[name]
            acc = torch.float64 if p.dtype == torch.float64 else torch.float32
            with torch.no_grad():
                theta = local_tensor(p.detach()).to(acc)
            f_new = shards.get(name)
            f_new = None if f_new is None else f_new.to(device=theta.device, dtype=acc)
            if self.mode == "online":
                old = stored.get(name)
                f = f_new if old is None else self.decay * local_tensor(old).to(acc) + (0 if f_new is None else f_new)
                if f is None:
                    continue
                stored[name] = self._store(p, f)
                anchors[name] = self._store(p, theta)
                continue
            if f_new is None:  # parameter frozen for this task: F_t = 0 leaves A, m, C unchanged
                continue
            if name not in anchors:
                stored[name] = self._store(p, f_new)
                anchors[name] = self._store(p, theta)
                continue
            a_old = local_tensor(stored[name]).to(acc)
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
            stored[name] = self._store(p, a_new)
            anchors[name] = self._store(p, m_new)
        for groups, delta_c in sharded_delta.values():  # one all-reduce per mesh, same order on every rank
            constant += 0.5 * float(all_reduce_sum(delta_c, groups))
        problem = None  # storage in float32/bfloat16 may overflow what float64 held
        for name in names:
            if stored.get(name) is not self._importance.get(name):
                problem = problem or value_problem(stored[name], f"importance for {name!r} in storage dtype {self.storage_dtype}")
                problem = problem or value_problem(anchors[name], f"anchor for {name!r} in storage dtype {self.storage_dtype}")
        agree(problem, sharded_groups.values())
        self._commit(anchors, stored, constant if self.mode == "separate" else 0.0)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mode": self.mode, "decay": self.decay}

    def _parse_state(self, state) -> dict:
        new = super()._parse_state(state)
        if state["mode"] != self.mode:
            raise ValueError(f"state_dict was saved in mode={state['mode']!r}, this {type(self).__name__} uses mode={self.mode!r}")
        new["decay"] = _check_decay(state["decay"], self.mode, "state_dict['decay']")
        return new


def _check_decay(decay, mode: str, name: str = "decay") -> float:
    decay = check_real(decay, name, low=0.0, high=1.0)
    if mode == "separate" and decay != 1.0:
        raise ValueError(f"{name}={decay!r}: decay applies to mode='online' only; separate mode keeps every task at full weight")
    return decay
