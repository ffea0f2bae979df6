r"""The shared core of every weight-space regularizer: an anchored penalty.

All of EWC, online EWC, SI, MAS, L2-SP and L1-SP are one formula::

    penalty(θ) = λ · ( Σ_k w_k · φ(θ_k − a_k)  +  c )

with φ(d) = d²/2 (quadratic) or |d| (L1), importance ``w`` (1 for L2-SP/L1-SP), anchors
``a`` and a constant ``c`` that makes the value exact for separate-mode EWC (see
:mod:`fastcl.strategies.importance_penalty`). ``c`` does not depend on θ, so it has no
gradient. The strategy classes only decide how ``w``, ``a`` and ``c`` are updated at
consolidation; the math runs in :func:`fastcl.ops.anchored_penalty` /
:func:`fastcl.ops.penalty` on whatever backend the dispatcher picks.

The penalty's gradient reaches ``.grad`` by one of three paths:

* ``loss + reg.penalty()`` — differentiable, through autograd;
* ``reg.add_penalty_grad_()`` after ``backward()`` — one fused pass into ``.grad``;
* ``reg.attach(optimizer)`` — the same fused pass, run by the optimizer's step pre-hook.
  Only optimizer steps that run add it: once per step under gradient accumulation, after
  ``GradScaler`` unscaled the gradients and never on a step it skips. While attached,
  :meth:`~AnchoredRegularizer.penalty` returns the value without a graph and
  :meth:`~AnchoredRegularizer.add_penalty_grad_` only returns the value, so a loop written
  for either path stays correct (the gradient enters once, from the hook).

Coverage: a regularizer covers the parameters that were trainable
(``requires_grad=True``) when it was consolidated. Parameters added to the model later
(a new head) are not covered; covered parameters frozen later still count in the value
(they do not move) but receive no gradient.

State is replaced, never mutated in place, by every state-changing call (consolidation,
loading), and a call that raises leaves the regularizer and the model as they were.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from .._names import canonical_name, named_parameters, named_trainable_parameters
from .._validate import check_int, check_real
from ..distributed import all_reduce_sum, as_dtensor_like, is_dtensor, local_tensor, shard_groups, shard_like
from ..ops import anchored_penalty
from ..ops import penalty as fused_penalty

__all__ = ["AnchoredRegularizer", "check_strength"]


def _module_path(raw_name: str) -> tuple[tuple[str, ...], str]:
    """``("a.b.weight") -> (("a", "b"), "weight")``: submodule keys, then the parameter's attribute."""
    *path, attribute = raw_name.split(".")
    return tuple(path), attribute


def check_strength(value: Any, name: str = "strength") -> float:
    """``value`` as a float ``>= 0`` (finite in float32; int, float, NumPy or 0-dim tensor)."""
    return check_real(value, name, low=0.0)


def agree(problem: str | None, groups_list) -> None:
    """Raise ``ValueError(problem)`` on every rank of the shard groups if any rank has a problem.

    ``groups_list``: the process-group tuples of the sharded (FSDP2) parameters involved;
    empty without DTensors. One rank's bad shard must stop every rank, so that no rank
    commits a state the others refused.
    """
    for groups in groups_list:
        if all_reduce_sum(int(problem is not None), groups) and problem is None:
            problem = "a value on another rank is not finite or out of range; state left unchanged"
    if problem is not None:
        raise ValueError(problem)


def value_problem(t: torch.Tensor, what: str, *, nonnegative: bool = False) -> str | None:
    """A message if the local part of ``t`` holds a non-finite (or, with ``nonnegative``, negative) entry."""
    local = local_tensor(t)
    if not torch.isfinite(local).all():
        return f"{what} is not finite (NaN or inf; check its float32/bfloat16 range too); state left unchanged"
    if nonnegative and (local < 0).any():
        return f"{what} has negative entries (importance must be >= 0); state left unchanged"
    return None


# --------------------------------------------------------------------------- optimizer hooks

