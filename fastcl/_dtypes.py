"""The one dtype rule of fastcl: float64 stays float64, everything else accumulates in float32.

Every op, rule and strategy accumulates sums, importances and penalty values in
:func:`acc_dtype` of its inputs: float32 for float32 / bfloat16 / float16 data (the
reduced formats never accumulate in themselves), float64 for float64 data (so float64
models and the float64 references stay float64 end to end).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["FLOAT_DTYPES", "REDUCED_DTYPES", "acc_dtype", "acc_dtype_of"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCED_DTYPES = (torch.bfloat16, torch.float16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for data of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_dtype_of(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """Accumulation dtype for a sum over several tensors: float64 if any is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
