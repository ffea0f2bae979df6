r"""The ``cpp`` backend: CPU kernels of the compiled extension ``fastcl._C`` (C++/OpenMP).

* ``penalty``: ``value = s·Σ_t Σ_k w·φ(θ−a)`` and, with grads, ``grad_t += s·w·φ'(θ−a)``
  (``store=True``: ``grad_t = s·w·φ'(θ−a)``, grads not read), φ = d²/2 or |d|, every
  tensor of the list in one call and one pass over memory. Work is cut into fixed chunks
  of 64K elements spanning all tensors; chunk partial sums are added in chunk order, so
  the value is bitwise the same for any thread count.
* ``distill``: per row ``T²·KL(softmax(t/T) ‖ softmax(s/T))`` and ``grad_scale·T·(softmax(s/T) −
  softmax(t/T))``, rows split over threads, in the ISA variant (baseline, AVX2, AVX-512)
  chosen for this CPU at run time.
* ``sqgrad``: ``out[o, i] += Σ_b |Σ_t g[b,t,o]·x[b,t,i]|^p``: a per-sample GEMM whose register
  tiles square and accumulate before anything reaches memory (no ``[B, O, I]`` intermediate),
  inputs read with any strides; tasks own disjoint output tiles and sum samples in order, so
  the result is the same for any thread count.

θ/grad/logits in float32, bfloat16 or float16; anchors and weights in float32 or
bfloat16; math in float32. The extension takes raw addresses (``data_ptr()``), sizes and
dtype codes, never torch objects, so one build serves every torch version; this module
checks the tensors before passing their addresses. Threads: ``torch.get_num_threads()``.

Importing this module never fails: without the extension, :data:`BUILD_ERROR` says why
and :func:`unavailable_reason` reports it to the dispatcher.
"""
from __future__ import annotations

import torch

from .._validate import check_real
from . import _checks
from ._checks import DTYPE_CODES, Tensors, check_tensor, penalty_arguments
from ._extension import load_extension

# Not built when there was no compiler at install time, or the compile failed.
_C, BUILD_ERROR = load_extension("_C", "reinstall fastcl with a C++17 compiler to build it")

__all__ = ["BUILD_ERROR", "OPS", "distill", "penalty", "sqgrad", "unavailable_reason", "unsupported_reason"]

_CPU = torch.device("cpu")


def penalty(params: Tensors, anchors: Tensors, weights: Tensors | None, scale: float, form: str, grads: Tensors | None, *,
            store: bool = False) -> torch.Tensor:
    """The penalty kernel of :mod:`fastcl.ops.penalty` (contract there) on CPU: the value as a
    0-dim float32 tensor. Lists the ops layer did not check are checked here.
    """
    if _C is None:
        raise RuntimeError(BUILD_ERROR)
    if not params:
        return torch.zeros((), dtype=torch.float32)
    args = penalty_arguments(params, anchors, weights, grads, form, store, _CPU, "cpp")
    value = _C.penalty(*args, float(scale), torch.get_num_threads())
    return torch.tensor(value, dtype=torch.float32)


def distill(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None = None,
            grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
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


def sqgrad(x: torch.Tensor, g: torch.Tensor, out: torch.Tensor, power: int, *, isa: int = -1) -> torch.Tensor:
    """``out += Σ_b |Σ_t g[b,t]ᵀ x[b,t]|^power`` (contract in :mod:`fastcl.ops.sqgrad`).

    ``x [B, T, I]``, ``g [B, T, O]``: CPU tensors of one dtype (float32, bfloat16, float16),
    any strides; ``out [O, I]``: contiguous float32. ``isa`` (tests): -1 the widest variant
    this CPU supports, else 0 baseline, 1 AVX2, 2 AVX-512.
    """
    if _C is None:
        raise RuntimeError(BUILD_ERROR)
    for label, t in (("x", x), ("g", g), ("out", out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"{label} is on {t.device}; the cpp backend needs CPU tensors")
    if x.dim() != 3 or g.dim() != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(f"x and g must be [B, T, I] and [B, T, O], got {tuple(x.shape)} and {tuple(g.shape)}")
    if x.dtype not in DTYPE_CODES or g.dtype != x.dtype:
        raise TypeError(f"x and g must share a dtype in {tuple(DTYPE_CODES)}, got {x.dtype} and {g.dtype}")
    B, T, I = x.shape
    O = g.shape[2]
    if out.dtype != torch.float32 or tuple(out.shape) != (O, I) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 [{O}, {I}] tensor, got {out.dtype} {tuple(out.shape)}")
    if power not in (1, 2):
        raise ValueError(f"power must be 2 or 1, got {power!r}")
    if B and T and I and O:
        _C.sqgrad(x.data_ptr(), g.data_ptr(), out.data_ptr(), B, T, I, O, list(x.stride()), list(g.stride()),
                  DTYPE_CODES[x.dtype], int(power), torch.get_num_threads(), int(isa))
    return out


OPS = {"penalty": penalty, "distill": distill, "sqgrad": sqgrad}


def unavailable_reason(device: torch.device | str) -> str | None:
    """``None`` when the cpp kernels can run on ``device`` (a CPU with fastcl._C built), else why not."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"the cpp backend runs on CPU tensors only, not {device.type}"
    return BUILD_ERROR


def unsupported_reason(op: str, dtype: torch.dtype) -> str | None:
    """``None`` when ``op`` has a cpp kernel for tensors of ``dtype``, else why not."""
    return _checks.unsupported_reason("cpp", OPS, op, dtype)
