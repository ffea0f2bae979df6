r"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017).

While a task trains, every optimizer step adds to a per-parameter path integral of the
*unregularized* loss gradient times the update::

    ω_k ← ω_k − g_k · Δθ_k         (g: task-loss gradient, Δθ: this step's update)

At the end of the task (:meth:`SI.consolidate`)::

    Ω_k ← Ω_k + relu( ω_k / ((θ_k^end − θ_k^start)² + ξ) ),   θ* ← θ^end,   ω ← 0

and later tasks pay ``(λ/2)·Σ Ω(θ − θ*)²`` (the paper's c equals this λ/2).

SI works through :meth:`~fastcl.strategies.base.AnchoredRegularizer.attach`: in the
optimizer's step pre-hook it records ``g`` from ``.grad`` *before* any attached penalty
gradient is added (its own included), then adds its penalty gradient; the post-hook
integrates ``g · Δθ``. So ``g`` is exactly this step's task gradient, unscaled by
``GradScaler`` (which unscales before the step and skips the hooks with the step), with no
bookkeeping of penalty coefficients that a skipped step or discarded gradients could
leave stale. ``θ^start`` of a parameter is its value before the first step that updated it
in the task, so parameters added or unfrozen during a task are integrated from then on.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .._names import named_parameters
from .._validate import check_int, check_real
from .base import value_problem
from .importance_penalty import ImportanceRegularizer

__all__ = ["SI"]


def _accumulation_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class SI(ImportanceRegularizer):
    """SI penalty ``(λ/2)·Σ Ω(θ − θ*)²``; :meth:`attach` it to the optimizer before training.

    Usage::

        si = fastcl.SI(model, strength=1.0, damping=0.1).attach(optimizer)
        for task in tasks:
            for x, y in loader:
                opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()   # hook adds the penalty gradient
            si.consolidate()

    ``loss + si.penalty()`` in the loop is fine too: while attached the value has no
    graph, the hook adds the gradient once.
    """

    requires_optimizer = True
    state_keys = ImportanceRegularizer.state_keys + ("damping", "steps", "omega", "start")

    def __init__(self, model, strength, damping=0.1, *, storage_dtype=torch.float32):
        super().__init__(model, strength, mode="online", decay=1.0, storage_dtype=storage_dtype)
        if not self._trainable():
            raise ValueError(f"model: {type(model).__name__} has no trainable parameters (requires_grad=True) for SI to track")
        self.damping = check_real(damping, "damping (ξ)", low=0.0, low_inclusive=False)
        self._omega: dict[str, torch.Tensor] = {}  # ω of every parameter updated since the last consolidation
        self._start: dict[str, torch.Tensor] = {}  # θ before its first update since then
        self._steps = 0  # optimizer steps integrated since the last consolidation
        self._pending: list | None = None

    # ---------------------------------------------------------------- optimizer hooks
    def _on_step_begin(self, members, grad_scale: float) -> None:
        pending = []
        with torch.no_grad():
            for name, p in named_parameters(self.model).items():
                if id(p) not in members or not p.requires_grad or p.grad is None:
                    continue  # no task gradient: g·Δθ = 0 (it may still move under a penalty)
                acc = _accumulation_dtype(p)
                grad = p.grad.detach()
                grad = (grad.to_dense() if grad.is_sparse else grad).to(acc, copy=True)
                if grad_scale != 1.0:
                    grad.div_(grad_scale)
                before = p.detach().to(acc, copy=True)
                omega = self._omega.get(name)
                if omega is None or omega.shape != p.shape:  # added, unfrozen or replaced during this task
                    self._omega[name] = torch.zeros_like(before)
                    self._start[name] = before
                pending.append((name, p, before, grad))
        self._pending = pending

    def _on_step_end(self) -> None:
        with torch.no_grad():
            for name, p, before, grad in self._pending or ():
                omega = self._omega[name]
                omega.sub_(grad * (p.detach().to(omega.dtype) - before))
        self._pending = None
        self._steps += 1

    # ---------------------------------------------------------------- consolidation
    def consolidate(self, data=None) -> None:
        """End of a task: ``Ω += relu(ω / (Δθ² + ξ))``, anchor ← θ, reset ω. ``data`` is ignored.

        Covers every parameter updated during the task and every trainable one (``Ω``
        unchanged for those never updated). Raises ``ValueError`` when no optimizer step
        was integrated since the last consolidation (SI was not attached).
        """
        if self._steps == 0:
            raise ValueError(
                "SI recorded no optimizer step since the last consolidation, so its importance would be all zero: "
                "call si.attach(optimizer) before training (SI integrates the path in the optimizer's step hooks)"
            )
        params = named_parameters(self.model)
        new = {}
        with torch.no_grad():
            for name, omega in self._omega.items():
                p = params.get(name)
                if p is None:
                    raise ValueError(f"SI tracks {name!r}, which is no longer a parameter of the model")
                delta = p.detach().to(omega.dtype) - self._start[name]
                new[name] = torch.relu(omega / (delta.square() + self.damping))
            for name, p in self._trainable().items():
                new.setdefault(name, torch.zeros_like(p, dtype=_accumulation_dtype(p)))
        self.fold(new)
        self._omega, self._start, self._steps, self._pending = {}, {}, 0, None

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "damping": self.damping,
            "steps": self._steps,
            "omega": {n: t.clone() for n, t in self._omega.items()},
            "start": {n: t.clone() for n, t in self._start.items()},
        }

    def _parse_state(self, state) -> dict:
        new = super()._parse_state(state)
        new["damping"] = check_real(state["damping"], "state_dict['damping']", low=0.0, low_inclusive=False)
        omega, start = state["omega"], state["start"]
        for key, value in (("omega", omega), ("start", start)):
            if not isinstance(value, Mapping):
                raise TypeError(f"state_dict['{key}'] must be a mapping {{name: tensor}}, got {type(value).__name__}")
        if set(omega) != set(start):
            raise ValueError(f"state_dict['omega'] and state_dict['start'] cover different parameters: {sorted(set(omega) ^ set(start))[:5]}")
        params = named_parameters(self.model)
        loaded = {"omega": {}, "start": {}}
        for key, saved in (("omega", omega), ("start", start)):
            for name, t in saved.items():
                p = self._state_param(params, f"{key}[{name!r}]", name, t)
                loaded[key][name] = t.detach().to(device=p.device, dtype=_accumulation_dtype(p), copy=True)
                problem = value_problem(loaded[key][name], f"state_dict {key} {name!r}")
                if problem:
                    raise ValueError(problem)
        new["_steps"] = check_int(state["steps"], "state_dict['steps']", low=0)
        new["_omega"], new["_start"], new["_pending"] = loaded["omega"], loaded["start"], None
        return new
