r"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017).

While a task trains, every optimizer step adds to a per-parameter path integral of the
*unregularized* loss gradient times the update::

    ω_k ← ω_k − g_k · Δθ_k         (g: task-loss gradient, Δθ: this step's update)

At the end of the task (:meth:`SI.consolidate`)::

    Ω_k ← Ω_k + relu( ω_k / ((θ_k^end − θ_k^start)² + ξ) ),   θ* ← θ^end,   ω ← 0

and later tasks pay ``(λ/2)·Σ Ω(θ − θ*)²`` (the paper's c equals this λ/2). The
unregularized gradient is recovered exactly: when the penalty's gradient entered
``.grad`` (through :meth:`penalty` in the loss, with whatever coefficient, or
:meth:`add_penalty_grad_`), SI subtracts it before accumulating.
"""
from __future__ import annotations

import math

import torch

from .._names import named_parameters
from ..ops import penalty as fused_penalty
from .importance_penalty import ImportanceRegularizer

__all__ = ["SI"]


def _accumulation_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class SI(ImportanceRegularizer):
    """SI penalty ``(λ/2)·Σ Ω(θ − θ*)²``; call :meth:`attach` with the optimizer once.

    Usage::

        si = fastcl.SI(model, strength=1.0, damping=0.1)
        si.attach(optimizer)
        for task in tasks:
            for x, y in loader:
                opt.zero_grad(); (F.cross_entropy(model(x), y) + si.penalty()).backward(); opt.step()
            si.consolidate()
    """

    def __init__(self, model, strength, damping=0.1, *, storage_dtype=torch.float32):
        super().__init__(model, strength, mode="online", decay=1.0, storage_dtype=storage_dtype)
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping <= 0:
            raise ValueError(f"damping (ξ) must be a finite number > 0, got {damping!r}")
        self.damping = float(damping)
        self._start: dict[str, torch.Tensor] = {}
        self._omega: dict[str, torch.Tensor] = {}
        self._track_trainable()
        self._handles: list = []
        self._pending = None
        self._scaler = None
        self._penalty_grad_autograd = 0.0  # Σ grad_output reaching penalty() outputs (loss-scaled under AMP)
        self._penalty_grad_direct = 0.0  # Σ coefficients added by add_penalty_grad_() (unscaled)

    def _track_trainable(self) -> None:
        for name, p in self._trainable().items():
            if name not in self._omega:
                acc = _accumulation_dtype(p)
                self._omega[name] = torch.zeros_like(p, dtype=acc, memory_format=torch.contiguous_format)
                self._start[name] = p.detach().to(acc).clone()

    # ---------------------------------------------------------------- optimizer hooks
    def attach(self, optimizer: torch.optim.Optimizer, scaler=None) -> SI:
        """Accumulate the path integral on every ``optimizer.step()`` (step pre/post hooks).

        With fp16 mixed precision pass the ``torch.amp.GradScaler``: the gradient that
        reaches :meth:`penalty` through ``scaler.scale(loss).backward()`` is multiplied by
        the loss scale, and SI divides it back out (``scaler.step`` unscales the parameter
        gradients before the optimizer step). Call :meth:`add_penalty_grad_` only after
        ``scaler.unscale_(optimizer)``.
        """
        if not hasattr(optimizer, "register_step_pre_hook"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer with step hooks, got {type(optimizer).__name__}")
        if scaler is not None and not hasattr(scaler, "get_scale"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self._scaler = scaler
        self._track_trainable()
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))
        self._handles.append(optimizer.register_step_post_hook(self._after_step))
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def penalty(self) -> torch.Tensor:
        value = super().penalty()
        if value.requires_grad:
            value.register_hook(self._record_penalty_grad)
        return value

    def _record_penalty_grad(self, grad: torch.Tensor) -> None:
        self._penalty_grad_autograd += float(grad)

    def _after_grad_added(self, grad_scale: float) -> None:
        self._penalty_grad_direct += grad_scale

    def _penalty_coefficient(self) -> float:
        """How many times the penalty's gradient is in ``.grad`` at step time."""
        autograd = self._penalty_grad_autograd
        if autograd and self._scaler is not None and self._scaler.is_enabled():
            autograd /= float(self._scaler.get_scale())
        return autograd + self._penalty_grad_direct

    def _before_step(self, optimizer, args, kwargs) -> None:
        params = named_parameters(self.model)
        names = [n for n in self._omega if n in params and params[n].grad is not None]
        grads = {n: params[n].grad.detach().clone(memory_format=torch.contiguous_format) for n in names}
        coefficient = self._penalty_coefficient()
        if coefficient and self.consolidated:
            covered = [n for n in names if n in self._anchors]
            if covered:
                resolved_names, plist, alist, wlist = self._resolve()
                index = {n: i for i, n in enumerate(resolved_names)}
                fused_penalty(
                    [plist[index[n]] for n in covered],
                    [alist[index[n]] for n in covered],
                    [wlist[index[n]] for n in covered],
                    scale=-self.strength * coefficient,
                    grads=[grads[n] for n in covered],
                )
        self._penalty_grad_autograd = self._penalty_grad_direct = 0.0
        self._pending = [(n, params[n], params[n].detach().clone(), grads[n]) for n in names]

    def _after_step(self, optimizer, args, kwargs) -> None:
        for name, p, before, grad in self._pending or ():
            omega = self._omega[name]
            omega.sub_(grad.to(omega.dtype) * (p.detach().to(omega.dtype) - before.to(omega.dtype)))
        self._pending = None

    # ---------------------------------------------------------------- consolidation
    def consolidate(self, data=None) -> None:
        """End of a task: ``Ω += relu(ω / (Δθ² + ξ))``, anchor ← θ, reset ω. ``data`` is ignored."""
        params = named_parameters(self.model)
        new = {}
        for name, omega in self._omega.items():
            p = params.get(name)
            if p is None:
                raise ValueError(f"SI tracks {name!r}, which is no longer a parameter of the model")
            delta = p.detach().to(omega.dtype) - self._start[name]
            new[name] = torch.relu(omega / (delta.square() + self.damping))
        self._merge(new)
        for name in self._omega:
            self._omega[name].zero_()
            self._start[name] = params[name].detach().to(self._omega[name].dtype).clone()
        self._track_trainable()

    def _extra_state(self) -> dict:
        return {
            **super()._extra_state(),
            "damping": self.damping,
            "omega": {n: t.clone() for n, t in self._omega.items()},
            "start": {n: t.clone() for n, t in self._start.items()},
        }

    def _load_extra_state(self, state) -> None:
        super()._load_extra_state(state)
        self.damping = float(state.get("damping", self.damping))
        if "omega" in state:
            params = named_parameters(self.model)
            for key in ("omega", "start"):
                for name, t in state[key].items():
                    if name not in params or tuple(params[name].shape) != tuple(t.shape):
                        raise ValueError(f"SI state {key}[{name!r}] does not match the model's parameters")
            self._omega = {n: t.to(device=params[n].device, dtype=_accumulation_dtype(params[n])).clone() for n, t in state["omega"].items()}
            self._start = {n: t.to(device=params[n].device, dtype=_accumulation_dtype(params[n])).clone() for n, t in state["start"].items()}
