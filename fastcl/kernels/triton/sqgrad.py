r"""Triton per-sample squared-gradient accumulation for linear maps.

Math (contract in :mod:`fastcl.ops.sqgrad`)::

    out[o, i] += Σ_b |Σ_t g[b,t,o] · x[b,t,i]|^p          (p = 2 or 1)

A program owns one ``(BLOCK_O × BLOCK_I)`` tile of ``out`` and a range of samples. For
each sample it forms that sample's gradient tile ``g[b]ᵀ x[b]`` with ``tl.dot`` over
``BLOCK_T``-long slices of the sequence (masked, so any T ≥ 1 works and dot tiles are
never below 16), raises it to ``p`` and adds it to a float32 register accumulator. The
``[B, O, I]`` per-sample gradients never touch memory.

When ``out`` has too few tiles to fill the device, the samples are split into
``S`` groups (grid axis 1); each group writes its tile sum to a ``[S, O, I]`` float32
buffer that is then summed in a fixed order — deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._dtypes import acc_dtype
from ._launch import Launch, interpreted, sm_count

__all__ = ["sqgrad", "plan", "tiles_for", "BLOCK_O", "BLOCK_I", "BLOCK_T", "NUM_STAGES", "FP32_INPUT_PRECISION",
           "TARGET_WARPS_PER_SM", "MAX_BATCH_SPLITS"]

# Tunables (H100 defaults).
BLOCK_O = 64                  # rows of out per program, at most (fewer for small O)
BLOCK_I = 64                  # columns of out per program, at most (fewer for small I)
BLOCK_T = 32                  # sequence slice per tl.dot, at most (shrunk to max(16, next_pow2(T)))
NUM_STAGES = 3                # software-pipeline depth of the (sample, slice) loop
TARGET_WARPS_PER_SM = 16      # split the samples until tiles × splits × warps reaches this per SM
MAX_BATCH_SPLITS = 64
# Precision of tl.dot for float32 inputs: "tf32x3" (three TF32 tensor-core products, the
# low×low one dropped: ≈ fp32 accuracy, relative error per product ~2⁻²¹) or "ieee" (fp32
# FMA, no tensor cores). Plain "tf32" loses ~3 decimal digits and is never used.
FP32_INPUT_PRECISION = "tf32x3"
_FP32_PRECISIONS = ("tf32x3", "ieee")


def tiles_for(O: int, I: int, T: int) -> tuple[int, int, int, int]:
    """``(BLOCK_O, BLOCK_I, BLOCK_T, num_warps)`` for a layer of ``O`` outputs, ``I`` inputs, ``T`` steps.

    Tiles follow O and I (16, 32 or 64 wide, never wider than the next power of two), so
    a conv1 (O = 16, I = 9) runs 16×16 tiles, not 3.5 % of a 64×64 one; tiles of at most
    512 elements run on 2 warps, larger ones on 4 (an fp32 tf32x3 64×64 tile needs ~240
    registers per thread on 4 warps; fewer warps would spill).
    """
    block_o = min(BLOCK_O, max(16, triton.next_power_of_2(O)))
    block_i = min(BLOCK_I, max(16, triton.next_power_of_2(I)))
    block_t = min(BLOCK_T, max(16, triton.next_power_of_2(T)))
    num_warps = 2 if block_o * block_i <= 512 else 4
    return block_o, block_i, block_t, num_warps


@triton.jit
def _sqgrad_kernel(
    x_ptr,              # [B, T, I]
    g_ptr,              # [B, T, O]
    out_ptr,            # [O, I] float32 (accumulated) or [S, O, I] float32 (written)
    B, T, I, O,
    x_sample_stride,    # T·I (an int64 argument when it exceeds 2³¹)
    g_sample_stride,    # T·O
    samples_per_split,
    POWER: tl.constexpr,
    ACCUMULATE: tl.constexpr,   # True: out += tile; False: out[split] = tile
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PRECISION: tl.constexpr,    # tl.dot input precision for float32 inputs
    UPCAST: tl.constexpr,       # feed tl.dot float32 tiles (the interpreter mis-multiplies bfloat16)
):
    n_i_tiles = tl.cdiv(I, BLOCK_I)
    tile = tl.program_id(0)
    split = tl.program_id(1)
    o_offs = (tile // n_i_tiles) * BLOCK_O + tl.arange(0, BLOCK_O)
    i_offs = (tile % n_i_tiles) * BLOCK_I + tl.arange(0, BLOCK_I)
    t_lanes = tl.arange(0, BLOCK_T)
    o_in = o_offs < O
    i_in = i_offs < I
    b_first = split * samples_per_split
    n_samples = tl.minimum(b_first + samples_per_split, B) - b_first
    n_slices = tl.cdiv(T, BLOCK_T)

    acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    per_sample = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    # One flat loop over (sample, slice) pairs, so the software pipeline keeps loading
    # the next sample's slices while this sample's last product and square run (a loop
    # over samples around a loop over slices drains the pipeline at every sample).
    for step in range(0, n_samples * n_slices):
        b = step // n_slices
        t0 = (step - b * n_slices) * BLOCK_T
        # Offsets in 64 bits: B·T·I, and even T·I, may pass 2³¹.
        x_tile_ptr = x_ptr + ((b_first + b).to(tl.int64) * x_sample_stride + t0.to(tl.int64) * I)
        g_tile_ptr = g_ptr + ((b_first + b).to(tl.int64) * g_sample_stride + t0.to(tl.int64) * O)
        t_in = t0 + t_lanes < T
        # gᵀ slice [BLOCK_O, BLOCK_T] and x slice [BLOCK_T, BLOCK_I]; padding is 0.
        g_tile = tl.load(g_tile_ptr + t_lanes[None, :] * O + o_offs[:, None], mask=t_in[None, :] & o_in[:, None], other=0.0)
        x_tile = tl.load(x_tile_ptr + t_lanes[:, None] * I + i_offs[None, :], mask=t_in[:, None] & i_in[None, :], other=0.0)
        if UPCAST:
            g_tile = g_tile.to(tl.float32)
            x_tile = x_tile.to(tl.float32)
        per_sample = tl.dot(g_tile, x_tile, per_sample, input_precision=PRECISION)
        if t0 + BLOCK_T >= T:       # the sample's last slice
            if POWER == 2:
                acc += per_sample * per_sample
            else:
                acc += tl.abs(per_sample)
            per_sample = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)

    out_mask = o_in[:, None] & i_in[None, :]
    if ACCUMULATE:
        out_ptrs = out_ptr + o_offs[:, None] * I + i_offs[None, :]
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0)
    else:
        out_ptrs = out_ptr + split.to(tl.int64) * O * I + o_offs[:, None] * I + i_offs[None, :]
    tl.store(out_ptrs, acc, mask=out_mask)


def _batch_splits(n_tiles: int, num_warps: int, B: int, device: torch.device) -> int:
    """How many sample groups run in parallel per tile (1 when the tiles alone fill the device)."""
    if device.type != "cuda":
        return 1
    wanted = -(-sm_count(device) * TARGET_WARPS_PER_SM // (n_tiles * num_warps))
    return max(1, min(wanted, B, MAX_BATCH_SPLITS))


def plan(x: torch.Tensor, g: torch.Tensor, out: torch.Tensor, power: int, *,
         batch_splits: int | None = None) -> tuple[Launch, torch.Tensor | None]:
    """The launch of :func:`sqgrad` and, when samples are split, the ``[S, O, I]`` buffer it writes."""
    B, T, I = x.shape
    O = g.shape[-1]
    if FP32_INPUT_PRECISION not in _FP32_PRECISIONS:
        raise ValueError(f"FP32_INPUT_PRECISION must be one of {_FP32_PRECISIONS}, got {FP32_INPUT_PRECISION!r}")
    block_o, block_i, block_t, num_warps = tiles_for(O, I, T)
    n_tiles = triton.cdiv(O, block_o) * triton.cdiv(I, block_i)
    if batch_splits is None:
        splits = _batch_splits(n_tiles, num_warps, B, x.device)
    else:
        splits = max(1, min(int(batch_splits), B))
    per_split = triton.cdiv(B, splits)
    splits = triton.cdiv(B, per_split)
    partial = None if splits == 1 else torch.empty((splits, O, I), dtype=acc_dtype(x.dtype), device=out.device)
    launch = Launch(
        _sqgrad_kernel,
        (n_tiles, splits),
        (x, g, out if partial is None else partial, B, T, I, O, T * I, T * O, per_split),
        dict(
            POWER=power,
            ACCUMULATE=partial is None,
            BLOCK_O=block_o,
            BLOCK_I=block_i,
            BLOCK_T=block_t,
            # Half-precision inputs always multiply exactly into float32 on tensor cores.
            PRECISION=FP32_INPUT_PRECISION if x.dtype == torch.float32 else "ieee",
            UPCAST=x.dtype == torch.bfloat16 and interpreted(_sqgrad_kernel),
            num_warps=num_warps,
            num_stages=NUM_STAGES,
        ),
    )
    return launch, partial


def sqgrad(x: torch.Tensor, g: torch.Tensor, out: torch.Tensor, power: int, *, batch_splits: int | None = None) -> torch.Tensor:
    """Accumulate ``Σ_b |g[b]ᵀ x[b]|^power`` into ``out`` ``[O, I]`` float32 and return it.

    ``x``: ``[B, T, I]``, ``g``: ``[B, T, O]``, contiguous, one dtype (float32, bfloat16,
    float16). ``batch_splits`` overrides the number of parallel sample groups (testing,
    tuning); ``None`` picks it from the tile count and the device's SM count.
    """
    launch, partial = plan(x, g, out, power, batch_splits=batch_splits)
    launch(x.device)
    if partial is not None:
        out += partial.sum(0)
    return out
