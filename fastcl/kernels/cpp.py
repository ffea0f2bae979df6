r"""The ``cpp`` backend: CPU kernels of the compiled extension ``fastcl._C`` (C++/OpenMP).

* ``penalty``: ``value = s·Σ_t Σ_k w·φ(θ−a)`` and, with grads, ``grad_t += s·w·φ'(θ−a)``
  (``store=True``: ``grad_t = s·w·φ'(θ−a)``, grads not read), φ = d²/2 or |d|, every
  tensor of the list in one call and one pass over memory. Work is cut into fixed chunks
  of 64K elements spanning all tensors; chunk partial sums are added in chunk order, so
  the value is bitwise the same for any thread count.
* ``distill``: per row ``T²·KL(softmax(t/T) ‖ softmax(s/T))`` and ``grad_scale·T·(softmax(s/T) −
  softmax(t/T))``, rows split over threads, in the ISA variant (baseline, AVX2, AVX-512)
  chosen for this CPU at run time.

θ/grad/logits in float32, bfloat16 or float16; anchors and weights in float32 or
bfloat16; math in float32. The extension takes raw addresses (``data_ptr()``), sizes and
dtype codes, never torch objects, so one build serves every torch version; this module
checks the tensors before passing their addresses. Threads: ``torch.get_num_threads()``.

Importing this module never fails: without the extension, :data:`BUILD_ERROR` says why
and :func:`unavailable_reason` reports it to the dispatcher.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._validate import check_real
from ._checks import DTYPE_CODES, check_tensor, penalty_arguments

try:
    from .. import _C
except ImportError as exc:  # not built (no compiler at install time, or the compile failed)
    _C = None
    BUILD_ERROR: str | None = (
        f"fastcl._C is not available ({type(exc).__name__}: {exc}); "
        "reinstall fastcl with a C++17 compiler to build it"
    )
else:
    BUILD_ERROR = None

__all__ = ["BUILD_ERROR", "OPS", "distill", "penalty", "unavailable_reason", "unsupported_reason"]

_CPU = torch.device("cpu")


def penalty(
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor] | None,
    scale: float,
    kind: str,
    grads: Sequence[torch.Tensor] | None,
    *,
    store: bool = False,
) -> torch.Tensor:
    """``s·Σ w·φ(θ−a)`` as a 0-dim float32 tensor; with ``grads``, ``grads[t] += s·w·φ'(θ−a)``
    (``store=True``: ``grads[t] = s·w·φ'(θ−a)``).

    Called by :func:`fastcl.ops.penalty` (signature and guarantees in its module
    docstring); direct callers get every tensor checked. Anchors and weights in float32
    or bfloat16 (the ops layer sends float64 ones to the torch backend).
    """
    if _C is None:
        raise RuntimeError(BUILD_ERROR)
    if not params:
        return torch.zeros((), dtype=torch.float32)
    args = penalty_arguments(params, anchors, weights, grads, kind, store, _CPU, "cpp")
    value = _C.penalty(*args, float(scale), torch.get_num_threads())
    return torch.tensor(value, dtype=torch.float32)


def distill(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
    grad_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row ``(T²·KL(softmax(t/T) ‖ softmax(s/T)), grad_scale·T·(softmax(s/T) − softmax(t/T)))``.

    ``student``, ``teacher``: ``[R, V]`` contiguous CPU tensors of one dtype; ``mask``:
    ``None`` or ``[R]`` bool (False rows get 0). Returns ``row_loss`` ``[R]`` float32 and
    ``grad`` ``[R, V]`` in the student's dtype (contract in :mod:`fastcl.ops.distill`).
    """
    if _C is None:
        raise RuntimeError(BUILD_ERROR)
    check_tensor("student", student, _CPU, "cpp")
    check_tensor("teacher", teacher, _CPU, "cpp")
    if student.dim() != 2 or student.shape[0] < 1 or student.shape[1] < 1:
        raise ValueError(f"student must be [R, V] with R, V >= 1, got shape {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher has shape {tuple(teacher.shape)} but student has {tuple(student.shape)}")
    if student.dtype not in DTYPE_CODES or teacher.dtype != student.dtype:
        raise TypeError(f"student and teacher must share a dtype in {tuple(DTYPE_CODES)}, got {student.dtype} and {teacher.dtype}")
    temperature = check_real(temperature, "temperature", low=0.0, low_inclusive=False)
    grad_scale = check_real(grad_scale, "grad_scale")
    rows, vocab = student.shape
    if mask is not None:
        if mask.dtype != torch.bool or tuple(mask.shape) != (rows,) or mask.device.type != "cpu":
            raise ValueError(f"mask must be a CPU bool tensor of shape ({rows},), got {mask.dtype} {tuple(mask.shape)} on {mask.device}")
        mask = mask.contiguous()
    row_loss = torch.empty(rows, dtype=torch.float32)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    _C.distill(
        student.data_ptr(),
        teacher.data_ptr(),
        0 if mask is None else mask.data_ptr(),
        row_loss.data_ptr(),
        grad.data_ptr(),
        rows,
        vocab,
        DTYPE_CODES[student.dtype],
        temperature,
        grad_scale,
        torch.get_num_threads(),
    )
    return row_loss, grad


OPS = {"penalty": penalty, "distill": distill}


def unavailable_reason(device: torch.device | str) -> str | None:
    """``None`` when the cpp kernels can run on ``device`` (a CPU with fastcl._C built), else why not."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"the cpp backend runs on CPU tensors only, not {device.type}"
    return BUILD_ERROR


def unsupported_reason(op: str, dtype: torch.dtype) -> str | None:
    """``None`` when ``op`` has a cpp kernel for tensors of ``dtype``, else why not."""
    if op not in OPS:
        return f"the cpp backend has no {op} kernel"
    if dtype not in DTYPE_CODES:
        return f"the cpp backend supports float32, bfloat16 and float16, not {dtype}"
    return None
