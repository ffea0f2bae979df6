r"""Triton anchored penalty: value and gradient over a whole list of tensors in one launch.

Math (contract in :mod:`fastcl.ops.penalty`; ``s`` = scale, φ(d) = d²/2 or |d|)::

    value   = s · Σ_t Σ_k w_tk · φ(θ_tk − a_tk)
    grad_t += s · w_t · φ'(θ_t − a_t)

Multi-tensor launch. The list is flattened into *chunks* of ``CHUNK`` elements: chunk
``c`` is ``(tensor index, start offset)``. One int64 table carries, per tensor, the
addresses of θ, a, w, grad, the element count and the head (below), followed by the chunk list. A single
persistent kernel runs ``G = min(n_chunks, programs per device)`` programs; program ``p``
walks chunks ``p, p+G, p+2G, …``, loads the tensor's addresses from the table and
casts them to typed pointers (``int64 → pointer_type(dtype)``, a bitcast), so any number
of tensors of any sizes costs one launch. Each program keeps a ``[BLOCK]`` float32
accumulator and writes one partial sum; a one-program cleanup kernel sums the ``G``
partials in a fixed order and applies ``s``. No float atomics, so the value is bitwise
reproducible for a given list and device.

With ``store=True`` the gradient is written instead of accumulated
(``grad_t = s · w_t · φ'(θ_t − a_t)``, ``grad_t`` never read), so ``.grad`` buffers can
come from ``torch.empty``.

Alignment is decided per tensor. The table also carries each tensor's *head*: the first
element index at which θ, a, w and grad (those present) all sit on a 16-byte boundary,
or −1 when no index does (e.g. θ aligned but its anchor a view at an odd offset of a
flat buffer), and then the same for θ and grad alone. A chunk of a tensor with a head
peels those few elements with masked loads and walks the rest with 16-byte vector loads
(of all four, or of θ and grad only); a tensor with neither is walked element-wise. One
misaligned tensor never makes the others scalar.

The table depends only on the addresses, sizes and dtypes, so it is cached (a small LRU
keyed by them): a training loop that calls the penalty every step with the same
parameters, anchors, importances and ``.grad`` buffers pays for one host-to-device copy
once.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..._dtypes import acc_dtype
from .._checks import Tensors
from ._launch import Launch, sm_count

__all__ = ["penalty", "plan", "BLOCK", "CHUNK", "NUM_WARPS", "PROGRAMS_PER_SM", "INTERPRETER_PROGRAMS", "REDUCE_BLOCK", "TABLE_CACHE_SIZE"]

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
def _penalty_terms(theta, anchor, weight, grad, idx, inside, grad_scale,
                   HAS_WEIGHTS: tl.constexpr, GRAD_MODE: tl.constexpr, L1: tl.constexpr, MASKED: tl.constexpr):
    """``w·φ(d)`` (φ without the ½) for lanes ``idx``, and the gradient written for them."""
    if MASKED:
        raw = tl.load(theta + idx, mask=inside, other=0.0)
        d = raw.to(tl.float32) - tl.load(anchor + idx, mask=inside, other=0.0).to(tl.float32)
    else:
        raw = tl.load(theta + idx)
        d = raw.to(tl.float32) - tl.load(anchor + idx).to(tl.float32)
    if L1:
        terms = tl.abs(d)
        slope = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    else:
        terms = d * d
        slope = d
    if HAS_WEIGHTS:
        if MASKED:
            w = tl.load(weight + idx, mask=inside, other=0.0).to(tl.float32)
        else:
            w = tl.load(weight + idx).to(tl.float32)
        terms = w * terms
        slope = w * slope
    if GRAD_MODE == 1:      # accumulate: grad += s·w·φ'
        if MASKED:
            old = tl.load(grad + idx, mask=inside, other=0.0).to(tl.float32)
            tl.store(grad + idx, (old + grad_scale * slope).to(raw.dtype), mask=inside)
        else:
            old = tl.load(grad + idx).to(tl.float32)
            tl.store(grad + idx, (old + grad_scale * slope).to(raw.dtype))
    elif GRAD_MODE == 2:    # store: grad = s·w·φ' (grad is not read)
        if MASKED:
            tl.store(grad + idx, (grad_scale * slope).to(raw.dtype), mask=inside)
        else:
            tl.store(grad + idx, (grad_scale * slope).to(raw.dtype))
    return terms


@triton.jit
def _penalty_span(theta, anchor, weight, grad, n, acc, grad_scale,
                  HAS_WEIGHTS: tl.constexpr, GRAD_MODE: tl.constexpr, L1: tl.constexpr, BLOCK: tl.constexpr):
    """Elements ``[0, n)`` of the four pointers: whole unmasked blocks, then one masked tail."""
    lanes = tl.arange(0, BLOCK)
    n_full = n // BLOCK
    for b in range(0, n_full):
        acc += _penalty_terms(theta, anchor, weight, grad, b * BLOCK + lanes, None, grad_scale,
                              HAS_WEIGHTS, GRAD_MODE, L1, False)
    idx = n_full * BLOCK + lanes
    if n_full * BLOCK < n:
        acc += _penalty_terms(theta, anchor, weight, grad, idx, idx < n, grad_scale,
                              HAS_WEIGHTS, GRAD_MODE, L1, True)
    return acc


@triton.jit
def _penalty_chunk(theta, anchor, weight, grad, head, n, acc, acc_head, grad_scale,
                   HAS_WEIGHTS: tl.constexpr, GRAD_MODE: tl.constexpr, L1: tl.constexpr, BLOCK: tl.constexpr,
                   HEAD: tl.constexpr, ALL_ALIGNED: tl.constexpr):
    """Elements ``[0, n)`` of a chunk whose element ``head`` is 16-byte aligned in θ and grad
    (and in a and w with ``ALL_ALIGNED``), as the host checked: the first ``head`` elements
    masked, the rest with vector loads of the aligned pointers."""
    head_lanes = tl.arange(0, HEAD)
    peel = tl.minimum(head, n)
    if peel > 0:
        acc_head += _penalty_terms(theta, anchor, weight, grad, head_lanes, head_lanes < peel, grad_scale,
                                   HAS_WEIGHTS, GRAD_MODE, L1, True)
    # Only pointers the host checked (those in use) get the hint.
    theta_body = tl.multiple_of(theta + head, 16)
    grad_body = grad + head
    if GRAD_MODE != 0:
        grad_body = tl.multiple_of(grad_body, 16)
    anchor_body = anchor + head
    weight_body = weight + head
    if ALL_ALIGNED:
        anchor_body = tl.multiple_of(anchor_body, 16)
        if HAS_WEIGHTS:
            weight_body = tl.multiple_of(weight_body, 16)
    acc = _penalty_span(theta_body, anchor_body, weight_body, grad_body, n - peel, acc, grad_scale,
                        HAS_WEIGHTS, GRAD_MODE, L1, BLOCK)
    return acc, acc_head


@triton.jit
def _penalty_kernel(
    table_ptr,          # int64: [7, N] (θ, a, w, grad addresses; numel; heads) then chunk tensor ids, chunk starts
    partial_ptr,        # float32 [G]
    n_tensors,
    n_chunks,
    grad_scale,         # s (float32)
    P_CODE: tl.constexpr,
    A_CODE: tl.constexpr,
    W_CODE: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    GRAD_MODE: tl.constexpr,    # 0: no gradient, 1: grad += step, 2: grad = step
    L1: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    HEAD: tl.constexpr,         # lanes of the peeled head (> largest head, a power of two)
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_head = tl.zeros([HEAD], dtype=tl.float32)
    chunk_tensor_ptr = table_ptr + 7 * n_tensors
    chunk_start_ptr = chunk_tensor_ptr + n_chunks
    for c in range(pid, n_chunks, n_programs):
        t = tl.load(chunk_tensor_ptr + c)
        start = tl.load(chunk_start_ptr + c)
        numel = tl.load(table_ptr + 4 * n_tensors + t)
        head_all = tl.load(table_ptr + 5 * n_tensors + t)
        head_own = tl.load(table_ptr + 6 * n_tensors + t)
        theta = _typed_pointer(tl.load(table_ptr + t), P_CODE) + start
        anchor = _typed_pointer(tl.load(table_ptr + n_tensors + t), A_CODE) + start
        weight = _typed_pointer(tl.load(table_ptr + 2 * n_tensors + t), W_CODE) + start
        grad = _typed_pointer(tl.load(table_ptr + 3 * n_tensors + t), P_CODE) + start
        n_here = tl.minimum(numel - start, CHUNK)
        if head_all >= 0:
            acc, acc_head = _penalty_chunk(theta, anchor, weight, grad, head_all, n_here, acc, acc_head, grad_scale,
                                           HAS_WEIGHTS, GRAD_MODE, L1, BLOCK, HEAD, True)
        elif head_own >= 0:
            acc, acc_head = _penalty_chunk(theta, anchor, weight, grad, head_own, n_here, acc, acc_head, grad_scale,
                                           HAS_WEIGHTS, GRAD_MODE, L1, BLOCK, HEAD, False)
        else:
            acc = _penalty_span(theta, anchor, weight, grad, n_here, acc, grad_scale,
                                HAS_WEIGHTS, GRAD_MODE, L1, BLOCK)
    total = tl.sum(acc, axis=0) + tl.sum(acc_head, axis=0)
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


def _max_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return sm_count(device) * PROGRAMS_PER_SM


def _head(addresses: Sequence[int], sizes: Sequence[int]) -> int:
    """Smallest element index at which every address is 16-byte aligned, or -1 if none is.

    ``addresses[j]`` holds elements of ``sizes[j]`` bytes; element ``k`` sits at
    ``addresses[j] + k·sizes[j]``. Checking ``k < 16`` suffices: if some ``k`` works,
    ``k mod 16`` does too (16 elements are a multiple of 16 bytes).
    """
    for k in range(16):
        if all((a + k * s) % 16 == 0 for a, s in zip(addresses, sizes)):
            return k
    return -1


_tables: OrderedDict[tuple, tuple[torch.Tensor, int]] = OrderedDict()


def _chunk_table(lists, numels: Sequence[int], device: torch.device) -> tuple[torch.Tensor, int]:
    """Build (or fetch) the int64 table ``[addresses ×4, numels, heads, chunk tensor ids, chunk starts]``.

    Also returns the chunk count. Two heads per tensor decide its alignment: :func:`_head`
    of all its addresses (the lists present), and of θ's and grad's alone (used when the
    first is −1: θ and grad vector-loaded, a and w element-wise).
    """
    addresses = [tuple(x.data_ptr() for x in seq) if seq is not None else None for seq in lists]
    dtypes = tuple(seq[0].dtype if seq is not None else None for seq in lists)
    key = (device, CHUNK, tuple(numels), dtypes, *addresses)
    hit = _tables.get(key)
    if hit is not None:
        try:
            _tables.move_to_end(key)
        except KeyError:  # evicted meanwhile by another thread; the table is still valid
            pass
        return hit
    n = len(numels)
    zeros = (0,) * n
    present = [(addr, seq[0].element_size()) for addr, seq in zip(addresses, lists) if seq is not None]
    own = [(addr, seq[0].element_size()) for addr, seq in zip(addresses[::3], lists[::3]) if seq is not None]  # θ, grad
    heads_all = tuple(_head([addr[t] for addr, _ in present], [size for _, size in present]) for t in range(n))
    heads_own = tuple(_head([addr[t] for addr, _ in own], [size for _, size in own]) for t in range(n))
    head = torch.tensor(
        [a if a is not None else zeros for a in addresses] + [tuple(numels), heads_all, heads_own], dtype=torch.int64
    ).reshape(-1)
    sizes = torch.tensor(numels, dtype=torch.int64)
    per_tensor = (sizes + CHUNK - 1) // CHUNK
    n_chunks = int(per_tensor.sum())
    tensor_ids = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), per_tensor)
    first_chunk = torch.cumsum(per_tensor, 0) - per_tensor
    starts = (torch.arange(n_chunks, dtype=torch.int64) - first_chunk[tensor_ids]) * CHUNK
    table = torch.cat([head, tensor_ids, starts]).to(device)
    _tables[key] = (table, n_chunks)
    if len(_tables) > TABLE_CACHE_SIZE:
        _tables.popitem(last=False)
    return table, n_chunks


def plan(params: Tensors, anchors: Tensors, weights: Tensors | None, scale: float, form: str, grads: Tensors | None, *,
         store: bool = False) -> tuple[Launch, Launch, torch.Tensor]:
    """The two launches of :func:`penalty` (main pass, then the sum of partials) and its output."""
    if CHUNK % BLOCK or CHUNK % 16:
        raise ValueError(f"CHUNK ({CHUNK}) must be a multiple of BLOCK ({BLOCK}) and of 16")
    device = params[0].device
    numels = [p.numel() for p in params]
    table, n_chunks = _chunk_table((params, anchors, weights, grads), numels, device)
    n_programs = min(n_chunks, _max_programs(device))
    partials = torch.empty(n_programs, dtype=acc_dtype(params[0].dtype), device=device)
    out = torch.empty((), dtype=acc_dtype(params[0].dtype), device=device)
    main = Launch(
        _penalty_kernel,
        (n_programs,),
        (table, partials, len(numels), n_chunks, float(scale)),
        dict(
            P_CODE=_DTYPE_CODES[params[0].dtype],
            A_CODE=_DTYPE_CODES[anchors[0].dtype],
            W_CODE=_DTYPE_CODES[weights[0].dtype] if weights is not None else 0,
            HAS_WEIGHTS=weights is not None,
            GRAD_MODE=0 if grads is None else (2 if store else 1),
            L1=form == "l1",
            BLOCK=BLOCK,
            CHUNK=CHUNK,
            HEAD=16,
            num_warps=NUM_WARPS,
        ),
    )
    reduce = Launch(
        _sum_partials_kernel,
        (1,),
        (partials, out, n_programs, float(scale)),
        dict(BLOCK=REDUCE_BLOCK, num_warps=4),
    )
    return main, reduce, out


def penalty(params: Tensors, anchors: Tensors, weights: Tensors | None, scale: float, form: str, grads: Tensors | None, *,
            store: bool = False) -> torch.Tensor:
    """``s·Σ w·φ(θ−a)`` as a 0-dim float32 tensor, and the gradient step into ``grads``.

    With ``grads`` and ``store=False``: ``grads[t] += s·w·φ'(θ−a)``; with ``store=True``:
    ``grads[t] = s·w·φ'(θ−a)`` (``grads`` are written, never read, so they may come
    from ``torch.empty``). Inputs as guaranteed by :func:`fastcl.ops.penalty`:
    equal-length non-empty lists of non-empty contiguous tensors on one device, one
    dtype per list. Version counters are left to the caller.
    """
    main, reduce, out = plan(params, anchors, weights, scale, form, grads, store=store)
    device = params[0].device
    main(device)
    reduce(device)
    return out
