"""The ``triton`` backend: Triton kernels for penalty, sqgrad and distill.

A backend module in the sense of :mod:`fastcl.ops._dispatch`. Importing it imports
Triton (an ``ImportError`` here just means "backend unavailable"); ``import fastcl``
never does. Kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1``
was set before this module was first imported (Triton fixes the mode when it decorates
the kernels). Float64 is left to the other backends.

Tunables (module attributes, read at every call; H100 defaults):

* :mod:`.penalty`: ``BLOCK``, ``CHUNK``, ``NUM_WARPS``, ``PROGRAMS_PER_SM``, ``REDUCE_BLOCK``,
  ``INTERPRETER_PROGRAMS``, ``TABLE_CACHE_SIZE``
* :mod:`.sqgrad`: ``BLOCK_O``, ``BLOCK_I``, ``BLOCK_T`` (upper bounds; :func:`.sqgrad.tiles_for`
  picks tiles from O, I and T), ``NUM_STAGES``, ``TARGET_WARPS_PER_SM``,
  ``MAX_BATCH_SPLITS``, ``FP32_INPUT_PRECISION``
* :mod:`.distill`: ``MAX_BLOCK_V``, ``num_warps_for(block_v)``

Each kernel module also has ``plan(...)``, the :class:`._launch.Launch` its launcher
would run for given inputs; ``tests/kernels/test_aot_compile.py`` compiles those plans
for sm_80 and sm_90 without a GPU.

Capabilities the op layers check: :data:`PENALTY_STORE` (the penalty kernel takes
``store=True``) and :data:`DISTILL_GRAD_SCALE` (the distill kernel takes ``grad_scale``).
"""
from __future__ import annotations

import torch
import triton  # noqa: F401  (fails here, not later, when Triton is missing)

from ..._dtypes import REDUCED_DTYPES
from . import distill as _distill
from . import penalty as _penalty
from . import sqgrad as _sqgrad
from ._launch import interpreted

__all__ = ["OPS", "INTERPRETED", "PENALTY_STORE", "DISTILL_GRAD_SCALE", "unavailable_reason", "unsupported_reason"]

OPS = {"penalty": _penalty.penalty, "sqgrad": _sqgrad.sqgrad, "distill": _distill.distill}

#: True when the kernels were decorated under ``TRITON_INTERPRET=1`` (they run on the CPU).
INTERPRETED = interpreted(_penalty._penalty_kernel)

#: ``OPS["penalty"](..., store=True)`` writes ``grads[t] = s·w·φ'(θ−a)`` without reading them.
PENALTY_STORE = True

#: ``OPS["distill"](student, teacher, temperature, mask, grad_scale)`` scales the gradient.
DISTILL_GRAD_SCALE = True

_SUPPORTED_DTYPES = (torch.float32, *REDUCED_DTYPES)


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` when the kernels can run on ``device``, else why not."""
    device = torch.device(device)
    if INTERPRETED:
        if device.type == "cpu":
            return None
        return (
            f"Triton is in interpreter mode (TRITON_INTERPRET=1), which runs these kernels on CPU "
            f"tensors only, not on {device.type}"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "Triton needs a CUDA device, and torch.cuda.is_available() is False"
        return None
    if device.type == "cpu":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 set before fastcl.kernels.triton is imported"
    return f"Triton kernels run on cuda devices only, not on {device.type}"


def unsupported_reason(op: str, dtype: torch.dtype) -> str | None:
    """``None`` when ``op`` has a Triton kernel for inputs of ``dtype``, else why not."""
    if op not in OPS:
        return f"the triton backend has no {op} kernel"
    if dtype not in _SUPPORTED_DTYPES:
        return (
            f"the Triton {op} kernel supports float32, bfloat16 and float16, not {dtype} "
            "(float64 runs on the torch or cpp backend)"
        )
    return None
