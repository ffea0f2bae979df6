"""Recording rows: run settings, one row per (op, impl, case), skips with their reason, fastcl backends.

A row is ``{op, impl, case, size, ms_median, ms_p20, ms_p80, reps, peak_mb, gbps[, note]}``;
``impl`` is a baseline's name or ``fastcl[<backend>]``. A row that raises is recorded as
skipped with a one-line reason (``FASTCL_BENCH_DEBUG=1`` prints the traceback).
"""
from __future__ import annotations

import gc
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from cases import size_set

from fastcl.ops import BackendUnavailableError, op_backends, use_backend

from .timing import measure_interleaved, measure_peak_mb, measure_time

__all__ = ["Config", "Recorder", "Unavailable", "candidate_backends", "available_backends", "default_backend", "forced", "free"]


class Unavailable(Exception):
    """Raised by a row's setup when it cannot run here (library missing, wrong device); recorded as a skip."""


@dataclass
class Config:
    """Settings of one ``run.py`` run: device, size set, timing budgets."""

    device: torch.device
    quick: bool
    compile: bool
    timing: dict = field(default_factory=dict)
    slow_timing: dict = field(default_factory=dict)

    def __post_init__(self):
        gpu = self.device.type == "cuda"
        if self.quick:
            self.timing = dict(warmup=1, min_reps=3, max_reps=30, budget_s=0.15)
            self.slow_timing = dict(warmup=0, min_reps=2, max_reps=5, budget_s=0.1)
        else:
            self.timing = dict(warmup=3 if gpu else 2, min_reps=10 if gpu else 5, max_reps=200, budget_s=1.0)
            self.slow_timing = dict(warmup=1, min_reps=3, max_reps=10, budget_s=1.5)
        self.rotation_cap = 8 if gpu else (3 if self.quick else 4)
        self.rounds = 3 if self.quick else 7  # interleaved rounds (measure_group)
        self.size = size_set(self.device, quick=self.quick)


class Recorder:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.checks: dict[str, dict] = {}

    def skip(self, op, impl, case, reason):
        self.skipped.append({"op": op, "impl": impl, "case": case, "reason": reason})
        print(f"  skip {op:<21} {impl:<26} {case:<24} {reason}", flush=True)

    def check(self, name: str, compute: Callable[[], float]) -> None:
        """Record ``{"rel_err": compute()}`` (or the error it raised) under ``checks[name]``."""
        try:
            self.checks[name] = {"rel_err": compute()}
        except Exception as exc:  # noqa: BLE001 - a failed guard is reported in the JSON
            self.checks[name] = {"error": f"{type(exc).__name__}: {exc}"}

    def measure_group(self, op, case, size, impls: dict, *, notes: dict | None = None, slow: bool = True,
                      bytes_moved: int | None = None, rotate: int = 1) -> None:
        """Time ``impls`` ({impl: fn}) round-robin (see measure_interleaved), then record each
        (peak memory and the other arguments as :meth:`measure`)."""
        try:
            timings = measure_interleaved(impls, self.cfg.device, warmup=1, rounds=self.cfg.rounds)
        except Exception as exc:  # noqa: BLE001 - fall back to one-by-one timing, which reports failures per impl
            print(f"  interleaved timing failed ({type(exc).__name__}: {exc}); timing one by one", flush=True)
            timings = {}
        for impl, fn in impls.items():
            self.measure(op, impl, case, size, fn, bytes_moved=bytes_moved, slow=slow, note=(notes or {}).get(impl),
                         rotate=rotate, timing=timings.get(impl))

    def measure(self, op, impl, case, size, fn: Callable, *, bytes_moved: int | None = None, slow=False, note=None,
                rotate: int = 1, timing=None) -> dict | None:
        """Time ``fn`` (``slow``: few repetitions), probe its peak memory, record the row."""
        device = self.cfg.device
        try:
            t = timing if timing is not None else measure_time(fn, device, **(self.cfg.slow_timing if slow else self.cfg.timing))
            peak = measure_peak_mb(fn, device, prime=rotate)
        except BackendUnavailableError as exc:
            self.skip(op, impl, case, f"backend unavailable: {exc}")
            return None
        except Exception as exc:  # noqa: BLE001 - a failing impl is reported, not fatal
            self.skip(op, impl, case, f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            if os.environ.get("FASTCL_BENCH_DEBUG"):
                traceback.print_exc()
            return None
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        row = {
            "op": op, "impl": impl, "case": case, "size": size,
            "ms_median": t.ms_median, "ms_p20": t.ms_p20, "ms_p80": t.ms_p80, "reps": t.reps,
            "peak_mb": peak,
            "gbps": None if bytes_moved is None else bytes_moved / (t.ms_median * 1e-3) / 1e9,
        }
        if note:
            row["note"] = note
        self.rows.append(row)
        print(f"  {op:<21} {impl:<26} {case:<24} {t.ms_median:10.3f} ms  peak {peak:9.2f} MiB"
              + ("" if row["gbps"] is None else f"  {row['gbps']:7.2f} GB/s"), flush=True)
        return row


def candidate_backends(device: torch.device) -> tuple[str, ...]:
    """fastcl backends timed on ``device``. Triton on CPU is the interpreter (a test vehicle), never timed."""
    return ("cuda", "triton", "torch") if torch.device(device).type == "cuda" else ("cpp", "torch")


def available_backends(device, op: str, dtype: torch.dtype = torch.float32, *, on_skip: Callable[[str, str], None] | None = None) -> list[str]:
    """The candidate backends that can run fastcl op ``op`` (penalty, sqgrad, distill) on ``device``/``dtype``;
    ``on_skip(backend, reason)`` is called for each one that cannot."""
    device = torch.device(device)
    out = []
    for b in candidate_backends(device):
        with use_backend(b):
            status = op_backends(device, dtype)[op]
        if status.available:
            out.append(b)
        elif on_skip is not None:
            on_skip(b, status.reason)
    return out


def default_backend(device, op: str, dtype: torch.dtype = torch.float32) -> str | None:
    """The backend fastcl's dispatcher picks for ``op`` (None: none can run it)."""
    status = op_backends(device, dtype)[op]
    return status.name if status.available else None


def forced(backend: str, fn: Callable) -> Callable:
    """``fn`` run under ``use_backend(backend)``."""
    def run():
        with use_backend(backend):
            return fn()
    return run


def free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