_STEP_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _amp_state(optimizer) -> tuple[float, bool]:
    """``(grad_scale, skipped)`` for the step about to run.

    ``GradScaler.step`` unscales the gradients before ``optimizer.step()`` and does not
    call it when they hold an inf/NaN, so the hooks normally see ``(1.0, False)``. An
    optimizer that unscales inside its own step (``fused=True``: ``_step_supports_amp_scaling``)
    is called anyway, with ``optimizer.grad_scale`` (the factor still in ``.grad``) and
    ``optimizer.found_inf`` set by the scaler.
    """
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is not None and float(found_inf) != 0.0:
        return 1.0, True
    grad_scale = getattr(optimizer, "grad_scale", None)
    return (1.0 if grad_scale is None else float(grad_scale)), False


class _StepHooks:
    """One optimizer's step pre/post hooks, shared by every regularizer attached to it.

    Before the update, in three rounds over the attached regularizers: each checks it can
    run (so a refusal changes nothing), each observes the gradient (SI records it, before
    any penalty gradient is in it), each adds its penalty gradient. After the update each
    observes the new weights. A step the scaler skips runs none of this.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = weakref.ref(optimizer)
        self.regularizers: list[AnchoredRegularizer] = []
        self.stepping = False
        self._members_key: tuple | None = None
        self._members: frozenset[int] = frozenset()
        self.handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    def members(self) -> frozenset[int]:
        """``id`` of every parameter in the optimizer's param groups (cached per group layout)."""
        optimizer = self.optimizer()
        if optimizer is None:
            return frozenset()
        key = tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
        if key != self._members_key:
            self._members = frozenset(id(p) for g in optimizer.param_groups for p in g["params"])
            self._members_key = key
        return self._members

    def _pre(self, optimizer, args, kwargs):
        self.stepping = False
        head = 1 if args and args[0] is optimizer else 0  # torch passes step's own arguments, self included
        closure = args[head] if len(args) > head else kwargs.get("closure")
        if closure is None:
            self._before_update(optimizer)
            return None

        def closure_then_penalty():
            # step(closure) computes the gradients inside the step, after this hook: the penalty's go in after it
            result = closure()
            self._before_update(optimizer)
            return result

        if len(args) > head:
            return (*args[:head], closure_then_penalty, *args[head + 1 :]), kwargs
        return args, {**kwargs, "closure": closure_then_penalty}

    def _before_update(self, optimizer) -> None:
        self.stepping = False
        grad_scale, skipped = _amp_state(optimizer)
        if skipped:
            return
        members = self.members()
        plans = [reg._plan_attached_step(members) for reg in self.regularizers]
        for reg in self.regularizers:
            reg._on_step_begin(members, grad_scale)
        for reg, plan in zip(self.regularizers, plans):
            reg._run_attached_step(plan, grad_scale)
        self.stepping = True

    def _post(self, optimizer, args, kwargs) -> None:
        if self.stepping:
            self.stepping = False
            for reg in self.regularizers:
                reg._on_step_end()

    def remove(self, regularizer) -> None:
        self.regularizers = [r for r in self.regularizers if r is not regularizer]
        if not self.regularizers:
            for handle in self.handles:
                handle.remove()
            optimizer = self.optimizer()
            if optimizer is not None and _STEP_HOOKS.get(optimizer) is self:
                del _STEP_HOOKS[optimizer]


# --------------------------------------------------------------------------- the regularizer


