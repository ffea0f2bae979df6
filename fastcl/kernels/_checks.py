"""Checks in front of the raw-pointer kernels (fastcl._C, fastcl._cuda).

Those kernels trust every address and size they are given, so a wrong list would corrupt
memory instead of raising. :func:`fastcl.ops.penalty` already guarantees all of this;
these checks keep direct callers of the backend modules safe too.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

__all__ = ["check_tensor", "check_list"]


def check_tensor(label: str, t: torch.Tensor, device: torch.device, backend: str) -> None:
    """``t`` is a contiguous tensor on ``device`` (device type only, for ``cpu``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device if device.type != "cpu" else t.device.type != "cpu":
        raise ValueError(f"{label} is on {t.device}; the {backend} backend needs every tensor on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{label} must be contiguous for the {backend} backend")


def check_list(
    label: str,
    tensors: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    device: torch.device,
    dtypes: Iterable[torch.dtype],
    backend: str,
) -> torch.dtype:
    """Every tensor checked, shapes equal to ``params`` position-wise, one dtype in ``dtypes``; returns it."""
    if len(tensors) != len(params):
        raise ValueError(f"{label} has {len(tensors)} tensors but params has {len(params)}")
    dtype = tensors[0].dtype
    for i, (t, p) in enumerate(zip(tensors, params)):
        check_tensor(f"{label}[{i}]", t, device, backend)
        if t.dtype != dtype:
            raise TypeError(f"{label}[{i}] has dtype {t.dtype} but {label}[0] has {dtype}; one dtype per list")
        if t.shape != p.shape:
            raise ValueError(f"{label}[{i}] has shape {tuple(t.shape)} but params[{i}] has {tuple(p.shape)}")
    dtypes = tuple(dtypes)
    if dtype not in dtypes:
        raise TypeError(f"{label} must have dtype in {dtypes}, got {dtype}")
    return dtype
