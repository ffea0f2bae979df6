r"""Triton anchored penalty: value and gradient over a whole list of tensors in one launch.

Math (contract in :mod:`fastcl.ops.penalty`; ``s`` = scale, φ(d) = d²/2 or |d|)::

    value   = s · Σ_t Σ_k w_tk · φ(θ_tk − a_tk)
    grad_t += s · w_t · φ'(θ_t − a_t)

Multi-tensor launch. The list is flattened into *chunks* of ``CHUNK`` elements: chunk
``c`` is ``(tensor index, start offset)``. One int64 table carries, per tensor, the
addresses of θ, a, w, grad and the element count, followed by the chunk list. A single
persistent kernel runs ``G = min(n_chunks, programs per device)`` programs; program ``p``
walks chunks ``p, p+G, p+2G, …``, loads the tensor's addresses from the table and
casts them to typed pointers (``int64 → pointer_type(dtype)``, a bitcast), so any number
of tensors of any sizes costs one launch. Each program keeps a ``[BLOCK]`` float32
accumulator and writes one partial sum; a one-program cleanup kernel sums the ``G``
partials in a fixed order and applies ``s``. No float atomics, so the value is bitwise
reproducible for a given list and device.

The table depends only on the addresses and sizes, so it is cached (a small LRU keyed
by them): a training loop that calls the penalty every step with the same parameters,
anchors, importances and ``.grad`` buffers pays for one host-to-device copy once.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from functools import cache

import torch
import triton
import triton.language as tl

__all__ = ["penalty", "BLOCK", "CHUNK", "NUM_WARPS", "PROGRAMS_PER_SM", "INTERPRETER_PROGRAMS", "REDUCE_BLOCK", "TABLE_CACHE_SIZE"]

# Tunables (H100 defaults). CHUNK must be a multiple of BLOCK.
BLOCK = 1024            # elements per vector step of one program
CHUNK = 16384           # elements per work item (chunk) of the chunk list
NUM_WARPS = 4           # warps per program of the main kernel
PROGRAMS_PER_SM = 8     # persistent grid: at most this many programs per SM
INTERPRETER_PROGRAMS = 4  # persistent grid size under TRITON_INTERPRET=1 (CPU)
REDUCE_BLOCK = 1024     # vector width of the cleanup reduction
TABLE_CACHE_SIZE = 16   # cached chunk tables (distinct lists of tensors)

# Element types as small integers (constexpr), turned into pointer types in the kernel.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


@triton.jit
def _typed_pointer(address, CODE: tl.constexpr):
    """Reinterpret an int64 address as a pointer to the element type coded by ``CODE``."""
    if CODE == 0:
        ptr = address.to(tl.pointer_type(tl.float32), bitcast=True)
    elif CODE == 1:
        ptr = address.to(tl.pointer_type(tl.bfloat16), bitcast=True)
    elif CODE == 2:
        ptr = address.to(tl.pointer_type(tl.float16), bitcast=True)
    else:
        ptr = address.to(tl.pointer_type(tl.float64), bitcast=True)
    return ptr


@triton.jit
def _penalty_step(theta, anchor, weight, grad, idx, inside, acc, grad_scale,
                  HAS_WEIGHTS: tl.constexpr, HAS_GRADS: tl.constexpr, L1: tl.constexpr, MASKED: tl.constexpr):
    """Add ``w·φ(d)`` (φ without the ½) for lanes ``idx`` to ``acc``; update the gradient."""
    if MASKED:
        raw = tl.load(theta + idx, mask=inside, other=0.0)
        d = raw.to(tl.float32) - tl.load(anchor + idx, mask=inside, other=0.0).to(tl.float32)
    else:
        raw = tl.load(theta + idx)
        d = raw.to(tl.float32) - tl.load(anchor + idx).to(tl.float32)
    if L1:
        phi = tl.abs(d)
        slope = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    else:
        phi = d * d
        slope = d
    if HAS_WEIGHTS:
        if MASKED:
            w = tl.load(weight + idx, mask=inside, other=0.0).to(tl.float32)
        else:
            w = tl.load(weight + idx).to(tl.float32)
        acc += w * phi
        slope = w * slope
    else:
        acc += phi
    if HAS_GRADS:
        if MASKED:
            old = tl.load(grad + idx, mask=inside, other=0.0).to(tl.float32)
            tl.store(grad + idx, (old + grad_scale * slope).to(raw.dtype), mask=inside)
        else:
            old = tl.load(grad + idx).to(tl.float32)
            tl.store(grad + idx, (old + grad_scale * slope).to(raw.dtype))
    return acc


@triton.jit
def _penalty_kernel(
    table_ptr,          # int64: [5, N] (θ, a, w, grad addresses; numel) then chunk tensor ids, chunk starts
    partial_ptr,        # float32 [G]
    n_tensors,
    n_chunks,
    grad_scale,         # s (float32)
    P_CODE: tl.constexpr,
    A_CODE: tl.constexpr,
    W_CODE: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_GRADS: tl.constexpr,
    L1: tl.constexpr,
    ALIGNED: tl.constexpr,      # every address is a multiple of 16 bytes (allows vector loads)
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    chunk_tensor_ptr = table_ptr + 5 * n_tensors
    chunk_start_ptr = chunk_tensor_ptr + n_chunks
    for c in range(pid, n_chunks, n_programs):
        t = tl.load(chunk_tensor_ptr + c)
        start = tl.load(chunk_start_ptr + c)
        numel = tl.load(table_ptr + 4 * n_tensors + t)
        theta = _typed_pointer(tl.load(table_ptr + t), P_CODE)
        anchor = _typed_pointer(tl.load(table_ptr + n_tensors + t), A_CODE)
        weight = _typed_pointer(tl.load(table_ptr + 2 * n_tensors + t), W_CODE)
        grad = _typed_pointer(tl.load(table_ptr + 3 * n_tensors + t), P_CODE)
        if ALIGNED:
            theta = tl.multiple_of(theta, 16)
            anchor = tl.multiple_of(anchor, 16)
            weight = tl.multiple_of(weight, 16)
            grad = tl.multiple_of(grad, 16)
        n_here = tl.minimum(numel - start, CHUNK)
        n_full = n_here // BLOCK
        # Whole blocks without a mask (vectorisable), then one masked tail.
        for b in range(0, n_full):
            idx = tl.multiple_of(start + b * BLOCK, BLOCK) + lanes
            acc = _penalty_step(theta, anchor, weight, grad, idx, None, acc, grad_scale,
                                HAS_WEIGHTS, HAS_GRADS, L1, False)
        tail = n_full * BLOCK
        if tail < n_here:
            idx = start + tail + lanes
            acc = _penalty_step(theta, anchor, weight, grad, idx, idx < start + n_here, acc, grad_scale,
                                HAS_WEIGHTS, HAS_GRADS, L1, True)
    total = tl.sum(acc, axis=0)
    if not L1:
        total = 0.5 * total
    tl.store(partial_ptr + pid, total)


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    """``out = scale · Σ partial`` by one program, in a fixed order."""
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, n, BLOCK):
        acc += tl.load(partial_ptr + off + lanes, mask=off + lanes < n, other=0.0)
    tl.store(out_ptr, scale * tl.sum(acc, axis=0))


def _on(device: torch.device):
    """Make ``device`` current for a launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _max_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return _sm_count(device) * PROGRAMS_PER_SM


