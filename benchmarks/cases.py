"""Every size the benchmarks and the GPU check run, in one place.

``run.py`` picks one of three size sets: ``quick`` (smoke run, seconds), ``cpu`` and ``gpu``
(the full matrix on that device); the pytest-benchmark files use ``pytest-cpu`` /
``pytest-gpu`` (moderate sizes). An op's **headline case**, the one its ratios are quoted
on, is the last case of its list (for the penalty: the last float32 case; for the Fisher
and the EWC epoch: the MLP). ``gpu_check.py``'s sizes and time budgets are :data:`PLANS`.

Add a case: append a row to the op's table for each size set it belongs to (mind that the
last row is the headline).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "PenaltyCase", "ModelCase", "DistillCase", "FusedCase", "PENALTY", "FISHER", "DISTILL", "FUSED", "E2E",
    "SIZES", "size_set", "cases", "headline", "Plan", "PLANS", "DTYPE_NAMES",
]

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPE_NAMES = {F32: "fp32", BF16: "bf16", F16: "fp16"}
MiB = 2**20


class PenaltyCase(NamedTuple):
    label: str
    n_tensors: int
    total: int      # parameters over all tensors
    dtype: torch.dtype


class ModelCase(NamedTuple):
    label: str      # the model architecture (inputs.ARCHITECTURES)
    samples: int
    batch: int


class DistillCase(NamedTuple):
    label: str
    rows: int
    vocab: int
    dtype: torch.dtype


class FusedCase(NamedTuple):
    label: str
    rows: int
    vocab: int
    hidden: int
    dtype: torch.dtype


SIZES = ("quick", "cpu", "gpu", "pytest-cpu", "pytest-gpu")

PENALTY = {
    "quick": (PenaltyCase("20t/250k fp32", 20, 250_000, F32), PenaltyCase("50t/1.5M fp32", 50, 1_500_000, F32)),
    "cpu": (PenaltyCase("50t/1M fp32", 50, 1_000_000, F32), PenaltyCase("100t/13M bf16", 100, 13_000_000, BF16),
            PenaltyCase("100t/13M fp32", 100, 13_000_000, F32)),
    "gpu": (PenaltyCase("100t/10M fp32", 100, 10_000_000, F32), PenaltyCase("200t/100M fp32", 200, 100_000_000, F32),
            PenaltyCase("220t/1B bf16", 220, 1_000_000_000, BF16), PenaltyCase("220t/1B fp32", 220, 1_000_000_000, F32)),
    "pytest-cpu": (PenaltyCase("fp32 50t/2M", 50, 2_000_000, F32), PenaltyCase("bf16 50t/2M", 50, 2_000_000, BF16)),
    "pytest-gpu": (PenaltyCase("fp32 200t/100M", 200, 100_000_000, F32), PenaltyCase("bf16 200t/100M", 200, 100_000_000, BF16)),
}

# Fisher: the models people retrain. Token models see sequences of inputs.SEQ_LEN (32); the GPT-2
# case uses batches of 32 sequences, so its batch size equals its sequence length.
_MODELS_QUICK = (ModelCase("mlp", 64, 32), ModelCase("cnn", 32, 16), ModelCase("transformer", 16, 8),
                 ModelCase("transformer_emb", 16, 8), ModelCase("transformer_param", 16, 8), ModelCase("gpt2", 64, 32))
_MODELS_FULL = (ModelCase("mlp", 512, 128), ModelCase("cnn", 256, 64), ModelCase("transformer", 256, 64),
                ModelCase("transformer_emb", 256, 64), ModelCase("transformer_param", 256, 64), ModelCase("gpt2", 128, 32))
_MODELS_PYTEST = (ModelCase("mlp", 256, 128), ModelCase("cnn", 128, 64), ModelCase("transformer", 128, 64),
                  ModelCase("transformer_emb", 128, 64), ModelCase("gpt2", 64, 32))
FISHER = {"quick": _MODELS_QUICK, "cpu": _MODELS_FULL, "gpu": _MODELS_FULL, "pytest-cpu": _MODELS_PYTEST, "pytest-gpu": _MODELS_PYTEST}

DISTILL = {
    "quick": (DistillCase("128x4096 fp32", 128, 4096, F32), DistillCase("256x8192 fp32", 256, 8192, F32)),
    "cpu": (DistillCase("256x8192 fp32", 256, 8192, F32), DistillCase("512x32000 bf16", 512, 32000, BF16),
            DistillCase("512x32000 fp32", 512, 32000, F32)),
    "gpu": (DistillCase("4096x32000 fp32", 4096, 32000, F32), DistillCase("8192x32000 bf16", 8192, 32000, BF16),
            DistillCase("8192x128256 bf16", 8192, 128256, BF16)),
    "pytest-cpu": (DistillCase("512x8192 fp32", 512, 8192, F32),),
    "pytest-gpu": (DistillCase("4096x32000 bf16", 4096, 32000, BF16),),
}

FUSED = {
    "quick": (FusedCase("64r V2048 H64 fp32", 64, 2048, 64, F32), FusedCase("128r V4096 H128 fp32", 128, 4096, 128, F32)),
    "cpu": (FusedCase("256r V8192 H256 fp32", 256, 8192, 256, F32), FusedCase("512r V16384 H256 fp32", 512, 16384, 256, F32)),
    "gpu": (FusedCase("2048r V32000 H2048 bf16", 2048, 32000, 2048, BF16),
            FusedCase("8192r V128256 H4096 bf16", 8192, 128256, 4096, BF16)),
    "pytest-cpu": (FusedCase("256r V8192 H256 fp32", 256, 8192, 256, F32),),
    "pytest-gpu": (FusedCase("4096r V32000 H2048 bf16", 4096, 32000, 2048, BF16),),
}

_E2E_FULL = (ModelCase("mlp", 2048, 128), ModelCase("cnn", 512, 64), ModelCase("transformer", 512, 64))
E2E = {
    "quick": (ModelCase("mlp", 128, 32), ModelCase("cnn", 64, 32), ModelCase("transformer", 32, 16)),
    "cpu": _E2E_FULL, "gpu": _E2E_FULL,
    "pytest-cpu": (ModelCase("mlp", 1024, 128), ModelCase("cnn", 256, 64), ModelCase("transformer", 256, 64)),
}
E2E["pytest-gpu"] = E2E["pytest-cpu"]

_TABLES = {"penalty": PENALTY, "fisher": FISHER, "distill": DISTILL, "fused_linear_distill": FUSED, "e2e": E2E}


def size_set(device: torch.device | str, *, quick: bool = False, pytest: bool = False) -> str:
    """The size-set name for a device: ``quick``, ``cpu``, ``gpu``, ``pytest-cpu`` or ``pytest-gpu``."""
    platform = "gpu" if torch.device(device).type == "cuda" else "cpu"
    if pytest:
        return f"pytest-{platform}"
    return "quick" if quick else platform


def cases(op: str, size: str) -> tuple:
    """The cases of row op ``op`` (a key of ``ratios.OPS``) in size set ``size``."""
    return _TABLES[op][size]


def headline(op: str, size: str):
    """The case an op's ratios are quoted on (module docstring)."""
    table = cases(op, size)
    if op == "penalty":
        return [c for c in table if c.dtype == F32][-1]
    if op in ("fisher", "e2e"):
        return next(c for c in table if c.label == "mlp")
    return table[-1]


