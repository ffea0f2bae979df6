"""The raw-pointer interface shared by the compiled kernels (fastcl._C, fastcl._cuda).

Those kernels trust every address and size they are given, so a wrong list would corrupt
memory instead of raising. :func:`fastcl.ops.penalty` already guarantees all of this;
these checks keep direct callers of the backend modules safe too. The codes are those of
``csrc/cpu/kernels.h`` and ``csrc/cuda/kernels.h``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["DTYPE_CODES", "STORAGE_CODES", "KIND_CODES", "check_tensor", "check_list", "float64_storage", "penalty_arguments"]

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # θ and grad
STORAGE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # anchors and weights
KIND_CODES = {"quadratic": 0, "l1": 1}
NO_WEIGHTS = -1


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


def float64_storage(anchors, weights) -> bool:
    """Anchors or weights in float64 (allowed beside float32 θ): the kernels leave those to the reference."""
    return any(seq is not None and seq and seq[0].dtype == torch.float64 for seq in (anchors, weights))


def penalty_arguments(params, anchors, weights, grads, kind: str, device: torch.device, backend: str) -> tuple:
    """Validate and return the kernels' leading arguments.

    ``(param_ptrs, anchor_ptrs, weight_ptrs, grad_ptrs, sizes, param_code, anchor_code,
    weight_code, kind_code)``; empty weight/grad lists mean "unweighted"/"value only".
    """
    if kind not in KIND_CODES:
        raise ValueError(f"kind must be one of {tuple(KIND_CODES)}, got {kind!r}")
    p_dtype = check_list("params", params, params, device, DTYPE_CODES, backend)
    a_dtype = check_list("anchors", anchors, params, device, STORAGE_CODES, backend)
    w_dtype = None if weights is None else check_list("weights", weights, params, device, STORAGE_CODES, backend)
    if grads is not None:
        check_list("grads", grads, params, device, (p_dtype,), backend)
    return (
        [p.data_ptr() for p in params],
        [a.data_ptr() for a in anchors],
        [] if weights is None else [w.data_ptr() for w in weights],
        [] if grads is None else [g.data_ptr() for g in grads],
        [p.numel() for p in params],
        DTYPE_CODES[p_dtype],
        STORAGE_CODES[a_dtype],
        NO_WEIGHTS if w_dtype is None else STORAGE_CODES[w_dtype],
        KIND_CODES[kind],
    )
