r"""The ``cuda`` backend: kernels of the compiled extension ``fastcl._cuda``.

* ``penalty``: ``value = s·Σ_t Σ_k w·φ(θ−a)`` and, with grads, ``grad_t += s·w·φ'(θ−a)``
  (φ = d²/2 or |d|). A multi-tensor kernel: the tensor list travels in the kernel
  arguments (up to 36 tensors and 320 blocks per launch, more launches for longer
  lists), each block handles a chunk of one tensor with 4-wide loads where aligned and
  writes one partial sum; a one-block kernel adds the partials in a fixed order, so the
  value is deterministic. Everything runs on the current CUDA stream.

θ/grad in float32, bfloat16 or float16; anchors and weights in float32 or bfloat16; math
in float32. The extension takes raw device addresses, sizes, dtype codes, the device
index and the stream handle, never torch objects; this module checks the tensors and
allocates the scratch buffer of partial sums with torch (stream-ordered allocator).

Importing this module never fails: without the extension, :data:`BUILD_ERROR` says why
and :func:`unavailable_reason` reports it to the dispatcher.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ._checks import DTYPE_CODES, float64_storage, penalty_arguments

try:
    from .. import _cuda
except ImportError as exc:  # not built (no nvcc at install time, FASTCL_BUILD_CUDA=0, or a failed compile)
    _cuda = None
    BUILD_ERROR: str | None = (
        f"fastcl._cuda is not available ({type(exc).__name__}: {exc}); it is built at install time "
        "only when nvcc is found (CUDA_HOME or PATH) and FASTCL_BUILD_CUDA is not 0"
    )
else:
    BUILD_ERROR = None

__all__ = ["BUILD_ERROR", "OPS", "penalty", "unavailable_reason", "unsupported_reason"]


def penalty(
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor] | None,
    scale: float,
    kind: str,
    grads: Sequence[torch.Tensor] | None,
) -> torch.Tensor:
    """``s·Σ w·φ(θ−a)`` as a 0-dim float32 tensor on θ's device; with ``grads``, ``grads[t] += s·w·φ'(θ−a)``.

    Called by :func:`fastcl.ops.penalty` (signature and guarantees in its module
    docstring). Asynchronous on the current stream. Anchors or weights stored in float64
    take the reference path.
    """
    if _cuda is None:
        raise RuntimeError(BUILD_ERROR)
    params = list(params)
    if not params:
        return torch.zeros((), dtype=torch.float32)
    device = params[0].device
    if device.type != "cuda":
        raise ValueError(f"params[0] must be a CUDA tensor for the cuda backend, got {device}")
    if float64_storage(anchors, weights):
        from ..ops.penalty import penalty_reference

        return penalty_reference(params, anchors, weights, scale, kind, grads)
    args = penalty_arguments(params, anchors, weights, grads, kind, device, "cuda")
    sizes = args[4]
    num_partials = _cuda.penalty_num_partials(sizes)
    partials = torch.empty(max(num_partials, 1), dtype=torch.float32, device=device)
    out = torch.empty((), dtype=torch.float32, device=device)
    _cuda.penalty(
        *args,
        float(scale),
        partials.data_ptr(),
        num_partials,
        out.data_ptr(),
        device.index,
        torch.cuda.current_stream(device).cuda_stream,
    )
    return out


OPS = {"penalty": penalty}


@functools.lru_cache(maxsize=1)
def _runtime_error() -> str | None:
    """Why the extension's own CUDA runtime cannot start (checked once, on first use), or None."""
    try:
        count = _cuda.device_count()
    except RuntimeError as exc:  # e.g. a driver older than the toolkit fastcl._cuda was built with
        return str(exc)
    return None if count > 0 else "the CUDA runtime of fastcl._cuda sees no device"


def unavailable_reason(device: torch.device | str) -> str | None:
    """``None`` when the cuda kernels can run on ``device`` (a CUDA device with fastcl._cuda built), else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors only, not {device.type}"
    return BUILD_ERROR or _runtime_error()


def unsupported_reason(op: str, dtype: torch.dtype) -> str | None:
    """``None`` when ``op`` has a cuda kernel for tensors of ``dtype``, else why not."""
    if op not in OPS:
        return f"the cuda backend has no {op} kernel"
    if dtype not in DTYPE_CODES:
        return f"the cuda backend supports float32, bfloat16 and float16, not {dtype}"
    return None
