r"""The ``cuda`` backend: kernels of the compiled extension ``fastcl._cuda``.

* ``penalty``: ``value = s·Σ_t Σ_k w·φ(θ−a)`` and, with grads, ``grad_t += s·w·φ'(θ−a)``
  (``store=True``: ``grad_t = s·w·φ'(θ−a)``, grads not read), φ = d²/2 or |d|. Two
  launches for any list: a persistent grid of (SMs × resident blocks per SM) blocks
  walks 32K-element chunks of all tensors, with 16-byte loads where a tensor's addresses
  allow them, and writes one partial sum per block; a one-block kernel adds the partials
  in a fixed order, so the value is deterministic. Everything runs on the current stream.

The list travels as a device table of addresses, sizes and chunk offsets (layout in
``csrc/cuda/kernels.h``). Tables are cached by (device, stream, addresses, sizes): a
training loop that passes the same tensors, or gets the same ``.grad`` addresses back
from the caching allocator after ``zero_grad(set_to_none=True)``, uploads nothing; a new
list costs one small asynchronous host-to-device copy from pinned memory, never a sync.

θ/grad in float32, bfloat16 or float16; anchors and weights in float32 or bfloat16; math
in float32. The extension takes raw device addresses, dtype codes, the device index and
the stream handle, never torch objects; this module checks the tensors (unless
:mod:`fastcl.ops` hands over lists it has checked) and allocates scratch with torch
(stream-ordered allocator).

Importing this module never fails: without the extension, :data:`BUILD_ERROR` says why
and :func:`unavailable_reason` reports it to the dispatcher.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
from collections import OrderedDict
from collections.abc import Sequence

import torch

from . import _checks
from ._checks import Tensors, penalty_arguments
from ._extension import load_extension

# Not built when there was no nvcc at install time, FASTCL_BUILD_CUDA=0, or the compile failed.
_cuda, BUILD_ERROR = load_extension(
    "_cuda", "it is built at install time only when nvcc is found (CUDA_HOME or PATH) and FASTCL_BUILD_CUDA is not 0")

__all__ = ["BUILD_ERROR", "OPS", "TABLE_CACHE_SIZE", "penalty", "penalty_table", "unavailable_reason", "unsupported_reason"]

TABLE_CACHE_SIZE = 16  # device tables kept (distinct lists of tensors)
_tables: OrderedDict[tuple, tuple[torch.Tensor, int]] = OrderedDict()


def penalty_table(addresses: Sequence[Sequence[int]], sizes: Sequence[int], chunk: int) -> tuple[list[int], int]:
    """The int64 table of ``csrc/cuda/kernels.h`` (as a list) and the chunk count.

    ``addresses``: the θ, anchor, weight and grad address lists (weights and grads may be
    empty: zeros are stored).
    """
    n = len(sizes)
    chunks = [(s + chunk - 1) // chunk for s in sizes]
    first = [0, *itertools.accumulate(chunks)]
    zeros = [0] * n
    table = [*addresses[0], *addresses[1], *(addresses[2] or zeros), *(addresses[3] or zeros), *sizes, *first]
    return table, first[-1]


def _device_table(addresses, sizes, device: torch.device, stream: int) -> tuple[torch.Tensor, int]:
    key = (device.index, stream, *(tuple(a) for a in addresses), tuple(sizes))
    hit = _tables.get(key)
    if hit is not None:
        with contextlib.suppress(KeyError):  # evicted meanwhile by another thread: still valid
            _tables.move_to_end(key)
        return hit
    host, n_chunks = penalty_table(addresses, sizes, _cuda.PENALTY_CHUNK)
    table = torch.tensor(host, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
    _tables[key] = (table, n_chunks)
    while len(_tables) > TABLE_CACHE_SIZE:
        _tables.popitem(last=False)
    return table, n_chunks


@functools.cache
def _max_partials(index: int) -> int:
    return _cuda.penalty_max_partials(_cuda.multiprocessor_count(index))


def penalty(params: Tensors, anchors: Tensors, weights: Tensors | None, scale: float, form: str, grads: Tensors | None, *,
            store: bool = False) -> torch.Tensor:
    """The penalty kernel of :mod:`fastcl.ops.penalty` (contract there) on one CUDA device: the
    value as a 0-dim float32 tensor on θ's device, computed asynchronously on the current stream.
    """
    if _cuda is None:
        raise RuntimeError(BUILD_ERROR)
    params = params if isinstance(params, list) else list(params)
    if not params:
        return torch.zeros((), dtype=torch.float32)
    device = params[0].device
    if device.type != "cuda":
        raise ValueError(f"params[0] must be a CUDA tensor for the cuda backend, got {device}")
    *addresses, sizes, p_code, a_code, w_code, form_code, mode = penalty_arguments(
        params, anchors, weights, grads, form, store, device, "cuda")
    stream = torch.cuda.current_stream(device).cuda_stream
    table, n_chunks = _device_table(addresses, sizes, device, stream)
    max_partials = _max_partials(device.index)
    scratch = torch.empty(max_partials + 1, dtype=torch.float32, device=device)
    _cuda.penalty(
        table.data_ptr(), len(sizes), n_chunks, p_code, a_code, w_code, form_code, mode, float(scale),
        scratch.data_ptr(), max_partials, scratch.data_ptr() + 4 * max_partials, device.index, stream,
    )
    return scratch[max_partials]


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
    return _checks.unsupported_reason("cuda", OPS, op, dtype)