_tables: OrderedDict[tuple, tuple[torch.Tensor, int, bool]] = OrderedDict()


def _chunk_table(lists, numels: Sequence[int], device: torch.device) -> tuple[torch.Tensor, int, bool]:
    """Build (or fetch) the int64 table ``[addresses ×4, numels, chunk tensor ids, chunk starts]``.

    Also returns the chunk count and whether every address is 16-byte aligned.
    """
    addresses = [tuple(x.data_ptr() for x in seq) if seq is not None else None for seq in lists]
    key = (device, CHUNK, tuple(numels), *addresses)
    hit = _tables.get(key)
    if hit is not None:
        try:
            _tables.move_to_end(key)
        except KeyError:  # evicted meanwhile by another thread; the table is still valid
            pass
        return hit
    n = len(numels)
    zeros = (0,) * n
    head = torch.tensor(
        [a if a is not None else zeros for a in addresses] + [tuple(numels)], dtype=torch.int64
    ).reshape(-1)
    sizes = torch.tensor(numels, dtype=torch.int64)
    per_tensor = (sizes + CHUNK - 1) // CHUNK
    n_chunks = int(per_tensor.sum())
    tensor_ids = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), per_tensor)
    first_chunk = torch.cumsum(per_tensor, 0) - per_tensor
    starts = (torch.arange(n_chunks, dtype=torch.int64) - first_chunk[tensor_ids]) * CHUNK
    table = torch.cat([head, tensor_ids, starts]).to(device)
    aligned = all(a % 16 == 0 for seq in addresses if seq is not None for a in seq)
    _tables[key] = (table, n_chunks, aligned)
    if len(_tables) > TABLE_CACHE_SIZE:
        _tables.popitem(last=False)
    return table, n_chunks, aligned


def penalty(
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor] | None,
    scale: float,
    kind: str,
    grads: Sequence[torch.Tensor] | None,
) -> torch.Tensor:
    """``s·Σ w·φ(θ−a)`` as a 0-dim float32 tensor; with ``grads``, ``grads[t] += s·w·φ'(θ−a)``.

    Inputs as guaranteed by :func:`fastcl.ops.penalty`: equal-length non-empty lists of
    non-empty contiguous tensors on one device, one dtype per list.
    """
    device = params[0].device
    numels = [p.numel() for p in params]
    table, n_chunks, aligned = _chunk_table((params, anchors, weights, grads), numels, device)
    n_programs = min(n_chunks, _max_programs(device))
    partials = torch.empty(n_programs, dtype=torch.float32, device=device)
    out = torch.empty((), dtype=torch.float32, device=device)
    with _on(device):
        _penalty_kernel[(n_programs,)](
            table,
            partials,
            len(numels),
            n_chunks,
            float(scale),
            P_CODE=_DTYPE_CODES[params[0].dtype],
            A_CODE=_DTYPE_CODES[anchors[0].dtype],
            W_CODE=_DTYPE_CODES[weights[0].dtype] if weights is not None else 0,
            HAS_WEIGHTS=weights is not None,
            HAS_GRADS=grads is not None,
            L1=kind == "l1",
            ALIGNED=aligned,
            BLOCK=BLOCK,
            CHUNK=CHUNK,
            num_warps=NUM_WARPS,
        )
        _sum_partials_kernel[(1,)](partials, out, n_programs, float(scale), BLOCK=REDUCE_BLOCK, num_warps=4)
    return out
