"""Argument checks shared by every public entry point (one home; errors name the parameter).

Numbers: Python ``int``/``float``, NumPy scalars and 0-dim real tensors are accepted;
``bool`` is not a number here (``strength=True`` is a bug, not 1.0). Floats must be finite,
and by default also finite in float32 (``1e39`` passes ``math.isfinite`` but becomes
``inf`` the moment a float32 kernel sees it). Every check returns the plain Python value
it validated, so callers store ``float``/``int`` and never a tensor or NumPy scalar.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["FLOAT32_MAX", "check_int", "check_real", "is_real_scalar"]

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value)


def is_real_scalar(value: Any) -> bool:
    """True for a real, non-bool number: ``int``, ``float``, NumPy scalar or 0-dim real tensor."""
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool
    try:
        import numpy as np

        if isinstance(value, np.bool_):
            return False
    except ImportError:  # numpy is a dependency, but never fail a check for its absence
        pass
    return isinstance(value, numbers.Real)


def check_real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    float32: bool = True,
) -> float:
    """``value`` as a Python float, checked to be a finite real in ``[low, high]``.

    ``low_inclusive=False`` makes the lower bound strict (``> low``), likewise ``high``.
    ``float32=True`` (default) also requires ``|value| <= float32 max``: the kernels compute
    in float32. Raises ``TypeError`` for a non-number, ``ValueError`` for a bad value, both
    naming ``name`` and the expected range.
    """
    if not is_real_scalar(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {_describe(value)}")
    x = float(value.item() if isinstance(value, torch.Tensor) else value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x!r}")
    if float32 and abs(x) > FLOAT32_MAX:
        raise ValueError(f"{name} must fit in float32 (|{name}| <= {FLOAT32_MAX:.3e}), got {x!r}")
    lo_ok = low is None or (x >= low if low_inclusive else x > low)
    hi_ok = high is None or (x <= high if high_inclusive else x < high)
    if not (lo_ok and hi_ok):
        lo = "" if low is None else f"{'>=' if low_inclusive else '>'} {low:g}"
        hi = "" if high is None else f"{'<=' if high_inclusive else '<'} {high:g}"
        raise ValueError(f"{name} must be {' and '.join(s for s in (lo, hi) if s)}, got {x!r}")
    return x


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as a Python int in ``[low, high]`` (ints, NumPy integers, 0-dim integer tensors; no bool)."""
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point()
        and not value.is_complex() and value.dtype != torch.bool
    )
    if not integral or not is_real_scalar(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {_describe(value)}")
    x = int(value.item() if isinstance(value, torch.Tensor) else value)
    if (low is not None and x < low) or (high is not None and x > high):
        bounds = " and ".join(s for s in (
            None if low is None else f">= {low}", None if high is None else f"<= {high}") if s)
        raise ValueError(f"{name} must be an int {bounds}, got {x!r}")
    return x
