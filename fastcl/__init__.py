"""fastcl: retrain a PyTorch network on new data without forgetting the old.

Strategies (EWC, online EWC, SI, MAS, L2-SP, L1-SP, LwF), a replay buffer, an exact per-sample diagonal
Fisher engine, fine-tuning helpers, imbalanced-data helpers and continual-learning
metrics, on three fused ops (penalty, sqgrad, distill) with Triton, C++ and CUDA kernels
and a pure-PyTorch fallback.
"""
from . import scenarios
from ._version import __version__
from .data import balanced_sampler, class_counts, class_weights
from .finetune import GradualUnfreezer, freeze, layerwise_lr_groups, trainable_parameters, unfreeze
from .importance import PerSampleFallbackWarning, canonical_name, diagonal_fisher, mas_importance, named_trainable_parameters
from .metrics import AccuracyMatrix
from .ops import BackendUnavailableError, backend_info, distillation_loss, fused_linear_distillation, use_backend
from .replay import ReplayBuffer
from .strategies import EWC, L1SP, L2SP, MAS, SI, LwF

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "backend_info",
    "distillation_loss",
    "fused_linear_distillation",
    "use_backend",
    "PerSampleFallbackWarning",
    "canonical_name",
    "diagonal_fisher",
    "mas_importance",
    "named_trainable_parameters",
    "EWC",
    "L1SP",
    "L2SP",
    "LwF",
    "MAS",
    "SI",
    "AccuracyMatrix",
    "ReplayBuffer",
    "GradualUnfreezer",
    "balanced_sampler",
    "class_counts",
    "class_weights",
    "freeze",
    "layerwise_lr_groups",
    "scenarios",
    "trainable_parameters",
    "unfreeze",
]
