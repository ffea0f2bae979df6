"""Parameter importance for continual learning: diagonal Fisher and MAS.

:func:`diagonal_fisher` and :func:`mas_importance` compute, for every parameter, the mean
over samples of the squared (Fisher) or absolute (MAS) per-sample gradient, exactly,
from one ordinary forward and backward pass per batch (see :mod:`fastcl.importance.fisher`).
:func:`register_rule` teaches the engine an op of your own (see :mod:`.rules.base`).
"""
from .._names import canonical_name, named_trainable_parameters
from .fisher import PerSampleFallbackWarning, diagonal_fisher, mas_importance
from .rules import Call, Rule, register_rule

__all__ = [
    "Call",
    "PerSampleFallbackWarning",
    "Rule",
    "canonical_name",
    "diagonal_fisher",
    "mas_importance",
    "named_trainable_parameters",
    "register_rule",
]
