"""The math: anchored penalty, per-sample squared gradients, distillation.

Each op file holds the contract (docstring), a plain-PyTorch reference and the call
into :mod:`fastcl.ops._dispatch`, the one module that picks a backend.
"""
from ._dispatch import (
    BACKENDS,
    BackendStatus,
    BackendUnavailableError,
    backend_info,
    backend_status,
    choose_backend,
    op_backends,
    use_backend,
)
from .distill import distill_reference, distillation_loss, fused_linear_distillation
from .penalty import anchored_penalty, penalty, penalty_reference
from .sqgrad import sqgrad, sqgrad_reference

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "BackendUnavailableError",
    "anchored_penalty",
    "backend_info",
    "backend_status",
    "choose_backend",
    "distill_reference",
    "distillation_loss",
    "fused_linear_distillation",
    "penalty",
    "op_backends",
    "penalty_reference",
    "sqgrad",
    "sqgrad_reference",
    "use_backend",
]