# ---------------------------------------------------------------------------- gpu_check.py


@dataclass(frozen=True)
class Plan:
    """Sizes and time budgets of one ``gpu_check.py`` mode (``full``, ``quick``, ``dry-run-cpu``)."""

    mode: str
    budget_s: float                       # whole script; the bench section gets what is left
    section_budget_s: dict
    penalty: tuple                        # (n_tensors, total elements)
    sqgrad: tuple                         # ((B, T, I, O), ...)
    distill: tuple                        # ((rows, vocab, dtype, T, masked, -inf teacher, API check), ...)
    fused: tuple                          # ((rows, vocab, hidden, dtype, teacher, masked, bias, chunk), ...)
    copy_bytes: int
    matmul_n: int
    ref_chunk_bytes: int                  # float64 working set per reference chunk


PLANS = {
    "full": Plan(
        mode="full", budget_s=450,
        section_budget_s={"env": 20, "floors": 25, "penalty": 90, "sqgrad": 45, "distill": 60, "fused": 45},
        penalty=(223, 100_000_000),
        sqgrad=((64, 1, 1024, 4096), (16, 7, 1024, 4096), (8, 128, 1024, 4096), (5, 7, 1000, 513), (3, 128, 37, 4099)),
        distill=((8192, 128256, BF16, 2.0, True, True, True), (1031, 50257, F32, 1.0, False, True, True),
                 (513, 32000, F16, 4.0, True, False, False)),
        fused=((1024, 128256, 4096, BF16, "hidden", True, False, None), (333, 32003, 1024, F32, "logits", False, True, 100)),
        copy_bytes=2 * 2**30, matmul_n=8192, ref_chunk_bytes=256 * MiB,
    ),
    "quick": Plan(
        mode="quick", budget_s=150,
        section_budget_s={"env": 20, "floors": 15, "penalty": 30, "sqgrad": 20, "distill": 20, "fused": 20},
        penalty=(211, 10_000_000),
        sqgrad=((32, 1, 1024, 4096), (8, 7, 1024, 4096), (4, 128, 1024, 4096), (5, 7, 1000, 513)),
        distill=((2048, 128256, BF16, 2.0, True, True, True), (257, 50257, F32, 1.0, False, True, True),
                 (129, 32000, F16, 4.0, True, False, False)),
        fused=((256, 128256, 4096, BF16, "hidden", True, False, None), (129, 32003, 512, F32, "logits", False, True, 50)),
        copy_bytes=512 * MiB, matmul_n=8192, ref_chunk_bytes=256 * MiB,
    ),
    "dry-run-cpu": Plan(
        mode="dry-run-cpu", budget_s=240,
        section_budget_s={"env": 30, "floors": 5, "penalty": 60, "sqgrad": 30, "distill": 30, "fused": 30},
        penalty=(41, 6_000),
        sqgrad=((5, 1, 40, 70), (3, 7, 33, 19), (2, 128, 20, 24)),
        distill=((8, 1000, BF16, 2.0, True, True, True), (4, 5000, F32, 1.0, False, True, True), (6, 257, F16, 4.0, True, False, False)),
        fused=((16, 1000, 64, BF16, "hidden", True, False, None), (13, 517, 32, F32, "logits", False, True, 5)),
        copy_bytes=16 * MiB, matmul_n=256, ref_chunk_bytes=4 * MiB,
    ),
}
