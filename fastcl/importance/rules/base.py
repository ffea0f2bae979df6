r"""The per-op rule interface and the registry (:func:`register_rule`).

A :class:`Rule` teaches the importance engine one op that takes parameters, BackPACK-style
but at the op level (so tied weights, modules called twice and custom modules are covered):

* ``functions``: the torch functions whose calls it handles (``F.linear``, ``torch.addmm``...);
* :meth:`Rule.parse`: from a call's arguments, the input ``x`` that carries the samples,
  the tensors in its parameter slots, and op metadata; ``None`` when the call is not this
  rule's case (the engine then follows it as any other use of a parameter), or a string
  saying why no per-sample gradient exists for it (e.g. ``max_norm`` renormalising an
  embedding table in place: its parameters take the exact fallback);
* :meth:`Rule.sample_dim_ok`: along which dims of ``x`` samples may lie so that the op
  treats them independently (leading dims for a linear map, dim 0 for a convolution);
* :meth:`Rule.contributions`: from ``x`` and the output gradient ``g``, both *per sample*
  (``[B, …]``: ``x[b]`` is the op input of sample ``b`` and ``g[b]`` the gradient of sample
  ``b``'s own loss with respect to that input's output), each parameter's per-sample
  gradient as a :mod:`~fastcl.importance.contributions` object or a plain ``[B, *shape]``
  tensor;
* optionally :meth:`Rule.forward` and :meth:`Rule.input_grad`: the op and the gradient
  with respect to ``x`` alone. With them the engine runs the op as an autograd Function
  whose backward computes the input gradient and the rule, and never the weight gradient.

Which dimension of ``x`` holds the samples is never the rule's guess: the engine knows it
from where ``x`` came from (:mod:`fastcl.importance.provenance`) and hands the rule
per-sample views. Inputs shared by every sample (a position table ``arange(T)``, a
parameter passed through a layer) reach the same rule with ``x[b]`` equal for all ``b``
and ``g[b]`` each sample's own gradient, recovered where the shared tensor meets the batch.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = ["Call", "Rule", "register_rule", "rule_for", "registered_rules"]


class Call(NamedTuple):
    """One parsed call: the op input carrying the samples, the tensors in parameter slots, metadata."""

    x: torch.Tensor
    params: dict[str, Any]
    meta: dict[str, Any]


class Rule:
    """Base class of the per-op rules (see the module docstring)."""

    functions: tuple = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def parse(self, args: tuple, kwargs: dict) -> Call | str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def sample_dim_ok(self, call: Call, dim: int) -> bool:
        """Default: any dim but the last (feature) one."""
        return dim < call.x.dim() - 1

    def contributions(self, call: Call, x: torch.Tensor, g: torch.Tensor, saved: tuple, slots) -> dict:  # pragma: no cover
        raise NotImplementedError

    # optional fast path ---------------------------------------------------------------

    has_forward = False

    def forward(self, call: Call) -> tuple[torch.Tensor, tuple]:
        """``(output, saved)``: the op's output and tensors the rule reuses, aligned with ``x``."""
        raise NotImplementedError

    def input_grad(self, call: Call, saved: tuple, g: torch.Tensor) -> torch.Tensor:
        """Gradient of ``Σ g·output`` with respect to ``x``."""
        raise NotImplementedError


_REGISTRY: dict = {}


def register_rule(rule: Rule, *, replace: bool = False) -> Rule:
    """Make the importance engine (Fisher, MAS) use ``rule`` for the calls of ``rule.functions``.

    ``rule``: an instance of a :class:`Rule` subclass. A function that already has a rule
    raises ``ValueError`` unless ``replace=True``. Returns ``rule`` (usable as a decorator
    on an instance factory). Parameters used by calls no rule covers are still exact:
    the engine follows them to where they meet the batch, or takes the exact per-sample
    fallback with a one-time warning.
    """
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be an instance of fastcl.importance.Rule, got {type(rule).__name__}")
    if not rule.functions:
        raise ValueError(f"rule {rule.name} lists no functions (set its `functions` attribute)")
    for fn in rule.functions:
        if not callable(fn):
            raise TypeError(f"rule {rule.name}: functions must be callables, got {type(fn).__name__}")
        if fn in _REGISTRY and not replace and _REGISTRY[fn] is not rule:
            raise ValueError(
                f"{getattr(fn, '__qualname__', fn)} already has the rule {_REGISTRY[fn].name}; pass replace=True to replace it"
            )
    for fn in rule.functions:
        _REGISTRY[fn] = rule
    return rule


def rule_for(func) -> Rule | None:
    return _REGISTRY.get(func)


def registered_rules() -> dict:
    """``{function: rule}`` (a copy)."""
    return dict(_REGISTRY)


def arg(args, kwargs, i, name, default=None):
    """Positional argument ``i`` or keyword ``name``."""
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def leading(args, kwargs, *names) -> tuple:
    """The first arguments of a call by their positions or names (``None`` when absent)."""
    return tuple(arg(args, kwargs, i, name) for i, name in enumerate(names))


def ntuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def flat_features(t: torch.Tensor, n_feat: int) -> torch.Tensor:
    """``[B, *mid, *feat]`` -> ``[B, T, *feat]`` (``T`` = product of ``mid``)."""
    return t.reshape(t.shape[0], -1, *t.shape[t.dim() - n_feat:]) if n_feat else t.reshape(t.shape[0], -1)


def sum_middle(t: torch.Tensor) -> torch.Tensor:
    """``[B, T, *feat]`` -> ``[B, numel(feat)]`` summed over ``T``."""
    if t.shape[1] == 1:  # a plain Linear: summing one position would fill and copy the whole gradient
        return t.reshape(t.shape[0], -1)
    return t.sum(1).reshape(t.shape[0], -1)
