"""The raw-pointer interface shared by the compiled kernels (fastcl._C, fastcl._cuda).

Those kernels trust every address and size they are given, so a wrong list would corrupt
memory instead of raising. Direct callers of the backend modules get every tensor checked
here. :func:`fastcl.ops.penalty` validates its lists itself (once per distinct list, see
its module docstring) and hands them over as :class:`CheckedTensors`, which carry the
addresses it computed: the wrappers then skip the checks. The integer codes are those of
``csrc/common/codes.h`` (a test compares the two).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "Tensors",
    "DTYPE_CODES",
    "STORAGE_CODES",
    "FORM_CODES",
    "GRAD_MODES",
    "NO_WEIGHTS",
    "CheckedTensors",
    "check_tensor",
    "check_list",
    "penalty_arguments",
    "unsupported_reason",
]

Tensors = Sequence[torch.Tensor]
"""A list argument of the kernels (params, anchors, weights, grads)."""

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # θ, grads, logits
STORAGE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # anchors and weights
FORM_CODES = {"quadratic": 0, "l1": 1}
GRAD_MODES = {"value": 0, "accumulate": 1, "store": 2}
NO_WEIGHTS = -1


class CheckedTensors(list):
    """A list of tensors that :mod:`fastcl.ops` has validated, with their ``data_ptr()``\\ s.

    Built only by the ops layer, right before it calls a kernel: every tensor is
    contiguous (or a flat view of a dense one), on the group's device, of one dtype, with
    the element counts of ``sizes`` (the params list's), and the grads among them do not
    overlap anything. ``addresses[i]`` is ``self[i].data_ptr()``.
    """

    __slots__ = ("addresses", "sizes")

    def __init__(self, tensors: Iterable[torch.Tensor], addresses: Sequence[int], sizes: Sequence[int]):
        super().__init__(tensors)
        self.addresses = addresses
        self.sizes = sizes


def check_tensor(label: str, t: torch.Tensor, device: torch.device, backend: str) -> None:
    """``t`` is a dense, contiguous tensor on ``device`` (device type only, for ``cpu``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{label} is a {t.layout} tensor; the {backend} backend needs dense (strided) tensors")
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


def _checked(*lists) -> bool:
    return all(seq is None or type(seq) is CheckedTensors for seq in lists)


def penalty_arguments(params, anchors, weights, grads, form: str, store: bool, device: torch.device, backend: str) -> tuple:
    """The kernels' leading arguments, from checked lists or after checking every tensor.

    ``(param_ptrs, anchor_ptrs, weight_ptrs, grad_ptrs, sizes, param_code, anchor_code,
    weight_code, form_code, grad_mode)``; empty weight/grad address lists mean
    "unweighted"/"value only". ``store`` needs ``grads``.
    """
    if form not in FORM_CODES:
        raise ValueError(f"form must be one of {tuple(FORM_CODES)}, got {form!r}")
    if store and grads is None:
        raise ValueError("store=True needs grads (the tensors the gradient is stored into)")
    if _checked(params, anchors, weights, grads):
        p_dtype, a_dtype = params[0].dtype, anchors[0].dtype
        w_dtype = None if weights is None else weights[0].dtype
        sizes = params.sizes
    else:
        p_dtype = check_list("params", params, params, device, DTYPE_CODES, backend)
        a_dtype = check_list("anchors", anchors, params, device, STORAGE_CODES, backend)
        w_dtype = None if weights is None else check_list("weights", weights, params, device, STORAGE_CODES, backend)
        if grads is not None:
            check_list("grads", grads, params, device, (p_dtype,), backend)
        sizes = [p.numel() for p in params]
    addresses = [seq.addresses if type(seq) is CheckedTensors else [t.data_ptr() for t in seq]
                 for seq in (params, anchors, weights or (), grads or ())]
    mode = GRAD_MODES["value" if grads is None else "store" if store else "accumulate"]
    return (
        *addresses,
        sizes,
        DTYPE_CODES[p_dtype],
        STORAGE_CODES[a_dtype],
        NO_WEIGHTS if w_dtype is None else STORAGE_CODES[w_dtype],
        FORM_CODES[form],
        mode,
    )


def unsupported_reason(backend: str, ops: Iterable[str], op: str, dtype: torch.dtype) -> str | None:
    """A compiled backend's answer to the dispatcher: ``None`` when ``op`` is among its ``ops``
    and ``dtype`` has a code, else why not."""
    if op not in ops:
        return f"the {backend} backend has no {op} kernel"
    if dtype not in DTYPE_CODES:
        return f"the {backend} backend supports float32, bfloat16 and float16, not {dtype}"
    return None