class AnchoredRegularizer:
    """Holds anchors, importance and a constant per covered parameter; evaluates the penalty.

    Subclasses set ``penalty_form`` ("quadratic" or "l1", the φ of :func:`fastcl.ops.penalty`) and ``uses_importance`` and commit fully
    computed new state with :meth:`_commit` (so a failed consolidation changes nothing).
    ``consolidation_input`` says what ``consolidate`` reads from its data: ``None`` (no
    data), ``"loss"`` (per-sample losses: ``forward``/``loss_fn``) or ``"outputs"`` (the
    model's outputs only); ``requires_optimizer`` that it only works when attached.

    Extension points for subclasses: :meth:`_on_step_begin` / :meth:`_on_step_end` are
    called around every step of an attached optimizer that actually updates the weights.
    """

    penalty_form = "quadratic"
    uses_importance = True
    consolidation_input: str | None = None
    requires_optimizer = False
    #: every key :meth:`state_dict` writes; :meth:`load_state_dict` requires them all
    #: (``"kind"``, the earlier spelling of ``"form"``, is accepted in its place)
    state_keys: tuple[str, ...] = ("type", "strength", "form", "num_consolidations", "constant", "anchors", "importance")

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
        self.last_penalty: torch.Tensor | None = None
        self._cache_key: list | None = None  # [(module path, attribute, parameter, device)] the cache is valid for
        self._cache: tuple | None = None
        self._partition: list[tuple] = [((), None)]
        self._sharded_ids: set[int] = set()
        self._sharded_params: dict[str, torch.nn.Parameter] = {}
        self._attachments: list[_StepHooks] = []

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
            if id(p) not in self._sharded_ids:  # remember {name: sharded parameter} for _resolve
                self._sharded_params = {n: q for n, q in named_parameters(self.model).items() if is_dtensor(q)}
                self._sharded_ids.update(id(q) for q in self._sharded_params.values())
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
        constant = float(constant)
        if not math.isfinite(constant):
            raise ValueError("consolidation produced a non-finite penalty constant; state left unchanged")
        self._anchors, self._importance, self._constant = anchors, importance, constant
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

        The result is cached while every covered name still leads, through the same module
        objects, to the same parameter on the same device (a few dict lookups per tensor,
        instead of walking and renaming the whole model on every call).
        """
        if self._cache_key is not None and self._cache_is_current():
            return self._cache
        params = named_parameters(self.model)
        raw_names = {}
        for raw, _ in self.model.named_parameters():
            raw_names.setdefault(canonical_name(raw), raw)
        names, plist, alist, wlist = [], [], [], []
        anchors, importance = dict(self._anchors), dict(self._importance)
        for name, anchor in anchors.items():
            p = params.get(name)
            if p is None:
                raise ValueError(f"parameter {name!r} was consolidated but is no longer in the model")
            if is_dtensor(anchor) and not is_dtensor(p):
                # FSDP2 leaves the root module's parameters unsharded from forward to backward and
                # registers the unsharded (full, plain) ones meanwhile; the penalty always uses the
                # sharded parameter, whose gradient FSDP accumulates with its reduce-scattered one.
                p = self._sharded_params.get(name)
                if p is None or p.shape != anchor.shape:
                    raise ValueError(f"parameter {name!r} is not sharded (DTensor) but its stored state is")
            if p.shape != anchor.shape:
                raise ValueError(f"parameter {name!r} has shape {tuple(p.shape)} but its anchor has {tuple(anchor.shape)}")
            if anchor.device != p.device:  # the same values on the model's new device
                anchors[name] = anchor = anchor.to(p.device)
                if name in importance:
                    importance[name] = importance[name].to(p.device)
            names.append(name)
            plist.append(p)
            alist.append(anchor)
            if self.uses_importance:
                wlist.append(importance[name])
        partition: dict[tuple, tuple] = {}
        for i, p in enumerate(plist):
            groups = shard_groups(p)
            partition.setdefault(tuple(id(g) for g in groups), (groups, []))[1].append(i)
        self._anchors, self._importance = anchors, importance
        self._partition = list(partition.values()) if any(g for g, _ in partition.values()) else [((), None)]
        self._cache_key = [(*_module_path(raw_names[n]), params[n], params[n].device) for n in names]
        self._cache = (names, plist, alist, wlist if self.uses_importance else None)
        return self._cache

    def _cache_is_current(self) -> bool:
        for path, attribute, param, device in self._cache_key:
            module = self.model
            for key in path:
                module = module._modules.get(key)
                if module is None:
                    return False
            if module._parameters.get(attribute) is not param or param.device != device:
                return False
        return True

    def _zero(self) -> torch.Tensor:
        p = next(iter(self.model.parameters()), None)
        return torch.zeros((), dtype=torch.float32, device=None if p is None else p.device)

    @property
    def attached(self) -> bool:
        """Whether an optimizer this regularizer is attached to is still alive."""
        self._attachments = [h for h in self._attachments if h.optimizer() is not None]
        return bool(self._attachments)

    def penalty(self) -> torch.Tensor:
        """The penalty as a differentiable 0-dim tensor (exactly 0 before any consolidation).

        While :meth:`attach`\\ ed the value has no graph: the optimizer's hook adds the
        gradient, so ``loss + penalty()`` stays correct and only logs the value.

        FSDP2: the value is global (identical on all ranks): the local shards' term ``v_r``
        is summed over the ranks as ``v_r + (Σ_r v_r − v_r).detach()``, so the gradient
        reaching each local shard is that of its own term, the exact gradient of the global
        penalty with respect to that shard.
        """
        if not self.consolidated or self.strength == 0.0:
            return self._zero()
        if self.attached:
            with torch.no_grad():
                value = self._penalty_value()
        else:
            value = self._penalty_value()
        self.last_penalty = value.detach()
        return value

    def _penalty_value(self) -> torch.Tensor:
        _, params, anchors, weights = self._resolve()
        value = None
        for groups, idx in self._partition:
            if idx is None:
                part = anchored_penalty(params, anchors, weights, scale=self.strength, form=self.penalty_form)
            else:
                with torch.no_grad():
                    local_anchors = [local_tensor(anchors[i]) for i in idx]
                    local_weights = None if weights is None else [local_tensor(weights[i]) for i in idx]
                part = anchored_penalty([local_tensor(params[i]) for i in idx], local_anchors, local_weights,
                                        scale=self.strength, form=self.penalty_form)
            if groups:
                total = all_reduce_sum(part.detach().clone(), groups)
                part = part + (total - part.detach())
            value = part if value is None else value + part
        if self._constant:
            value = value + self.strength * self._constant
        return value

    def add_penalty_grad_(self) -> torch.Tensor:
        """Fast path: add ∂penalty/∂θ straight into ``p.grad`` and return the penalty value.

        Call after ``loss.backward()`` (task loss only) and before ``optimizer.step()``
        (under ``GradScaler``: after ``scaler.unscale_(optimizer)``): one fused pass reads
        θ, a, w and ``p.grad`` and writes ``p.grad`` — no autograd graph, no temporaries.
        Parameters whose ``.grad`` is ``None`` get one allocated. Frozen covered
        parameters count in the value but receive no gradient. While :meth:`attach`\\ ed,
        only the value is returned (the optimizer's hook adds the gradient).

        Second order: after ``backward(create_graph=True)`` (a ``.grad`` that requires grad)
        it raises ``ValueError`` before touching anything, as does an attached step: the
        fused gradient is a constant and would drop the penalty's second-order terms. Use
        ``loss + reg.penalty()``, which supports ``create_graph=True``.

        DDP: call it after ``backward()`` (gradients already averaged); every rank adds the
        same term. FSDP2: each rank writes its shard's gradient into the local tensor of
        ``p.grad`` (a DTensor) and the returned value is global (summed over the shards).
        """
        if not self.consolidated or self.strength == 0.0:
            return self._zero()
        if self.attached:
            with torch.no_grad():
                value = self._penalty_value()
        else:
            value = self._add_grad(None, 1.0)
        self.last_penalty = value.detach()
        return value

    def _add_grad(self, members: frozenset[int] | None, grad_scale: float, resolved: tuple | None = None) -> torch.Tensor:
        """Add ``grad_scale · ∂penalty/∂θ`` to the ``.grad`` of the covered trainable parameters.

        ``members``: only parameters whose ``id`` is in it receive a gradient (those of one
        optimizer); ``None``: every trainable covered parameter. The others count in the
        value only. Returns the (unscaled) penalty value. New ``.grad`` tensors are only
        assigned once the fused op succeeded.
        """
        resolved = resolved or self._resolve()
        self._refuse_graph_grads(resolved, members)
        _, params, anchors, weights = resolved
        value = torch.zeros((), dtype=torch.float32, device=params[0].device)
        created: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():  # local_tensor(DTensor) is then the DTensor's own local tensor: writes reach p.grad
            for groups, idx in self._partition:
                local = local_tensor if idx is not None else (lambda t: t)  # no DTensors: the tensors as they are
                pick = lambda seq, sel: None if seq is None else [local(seq[i]) for i in sel]  # noqa: E731
                idx = range(len(params)) if idx is None else idx
                live = [i for i in idx if params[i].requires_grad and (members is None or id(params[i]) in members)]
                live_set = set(live)
                rest = [i for i in idx if i not in live_set]
                part = torch.zeros_like(value)
                if rest:
                    part = part + fused_penalty(pick(params, rest), pick(anchors, rest), pick(weights, rest), scale=self.strength, form=self.penalty_form)
                if live:
                    grads = []
                    for i in live:
                        g = params[i].grad
                        if g is None:
                            g = torch.zeros_like(params[i])  # a DTensor like p under FSDP2
                            created.append((params[i], g))
                        grads.append(local(g))
                    scaled = fused_penalty(pick(params, live), pick(anchors, live), pick(weights, live),
                                           scale=self.strength * grad_scale, form=self.penalty_form, grads=grads)
                    part = part + (scaled if grad_scale == 1.0 else scaled / grad_scale)
                value = value + all_reduce_sum(part, groups)  # FSDP2: the local shards' sum over ranks
        for p, g in created:
            p.grad = g
        return value + self.strength * self._constant

    @staticmethod
    def _refuse_graph_grads(resolved: tuple, members: frozenset[int] | None) -> None:
        """Refuse a ``.grad`` that requires grad (``backward(create_graph=True)``) before anything is written.

        ``ValueError``, like the other gradients the fused op cannot take (sparse ones: ``TypeError``).
        """
        for name, p in zip(resolved[0], resolved[1]):
            if p.requires_grad and p.grad is not None and p.grad.requires_grad and (members is None or id(p) in members):
                raise ValueError(
                    f"the .grad of {name!r} requires grad (backward(create_graph=True)): the fused path adds a constant "
                    "gradient, which would silently drop the penalty's second-order terms. Add reg.penalty() to the "
                    "loss instead (it supports create_graph=True); nothing was changed"
                )

    # ------------------------------------------------------------------ optimizer attachment
    def attach(self, optimizer: torch.optim.Optimizer):
        """Add the penalty's gradient in ``optimizer``'s step pre-hook; returns ``self``.

        The training loop does not change: no ``penalty()`` in the loss, no
        ``add_penalty_grad_()``. Every ``optimizer.step()`` that updates the weights adds
        ``∂penalty/∂θ`` to the ``.grad`` of the covered parameters the optimizer holds
        (one fused pass) and stores the value in :attr:`last_penalty`:

        * gradient accumulation: once per optimizer step;
        * ``GradScaler``: ``scaler.step`` unscales the gradients before the hook runs and
          skips the step, hook included, when they hold an inf/NaN (optimizers that
          unscale in their own fused step are handled through the scaler's ``grad_scale``
          and ``found_inf``); gradient clipping before the step sees the task gradient only;
        * DDP: the hook runs after the gradients were averaged; FSDP2: on local shards.

        Several optimizers: attach each; every covered trainable parameter must be in one
        of them. A new optimizer needs its own ``attach``. ``optimizer.step(closure)``
        (Lightning's automatic optimization): the gradient is added right after the
        closure computed the task's; optimizers that evaluate the closure several times
        per step against its loss (L-BFGS) are refused. :meth:`detach` removes the hooks.
        Attaching twice to the same optimizer is a no-op.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("optimizer: L-BFGS line-searches on the closure's loss, which would lack the penalty; add penalty() to that loss instead")
        hooks = _STEP_HOOKS.get(optimizer)
        if hooks is not None and any(r is self for r in hooks.regularizers):
            return self
        if self.consolidated:
            self._check_in_optimizers(extra=self._members_of(optimizer), only_if_disjoint=True)
        else:
            held, own = self._members_of(optimizer), list(self.model.parameters())
            if own and not any(id(p) in held for p in own):
                raise ValueError(
                    f"optimizer holds none of the model's {len(own)} parameters (is it another model's optimizer?); "
                    f"{type(self).__name__} must be attached to the optimizer that trains its model"
                )
        if hooks is None:
            hooks = _STEP_HOOKS[optimizer] = _StepHooks(optimizer)
        hooks.regularizers.append(self)
        self.attached  # prune attachments whose optimizer is gone
        self._attachments.append(hooks)
        return self

    @staticmethod
    def _members_of(optimizer) -> frozenset[int]:
        return frozenset(id(p) for g in optimizer.param_groups for p in g["params"])

    def detach(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Stop adding the gradient at ``optimizer``'s steps (every attached optimizer by default)."""
        keep = []
        for hooks in self._attachments:
            if optimizer is None or hooks.optimizer() is optimizer:
                hooks.remove(self)
            else:
                keep.append(hooks)
        self._attachments = keep

    def _check_in_optimizers(self, resolved: tuple | None = None, extra: frozenset[int] = frozenset(), only_if_disjoint: bool = False) -> None:
        """Every covered trainable parameter must be in an attached optimizer (or in ``extra``)."""
        names, params, _, _ = resolved or self._resolve()
        if only_if_disjoint:
            live = [p for p in params if p.requires_grad]
            if live and not any(id(p) in extra for p in live):
                raise ValueError(
                    f"optimizer holds none of the {len(live)} parameters {type(self).__name__} covers "
                    "(does it optimize a copy, a flattened or an offloaded version of them? then add penalty() to the loss)"
                )
            return
        held = [h.members() for h in self._attachments] + ([extra] if extra else [])
        held = held[0] if len(held) == 1 else frozenset().union(*held)
        missing = [n for n, p in zip(names, params) if p.requires_grad and id(p) not in held]
        if missing:
            raise ValueError(
                f"{type(self).__name__} covers trainable parameters that no attached optimizer holds, so their penalty "
                f"gradient would never be applied: {missing[:5]}{' ...' if len(missing) > 5 else ''}; attach every "
                "optimizer (or freeze those parameters)"
            )

    def _plan_attached_step(self, members: frozenset[int]):
        """Checks before an attached step changes anything; returns what :meth:`_run_attached_step` needs."""
        if not self.consolidated or self.strength == 0.0:
            return None
        self.attached  # prune dead optimizers before checking coverage
        resolved = self._resolve()
        self._check_in_optimizers(resolved)
        self._refuse_graph_grads(resolved, members)
        return members, resolved

    def _run_attached_step(self, plan, grad_scale: float) -> None:
        if plan is not None:
            members, resolved = plan
            self.last_penalty = self._add_grad(members, grad_scale, resolved).detach()

    def _on_step_begin(self, members: frozenset[int], grad_scale: float) -> None:
        """Extension point: an attached optimizer is about to update the parameters in ``members``.

        ``.grad`` holds ``grad_scale`` times this step's gradient, without the penalty
        gradient of any attached regularizer (those are added right after).
        """

    def _on_step_end(self) -> None:
        """Extension point: the step announced by :meth:`_on_step_begin` has updated the weights."""

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Everything needed to resume: strength, anchors, importance, constant and subclass state."""
        return {
            "type": type(self).__name__,
            "strength": self.strength,
            "form": self.penalty_form,
            "num_consolidations": self.num_consolidations,
            "constant": self._constant,
            "anchors": {n: t.clone() for n, t in self._anchors.items()},
            "importance": {n: t.clone() for n, t in self._importance.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore from :meth:`state_dict`; names and shapes must match ``model.named_parameters()``.

        Everything is validated before anything changes: a refused state (wrong type or
        keys, unknown parameters, shapes, non-finite anchors, negative or non-finite
        importance, bad hyperparameters) raises ``ValueError``/``TypeError`` and leaves
        the regularizer as it was.

        FSDP2: :meth:`state_dict` holds DTensors (each rank's shard plus mesh and placements:
        save it with ``torch.distributed.checkpoint``, or per rank). Loading accepts
        DTensors (redistributed if their placements differ) or full tensors (each rank keeps
        its shard), so a single-process state loads into a sharded model and, with
        ``full_tensor()`` gathering on every rank, the other way round.
        """
        new = self._parse_state(state)
        self.__dict__.update(new)
        self._cache_key = None

    def _parse_state(self, state: Any) -> dict[str, Any]:
        """Validate ``state`` completely and return ``{attribute: new value}`` (nothing is changed).

        Subclasses extend it (``super()._parse_state(state)`` then their own keys).
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict must be a mapping as returned by state_dict(), got {type(state).__name__}")
        missing = [k for k in self.state_keys if k not in state and not (k == "form" and "kind" in state)]
        if missing:
            raise ValueError(f"state_dict is missing the keys {missing}; expected every key of {type(self).__name__}.state_dict()")
        if state["type"] != type(self).__name__:
            raise ValueError(f"state_dict is for {state['type']}, not {type(self).__name__}")
        saved_form = state["form"] if "form" in state else state["kind"]  # "kind": the key of earlier versions
        if saved_form != self.penalty_form:
            raise ValueError(f"state_dict has form={saved_form!r}, {type(self).__name__} uses form={self.penalty_form!r}")
        strength = check_strength(state["strength"], "state_dict['strength']")
        constant = check_real(state["constant"], "state_dict['constant']", low=0.0)
        saved_anchors, saved_importance = state["anchors"], state["importance"]
        for key, value in (("anchors", saved_anchors), ("importance", saved_importance)):
            if not isinstance(value, Mapping):
                raise TypeError(f"state_dict['{key}'] must be a mapping {{name: tensor}}, got {type(value).__name__}")
        if self.uses_importance and set(saved_importance) != set(saved_anchors):
            raise ValueError(
                f"state_dict['importance'] and state_dict['anchors'] cover different parameters: "
                f"{sorted(set(saved_importance) ^ set(saved_anchors))[:5]}"
            )
        if not self.uses_importance and saved_importance:
            raise ValueError(f"{type(self).__name__} is unweighted, but state_dict['importance'] is not empty")
        num = check_int(state["num_consolidations"], "state_dict['num_consolidations']", low=0)
        params = named_parameters(self.model)
        anchors, importance, problem, groups = {}, {}, None, {}
        for name, a in saved_anchors.items():
            p = self._state_param(params, f"anchors[{name!r}]", name, a)
            anchors[name] = self._store(p, a)
            problem = problem or value_problem(anchors[name], f"state_dict anchor {name!r}")
            if self.uses_importance:
                self._state_param(params, f"importance[{name!r}]", name, saved_importance[name])
                importance[name] = self._store(p, saved_importance[name])
                problem = problem or value_problem(importance[name], f"state_dict importance {name!r}", nonnegative=True)
            g = shard_groups(p)
            if g:
                groups.setdefault(tuple(id(x) for x in g), g)
        agree(problem, groups.values())
        return {
            "strength": strength, "_constant": constant, "num_consolidations": num,
            "_anchors": anchors, "_importance": importance,
        }

    @staticmethod
    def _state_param(params: dict, label: str, name: Any, value: Any) -> torch.nn.Parameter:
        """The model parameter ``name`` after checking that ``value`` is a floating tensor of its shape."""
        p = params.get(name)
        if p is None:
            raise ValueError(f"state_dict has parameter {name!r}, which the model does not have")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            got = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"state_dict {label} must be a floating-point tensor, got {got}")
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"parameter {name!r}: state_dict shape {tuple(value.shape)} does not match the model's {tuple(p.shape)}")
        return p

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_attachments"] = []  # the optimizer hooks run the original only: a copy is not attached
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength}, covered={len(self._anchors)} tensors, consolidations={self.num_consolidations})"
