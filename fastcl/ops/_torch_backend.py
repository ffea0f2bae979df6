"""The ``torch`` backend: the plain-PyTorch references, which run on any device and dtype."""
from __future__ import annotations

import torch

from .distill import distill_reference
from .penalty import penalty_reference
from .sqgrad import sqgrad_reference

OPS = {"penalty": penalty_reference, "sqgrad": sqgrad_reference, "distill": distill_reference}


def unavailable_reason(device: torch.device) -> str | None:
    return None


def unsupported_reason(op: str, dtype: torch.dtype) -> str | None:
    return None
