"""What users hold: regularizers toward the old weights and distillation toward the old model."""
from .base import AnchoredRegularizer
from .ewc import EWC
from .importance_penalty import ImportanceRegularizer
from .lwf import LwF
from .mas import MAS
from .regularizers import L1SP, L2SP
from .si import SI

__all__ = ["AnchoredRegularizer", "EWC", "ImportanceRegularizer", "L1SP", "L2SP", "LwF", "MAS", "SI"]
