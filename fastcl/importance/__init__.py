"""Parameter importance for continual learning: diagonal Fisher and MAS.

:func:`diagonal_fisher` and :func:`mas_importance` compute, for every parameter, the mean
over samples of the squared (Fisher) or absolute (MAS) per-sample gradient, exactly,
from one ordinary forward and backward pass per batch (see :mod:`fastcl.importance.fisher`).
"""
from .._names import canonical_name, named_trainable_parameters
from .fisher import PerSampleFallbackWarning, diagonal_fisher, mas_importance

__all__ = [
    "PerSampleFallbackWarning",
    "canonical_name",
    "diagonal_fisher",
    "mas_importance",
    "named_trainable_parameters",
]
