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

import contextlib
import inspect
from functools import cache

import torch
import triton
import triton.language as tl

__all__ = ["sqgrad", "BLOCK_O", "BLOCK_I", "BLOCK_T", "NUM_WARPS", "NUM_STAGES", "FP32_INPUT_PRECISION"]

# Tunables (H100 defaults).
BLOCK_O = 64                  # rows of out per program
BLOCK_I = 64                  # columns of out per program
BLOCK_T = 32                  # sequence slice per tl.dot (at most; shrunk to max(16, next_pow2(T)))
NUM_WARPS = 4
NUM_STAGES = 3
TARGET_PROGRAMS_PER_SM = 2    # split the samples until tiles × splits reaches this many per SM
MAX_BATCH_SPLITS = 32
# Precision of tl.dot for float32 inputs: "ieee" (exact fp32 FMA), or "tf32x3" (≈fp32 on
# tensor cores, faster). Plain "tf32" loses ~3 decimal digits and is not used.
FP32_INPUT_PRECISION = "ieee"

_HAS_INPUT_PRECISION = "input_precision" in inspect.signature(tl.dot).parameters


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
    USE_INPUT_PRECISION: tl.constexpr,
    PRECISION: tl.constexpr,
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
    b_last = tl.minimum(b_first + samples_per_split, B)

    acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    # Pointers advance by whole samples and slices, so offsets past 2³¹ stay in 64 bits.
    x_sample = x_ptr + b_first.to(tl.int64) * x_sample_stride
    g_sample = g_ptr + b_first.to(tl.int64) * g_sample_stride
    for _ in range(b_first, b_last):
        g_ptrs = g_sample + t_lanes[None, :] * O + o_offs[:, None]
        x_ptrs = x_sample + t_lanes[:, None] * I + i_offs[None, :]
        per_sample = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t_in = t0 + t_lanes < T
            # gᵀ slice [BLOCK_O, BLOCK_T] and x slice [BLOCK_T, BLOCK_I]; padding is 0.
            g_tile = tl.load(g_ptrs, mask=t_in[None, :] & o_in[:, None], other=0.0)
            x_tile = tl.load(x_ptrs, mask=t_in[:, None] & i_in[None, :], other=0.0)
            if UPCAST:
                g_tile = g_tile.to(tl.float32)
                x_tile = x_tile.to(tl.float32)
            if USE_INPUT_PRECISION:
                per_sample = tl.dot(g_tile, x_tile, per_sample, input_precision=PRECISION)
            else:
                per_sample = tl.dot(g_tile, x_tile, per_sample, allow_tf32=False)
            g_ptrs += BLOCK_T * O
            x_ptrs += BLOCK_T * I
        if POWER == 2:
            acc += per_sample * per_sample
        else:
            acc += tl.abs(per_sample)
        x_sample += x_sample_stride
        g_sample += g_sample_stride

    out_mask = o_in[:, None] & i_in[None, :]
    if ACCUMULATE:
        out_ptrs = out_ptr + o_offs[:, None] * I + i_offs[None, :]
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0)
    else:
        out_ptrs = out_ptr + split.to(tl.int64) * O * I + o_offs[:, None] * I + i_offs[None, :]
    tl.store(out_ptrs, acc, mask=out_mask)


def _on(device: torch.device):
    """Make ``device`` current for a launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _interpreted() -> bool:
    return type(_sqgrad_kernel).__name__ == "InterpretedFunction"


@cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _batch_splits(n_tiles: int, B: int, device: torch.device) -> int:
    """How many sample groups run in parallel per tile (1 when the tiles alone fill the device)."""
    if device.type != "cuda":
        return 1
    wanted = -(-_sm_count(device) * TARGET_PROGRAMS_PER_SM // n_tiles)
    return max(1, min(wanted, B, MAX_BATCH_SPLITS))


def sqgrad(x: torch.Tensor, g: torch.Tensor, out: torch.Tensor, power: int, *, batch_splits: int | None = None) -> torch.Tensor:
    """Accumulate ``Σ_b |g[b]ᵀ x[b]|^power`` into ``out`` ``[O, I]`` float32 and return it.

    ``x``: ``[B, T, I]``, ``g``: ``[B, T, O]``, contiguous, one dtype (float32, bfloat16,
    float16). ``batch_splits`` overrides the number of parallel sample groups (testing,
    tuning); ``None`` picks it from the tile count and the device's SM count.
    """
    B, T, I = x.shape
    O = g.shape[-1]
    n_tiles = triton.cdiv(O, BLOCK_O) * triton.cdiv(I, BLOCK_I)
    splits = _batch_splits(n_tiles, B, x.device) if batch_splits is None else max(1, min(int(batch_splits), B))
    per_split = triton.cdiv(B, splits)
    splits = triton.cdiv(B, per_split)
    block_t = max(16, min(BLOCK_T, triton.next_power_of_2(T)))
    target = out if splits == 1 else torch.empty((splits, O, I), dtype=torch.float32, device=out.device)
    with _on(x.device):
        _sqgrad_kernel[(n_tiles, splits)](
            x, g, target, B, T, I, O, T * I, T * O, per_split,
            POWER=power,
            ACCUMULATE=splits == 1,
            BLOCK_O=BLOCK_O,
            BLOCK_I=BLOCK_I,
            BLOCK_T=block_t,
            USE_INPUT_PRECISION=_HAS_INPUT_PRECISION,
            PRECISION=FP32_INPUT_PRECISION,
            UPCAST=x.dtype == torch.bfloat16 and _interpreted(),
            num_warps=NUM_WARPS,
            num_stages=NUM_STAGES,
        )
    if splits > 1:
        out += target.sum(0)
    return out
