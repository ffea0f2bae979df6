r"""The shared core of every weight-space regularizer: an anchored penalty.

All of EWC, online EWC, SI, MAS, L2-SP and L1-SP are one formula::

    penalty(θ) = λ · ( Σ_k w_k · φ(θ_k − a_k)  +  c )

with φ(d) = d²/2 (quadratic) or |d| (L1), importance ``w`` (1 for L2-SP/L1-SP), anchors
``a`` and a constant ``c`` that makes the value exact for separate-mode EWC (see
:meth:`AnchoredRegularizer._merge_separate`). ``c`` does not depend on θ, so it has no
gradient. The strategy classes only decide how ``w``, ``a`` and ``c`` are updated at
consolidation; the math runs in :func:`fastcl.ops.anchored_penalty` /
:func:`fastcl.ops.penalty` on whatever backend the dispatcher picks.

Coverage: a regularizer covers the parameters that were trainable
(``requires_grad=True``) when it was consolidated. Parameters added to the model later
(a new head) are not covered; covered parameters frozen later still count in the value
(they do not move) but receive no gradient from :meth:`add_penalty_grad_`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .._names import named_parameters, named_trainable_parameters
from ..distributed import all_reduce_sum, as_dtensor_like, is_dtensor, local_tensor, shard_groups, shard_like
from ..ops import anchored_penalty
from ..ops import penalty as fused_penalty

__all__ = ["AnchoredRegularizer", "check_strength"]


def check_strength(value: Any, name: str = "strength") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class AnchoredRegularizer:
    """Holds anchors, importance and a constant per covered parameter; evaluates the penalty.

    Subclasses set ``kind`` ("quadratic" or "l1") and ``uses_importance`` and call
    :meth:`_commit` with fully computed new state (so a failed consolidation changes nothing).
    """

    kind = "quadratic"
    uses_importance = True

    def __init__(self, model: torch.nn.Module, strength: float, *, storage_dtype: torch.dtype = torch.float32):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if storage_dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"storage_dtype must be torch.float32 or torch.bfloat16, got {storage_dtype}")
        self.model = model
        self.strength = check_strength(strength)
        self.storage_dtype = storage_dtype
        self._anchors: dict[str, torch.Tensor] = {}
        self._importance: dict[str, torch.Tensor] = {}
        self._constant = 0.0  # c, in the units of Σ w·φ
        self.num_consolidations = 0
        self._cache_key: tuple | None = None
        self._cache: tuple | None = None

    # ------------------------------------------------------------------ state helpers
    def _storage_dtype_for(self, p: torch.Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else self.storage_dtype

    def _store(self, p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """A stored copy of ``value`` in the storage dtype on ``p``'s device, never aliasing ``p``.

        FSDP2 (``p`` a DTensor): a DTensor with ``p``'s mesh and placements that holds only
        this rank's shard; ``value`` may be a DTensor, a full tensor of the global shape or
        the local shard. A DTensor ``value`` for a plain ``p`` is gathered (a collective).
        """
        if is_dtensor(p):
            known = self.__dict__.setdefault("_sharded_ids", set())
            if id(p) not in known:  # remember {name: sharded parameter} for _resolve
                self._sharded_params = {n: q for n, q in named_parameters(self.model).items() if is_dtensor(q)}
                known.update(id(q) for q in self._sharded_params.values())
            with torch.no_grad():
                return as_dtensor_like(self._store(local_tensor(p), shard_like(value.detach(), p)), p)
        if is_dtensor(value):
            value = value.full_tensor()
        out = value.detach().to(device=p.device, dtype=self._storage_dtype_for(p)).contiguous()
        if out.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
            out = out.clone()  # an anchor sharing the parameter's memory would make the penalty always 0
        return out

    @property
    def consolidated(self) -> bool:
        return bool(self._anchors)

    @property
    def covered_names(self) -> list[str]:
        """Canonical names of the parameters this regularizer penalizes."""
        return list(self._anchors)

    @property
    def anchors(self) -> dict[str, torch.Tensor]:
        """``{name: θ*}`` (read-only views of the stored anchors)."""
        return dict(self._anchors)

    @property
    def importance(self) -> dict[str, torch.Tensor]:
        """``{name: w}`` of the consolidated importance (empty for unweighted penalties)."""
        return dict(self._importance)

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return dict(named_trainable_parameters(self.model))

    def _commit(self, anchors: dict, importance: dict, constant: float) -> None:
        if not math.isfinite(constant):
            raise ValueError("consolidation produced a non-finite penalty constant; state left unchanged")
        self._anchors, self._importance, self._constant = anchors, importance, float(constant)
        self.num_consolidations += 1
        self._cache_key = None

    # ------------------------------------------------------------------ evaluation
    def _resolve(self):
        """Lists (names, params, anchors, weights), moving stored state to the parameters' devices.

        Under FSDP2 the entries are DTensors (take their local shards to compute). Also sets
        ``self._partition``: ``[(groups, indices)]``, the positions whose parameters are
        split over the same process groups (``()`` for plain tensors): a value summed over
        their local shards is summed over ``groups`` to be global. Without DTensors it is
        ``[((), None)]``, ``None`` meaning every position (the lists are used as they are).
        """
        params = named_parameters(self.model)
        key = tuple((n, id(params.get(n)), params[n].device if n in params else None) for n in self._anchors)
        if key == self._cache_key:
            return self._cache
        names, plist, alist, wlist = [], [], [], []
        for name, anchor in self._anchors.items():
            p = params.get(name)
            if p is None:
                raise ValueError(f"parameter {name!r} was consolidated but is no longer in the model")
            if is_dtensor(anchor) and not is_dtensor(p):
                # FSDP2 leaves the root module's parameters unsharded from forward to backward and
                # registers the unsharded (full, plain) ones meanwhile; the penalty always uses the
                # sharded parameter, whose gradient FSDP accumulates with its reduce-scattered one.
                p = self.__dict__.get("_sharded_params", {}).get(name)
                if p is None or p.shape != anchor.shape:
                    raise ValueError(f"parameter {name!r} is not sharded (DTensor) but its stored state is")
            if p.shape != anchor.shape:
                raise ValueError(f"parameter {name!r} has shape {tuple(p.shape)} but its anchor has {tuple(anchor.shape)}")
            if anchor.device != p.device:
                self._anchors[name] = anchor = anchor.to(p.device)
                if name in self._importance:
                    self._importance[name] = self._importance[name].to(p.device)
            names.append(name)
            plist.append(p)
            alist.append(anchor)
            if self.uses_importance:
                wlist.append(self._importance[name])
        partition: dict[tuple, tuple] = {}
        for i, p in enumerate(plist):
            groups = shard_groups(p)
            partition.setdefault(tuple(id(g) for g in groups), (groups, []))[1].append(i)
        self._partition = list(partition.values()) if any(g for g, _ in partition.values()) else [((), None)]
        self._cache_key = key
        self._cache = (names, plist, alist, wlist if self.uses_importance else None)
        return self._cache

    def _zero(self) -> torch.Tensor:
        p = next(iter(self.model.parameters()), None)
        return torch.zeros((), dtype=torch.float32, device=None if p is None else p.device)

    def penalty(self) -> torch.Tensor:
        """The penalty as a differentiable 0-dim tensor (exactly 0 before any consolidation).

        FSDP2: the value is global (identical on all ranks): the local shards' term ``v_r``
        is summed over the ranks as ``v_r + (Σ_r v_r − v_r).detach()``, so the gradient
        reaching each local shard is that of its own term, the exact gradient of the global
        penalty with respect to that shard.
        """
        if not self.consolidated or self.strength == 0.0:
            return self._zero()
        _, params, anchors, weights = self._resolve()
        value = None
        for groups, idx in self._partition:
            if idx is None:
                part = anchored_penalty(params, anchors, weights, scale=self.strength, kind=self.kind)
            else:
                with torch.no_grad():
                    local_anchors = [local_tensor(anchors[i]) for i in idx]
                    local_weights = None if weights is None else [local_tensor(weights[i]) for i in idx]
                part = anchored_penalty([local_tensor(params[i]) for i in idx], local_anchors, local_weights,
                                        scale=self.strength, kind=self.kind)
            if groups:
                total = all_reduce_sum(part.detach().clone(), groups)
                part = part + (total - part.detach())
            value = part if value is None else value + part
        if self._constant:
            value = value + self.strength * self._constant
        return value

    def add_penalty_grad_(self) -> torch.Tensor:
        """Fast path: add ∂penalty/∂θ straight into ``p.grad`` and return the penalty value.

        DDP: call it after ``backward()`` (gradients already averaged); every rank adds the
        same term. FSDP2: each rank writes its shard's gradient into the local tensor of
        ``p.grad`` (a DTensor) and the returned value is global (summed over the shards).

        Call after ``loss.backward()`` (task loss only) and before ``optimizer.step()``:
        one fused pass reads θ, a, w and ``p.grad`` and writes ``p.grad`` — no autograd
        graph, no temporaries. Parameters whose ``.grad`` is ``None`` get one allocated.
        Frozen covered parameters count in the value but receive no gradient.
        """
        if not self.consolidated or self.strength == 0.0:
            return self._zero()
        _, params, anchors, weights = self._resolve()
        value = torch.zeros((), dtype=torch.float32, device=params[0].device)
        with torch.no_grad():  # local_tensor(DTensor) is then the DTensor's own local tensor: writes reach p.grad
            for groups, idx in self._partition:
                pick = lambda seq, sel: None if seq is None else [local_tensor(seq[i]) for i in sel]  # noqa: E731
                idx = range(len(params)) if idx is None else idx
                live = [i for i in idx if params[i].requires_grad]
                frozen = [i for i in idx if not params[i].requires_grad]
                part = torch.zeros_like(value)
                if live:
                    for i in live:
                        if params[i].grad is None:
                            params[i].grad = torch.zeros_like(params[i])  # a DTensor like p under FSDP2
                    grads = [local_tensor(params[i].grad) for i in live]
                    part = part + fused_penalty(pick(params, live), pick(anchors, live), pick(weights, live), scale=self.strength, kind=self.kind, grads=grads)
                if frozen:
                    part = part + fused_penalty(pick(params, frozen), pick(anchors, frozen), pick(weights, frozen), scale=self.strength, kind=self.kind)
                value = value + all_reduce_sum(part, groups)  # FSDP2: the local shards' sum over ranks
        self._after_grad_added(1.0)
        return value + self.strength * self._constant

    def _after_grad_added(self, grad_scale: float) -> None:
        """Hook for SI, which must know when the penalty's gradient entered ``.grad``."""

    # ------------------------------------------------------------------ persistence
    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: Mapping) -> None:
        pass

    def state_dict(self) -> dict:
        """Everything needed to resume: strength, anchors, importance, constant and subclass state."""
        return {
            "type": type(self).__name__,
            "strength": self.strength,
            "kind": self.kind,
            "num_consolidations": self.num_consolidations,
            "constant": self._constant,
            "anchors": {n: t.clone() for n, t in self._anchors.items()},
            "importance": {n: t.clone() for n, t in self._importance.items()},
            **self._extra_state(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore from :meth:`state_dict`; names and shapes must match ``model.named_parameters()``.

        FSDP2: :meth:`state_dict` holds DTensors (each rank's shard plus mesh and placements:
        save it with ``torch.distributed.checkpoint``, or per rank). Loading accepts
        DTensors (redistributed if their placements differ) or full tensors (each rank keeps
        its shard), so a single-process state loads into a sharded model and, with
        ``full_tensor()`` gathering on every rank, the other way round.
        """
        if state.get("type") not in (None, type(self).__name__):
            raise ValueError(f"state_dict is for {state.get('type')}, not {type(self).__name__}")
        params = named_parameters(self.model)
        anchors, importance = {}, {}
        for name, a in state["anchors"].items():
            p = params.get(name)
            if p is None:
                raise ValueError(f"state_dict has parameter {name!r}, which the model does not have")
            if tuple(a.shape) != tuple(p.shape):
                raise ValueError(f"parameter {name!r}: state_dict shape {tuple(a.shape)} does not match the model's {tuple(p.shape)}")
            anchors[name] = self._store(p, a)
            if self.uses_importance:
                if name not in state["importance"]:
                    raise ValueError(f"state_dict has an anchor but no importance for {name!r}")
                importance[name] = self._store(p, state["importance"][name])
        self.strength = check_strength(state["strength"])
        self._load_extra_state(state)
        self._anchors, self._importance, self._constant = anchors, importance, float(state.get("constant", 0.0))
        self.num_consolidations = int(state.get("num_consolidations", 1 if anchors else 0))
        self._cache_key = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength}, covered={len(self._anchors)} tensors, consolidations={self.num_consolidations})"
