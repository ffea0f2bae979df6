#!/usr/bin/env python
"""Run fastcl's comparison matrix and write ``<out>/<device-slug>.json`` plus plots.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--out DIR] [--ops penalty,fisher,distill,e2e]

Every op is timed for each fastcl backend that can run on the device (``fastcl[cpp]``,
``fastcl[torch]``, ... forced with :func:`fastcl.ops.use_backend`) and for the baselines
of :mod:`baselines`. Ratios (``>1``: fastcl faster; memory ratios ``<1``: fastcl uses
less) compare rows of the same run on the headline case of each op (the last case of
its list), using the backend fastcl's dispatcher picks by default for that device.
Timing and memory methods: see :mod:`_timing`.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def _early_threads(argv: list[str]) -> int | None:
    """``--threads`` (default 1 with ``--quick``), applied before torch and fastcl's OpenMP
    runtimes start: oversubscribed OpenMP barriers on a shared machine make 2-thread runs
    100× slower than 1-thread ones, which a smoke run cannot afford."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return 1 if "--quick" in argv else None


_THREADS = _early_threads(sys.argv[1:]) if __name__ == "__main__" else None
if _THREADS:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)

import baselines as bl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _cases import make_batches, make_model, make_penalty_set, param_shapes, penalty_bytes  # noqa: E402
from _timing import cycle, measure_interleaved, measure_peak_mb, measure_time, rotation_count  # noqa: E402

import fastcl  # noqa: E402
from fastcl.ops import BackendUnavailableError, backend_info, use_backend  # noqa: E402

OPS = ("penalty", "fisher", "distill", "e2e")
LAMBDA = 100.0
TEMPERATURE = 2.0

# name -> (op, baseline impl, kind, required). kind "time": baseline_ms / fastcl_ms;
# "mem": fastcl_peak / baseline_peak; "bw": baseline (copy) ms / fastcl ms.
RATIO_SPECS = {
    "penalty_vs_autograd_loop": ("penalty", "autograd_loop", "time", True),
    "penalty_fraction_of_copy_bandwidth": ("penalty", "copy_same_bytes", "bw", True),
    "penalty_vs_foreach": ("penalty", "foreach", "time", False),
    "penalty_vs_compiled_loop": ("penalty", "compiled_loop", "time", False),
    "fisher_vs_per_sample_loop": ("fisher", "per_sample_loop", "time", True),
    "fisher_vs_vmap": ("fisher", "vmap_grad", "time", True),
    "fisher_memory_vs_fwd_bwd": ("fisher", "plain_fwd_bwd", "mem", False),
    "distill_vs_torch_time": ("distill", "torch_kl_div", "time", True),
    "distill_vs_torch_memory": ("distill", "torch_kl_div", "mem", True),
    "fused_linear_distill_vs_torch_time": ("fused_linear_distill", "torch_unfused", "time", False),
    "fused_linear_distill_vs_torch_memory": ("fused_linear_distill", "torch_unfused", "mem", True),
    "e2e_ewc_vs_autograd_loop": ("e2e", "autograd_loop_ewc", "time", False),
}
REQUIRED_RATIOS = tuple(k for k, v in RATIO_SPECS.items() if v[3])
# Which fastcl op's backend a benchmark op exercises.
DISPATCH_OP = {"penalty": "penalty", "fisher": "sqgrad", "distill": "distill", "fused_linear_distill": "distill", "e2e": "penalty"}
# The rows a ratio on op X uses come from this case (see Config.headline).
FISHER_MEMORY_CASE = "transformer"

try:
    from fastcl.importance import diagonal_fisher  # the Fisher engine (may land later)
except Exception as exc:  # noqa: BLE001 - any failure means "not there yet"
    diagonal_fisher = None
    FISHER_MISSING = f"fastcl.importance.diagonal_fisher not importable ({type(exc).__name__}: {exc})"
else:
    FISHER_MISSING = None


# ============================================================================ config


@dataclass
class Config:
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

    # (label, n_tensors, total params, dtype); the last fp32 case is the headline.
    @property
    def penalty_cases(self):
        f32, b16 = torch.float32, torch.bfloat16
        if self.quick:
            return [("20t/250k fp32", 20, 250_000, f32), ("50t/1.5M fp32", 50, 1_500_000, f32)]
        if self.device.type == "cuda":
            return [("100t/10M fp32", 100, 10_000_000, f32), ("200t/100M fp32", 200, 100_000_000, f32),
                    ("220t/1B bf16", 220, 1_000_000_000, b16), ("220t/1B fp32", 220, 1_000_000_000, f32)]
        return [("50t/1M fp32", 50, 1_000_000, f32), ("100t/13M bf16", 100, 13_000_000, b16), ("100t/13M fp32", 100, 13_000_000, f32)]

    # kind -> (samples, batch)
    @property
    def fisher_cases(self):
        if self.quick:
            return {"mlp": (64, 32), "cnn": (32, 16), "transformer": (16, 8)}
        return {"mlp": (512, 128), "cnn": (256, 64), "transformer": (256, 64)}

    # (label, rows, vocab, dtype); the last is the headline.
    @property
    def distill_cases(self):
        f32, b16 = torch.float32, torch.bfloat16
        if self.quick:
            return [("128x4096 fp32", 128, 4096, f32), ("256x8192 fp32", 256, 8192, f32)]
        if self.device.type == "cuda":
            return [("4096x32000 fp32", 4096, 32000, f32), ("8192x32000 bf16", 8192, 32000, b16), ("8192x128256 bf16", 8192, 128256, b16)]
        return [("256x8192 fp32", 256, 8192, f32), ("512x32000 bf16", 512, 32000, b16), ("512x32000 fp32", 512, 32000, f32)]

    # (label, rows, vocab, hidden, dtype); the last is the headline.
    @property
    def fused_cases(self):
        f32, b16 = torch.float32, torch.bfloat16
        if self.quick:
            return [("64r V2048 H64 fp32", 64, 2048, 64, f32), ("128r V4096 H128 fp32", 128, 4096, 128, f32)]
        if self.device.type == "cuda":
            return [("2048r V32000 H2048 bf16", 2048, 32000, 2048, b16), ("8192r V128256 H4096 bf16", 8192, 128256, 4096, b16)]
        return [("256r V8192 H256 fp32", 256, 8192, 256, f32), ("512r V16384 H256 fp32", 512, 16384, 256, f32)]

    @property
    def e2e_cases(self):
        if self.quick:
            return {"mlp": (128, 32), "cnn": (64, 32), "transformer": (32, 16)}
        return {"mlp": (2048, 128), "cnn": (512, 64), "transformer": (512, 64)}

    def headline(self, op: str) -> str:
        if op == "penalty":
            return [c[0] for c in self.penalty_cases if c[3] == torch.float32][-1]
        if op == "distill":
            return self.distill_cases[-1][0]
        if op == "fused_linear_distill":
            return self.fused_cases[-1][0]
        if op == "fisher":
            return "mlp"
        return "mlp"


# ============================================================================ recording


class Recorder:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.checks: dict[str, dict] = {}

    def skip(self, op, impl, case, reason):
        self.skipped.append({"op": op, "impl": impl, "case": case, "reason": reason})
        print(f"  skip {op:<21} {impl:<26} {case:<24} {reason}", flush=True)

    def measure_group(self, op, case, size, impls: dict, *, notes: dict | None = None) -> None:
        """Time ``impls`` ({impl: fn}) round-robin (see measure_interleaved), then record each."""
        rounds = 3 if self.cfg.quick else 7
        try:
            timings = measure_interleaved(impls, self.cfg.device, warmup=1, rounds=rounds)
        except Exception as exc:  # noqa: BLE001 - fall back to one-by-one timing, which reports failures per impl
            print(f"  interleaved timing failed ({type(exc).__name__}: {exc}); timing one by one", flush=True)
            timings = {}
        for impl, fn in impls.items():
            self.measure(op, impl, case, size, fn, slow=True, note=(notes or {}).get(impl), timing=timings.get(impl))

    def measure(self, op, impl, case, size, fn: Callable, *, bytes_moved: int | None = None, slow=False, note=None, rotate: int = 1, timing=None) -> dict | None:
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
    # Triton on CPU is the interpreter (a test vehicle), never timed.
    return ("cuda", "triton", "torch") if device.type == "cuda" else ("cpp", "torch")


def fastcl_backends(device: torch.device, op: str, dtype: torch.dtype, rec: Recorder, bench_op: str, case: str) -> list[str]:
    """Backends that can run fastcl op ``op`` on ``device``/``dtype``; the others are recorded as skipped."""
    out = []
    for b in candidate_backends(device):
        with use_backend(b):
            status = backend_info(device, dtype)[op]
        if status.startswith("unavailable"):
            rec.skip(bench_op, f"fastcl[{b}]", case, status)
        else:
            out.append(b)
    return out


def auto_backend(device: torch.device, op: str, dtype: torch.dtype = torch.float32) -> str | None:
    status = backend_info(device, dtype)[op]
    return None if status.startswith("unavailable") else status


def forced(backend: str, fn: Callable) -> Callable:
    def run():
        with use_backend(backend):
            return fn()
    return run


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ============================================================================ penalty


def bench_penalty(cfg: Config, rec: Recorder) -> None:
    device = cfg.device
    for label, n_tensors, total, dtype in cfg.penalty_cases:
        shapes = param_shapes(n_tensors, total)
        numel = sum(math.prod(s) for s in shapes)
        elt = torch.tensor([], dtype=dtype).element_size()
        nbytes = penalty_bytes(numel, dtype)
        k = rotation_count(4 * numel * elt, device, cap=cfg.rotation_cap)
        sets = [make_penalty_set(shapes, dtype, device, seed=i) for i in range(k)]
        grads = [s.grads for s in sets]
        nxt = cycle(list(zip(sets, grads)))

        def autograd_loop():
            s, _ = nxt()
            return bl.autograd_loop_step(s.params, s.anchors, s.weights, LAMBDA)

        def foreach():
            s, g = nxt()
            return bl.foreach_penalty(s.params, s.anchors, s.weights, g, LAMBDA)

        def fastcl_penalty():
            s, g = nxt()
            return fastcl.ops.penalty(s.params, s.anchors, s.weights, scale=LAMBDA, grads=g)

        rec.measure("penalty", "autograd_loop", label, numel, autograd_loop, bytes_moved=nbytes, rotate=k)
        rec.measure("penalty", "foreach", label, numel, foreach, bytes_moved=nbytes, rotate=k)
        if not cfg.compile:
            rec.skip("penalty", "compiled_loop", label, "torch.compile skipped (--quick: compiling takes tens of seconds; or --no-compile)")
        elif label != cfg.headline("penalty"):
            rec.skip("penalty", "compiled_loop", label, "torch.compile timed on the headline case only (each shape set recompiles)")
        else:
            try:
                step = bl.compiled_loop_penalty(LAMBDA)
                t0 = time.perf_counter()
                s0 = sets[0]
                step(s0.params, s0.anchors, s0.weights)
                compile_s = time.perf_counter() - t0

                def compiled():
                    s, _ = nxt()
                    return step(s.params, s.anchors, s.weights)

                rec.measure("penalty", "compiled_loop", label, numel, compiled, bytes_moved=nbytes, rotate=k, note=f"first call (compile) {compile_s:.1f} s")
            except Exception as exc:  # noqa: BLE001
                rec.skip("penalty", "compiled_loop", label, f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        copies = [bl.copy_same_bytes(nbytes, device) for _ in range(k)]
        nxt_copy = cycle(copies)
        rec.measure("penalty", "copy_same_bytes", label, numel, lambda: nxt_copy()(), bytes_moved=nbytes, rotate=k)
        del copies, nxt_copy
        for b in fastcl_backends(device, "penalty", dtype, rec, "penalty", label):
            rec.measure("penalty", f"fastcl[{b}]", label, numel, forced(b, fastcl_penalty), bytes_moved=nbytes, rotate=k)
        # value agreement of the default fastcl backend with the autograd loop, on fresh inputs
        try:
            s = make_penalty_set(shapes[: min(len(shapes), 10)], dtype, device, seed=99)
            ref = float(bl.autograd_loop_penalty(s.params, s.anchors, s.weights, LAMBDA).detach())
            got = float(fastcl.ops.penalty(s.params, s.anchors, s.weights, scale=LAMBDA))
            rec.checks[f"penalty {label}"] = {"rel_err": abs(got - ref) / max(abs(ref), 1e-30)}
        except Exception as exc:  # noqa: BLE001
            rec.checks[f"penalty {label}"] = {"error": f"{type(exc).__name__}: {exc}"}
        del sets, grads, nxt
        free(device)


# ============================================================================ Fisher


def bench_fisher(cfg: Config, rec: Recorder) -> None:
    device = cfg.device
    for kind, (n, batch) in cfg.fisher_cases.items():
        model = make_model(kind, device, quick=cfg.quick)
        batches = make_batches(kind, n, batch, device)
        size = sum(p.numel() for p in model.parameters())
        case = kind
        ref_box: dict = {}

        def per_sample():
            ref_box["f"] = bl.fisher_per_sample_loop(model, batches)

        rec.measure("fisher", "per_sample_loop", case, size, per_sample, slow=True)
        rec.measure("fisher", "vmap_grad", case, size, lambda: bl.fisher_vmap(model, batches))
        rec.measure("fisher", "squared_minibatch (wrong)", case, size, lambda: bl.fisher_squared_minibatch(model, batches),
                    note="not the Fisher: squares of mini-batch mean gradients")
        rec.measure("fisher", "plain_fwd_bwd", case, size, lambda: bl.plain_forward_backward(model, batches),
                    note="one ordinary forward+backward pass over the same data (yardstick)")
        for name, factory in (("backpack", bl.fisher_backpack_factory), ("opacus", bl.fisher_opacus_factory)):
            try:
                run = factory(copy.deepcopy(model))
            except Exception as exc:  # noqa: BLE001
                run, why = None, f"{type(exc).__name__}: {exc}"
            else:
                why = f"{name} not importable"
            if run is None:
                rec.skip("fisher", name, case, why)
            else:
                rec.measure("fisher", name, case, size, lambda run=run: run(batches))
        if diagonal_fisher is None:
            rec.skip("fisher", "fastcl[*]", case, FISHER_MISSING)
        else:
            for b in fastcl_backends(device, "sqgrad", torch.float32, rec, "fisher", case):
                out_box: dict = {}

                def engine(b=b, out_box=out_box):
                    out_box["f"] = diagonal_fisher(model, batches, kind="empirical")

                row = rec.measure("fisher", f"fastcl[{b}]", case, size, forced(b, engine))
                if row is not None and "f" in ref_box and "f" in out_box:
                    try:
                        got = {k: v for k, v in out_box["f"].items()}
                        rec.checks[f"fisher {case} fastcl[{b}] vs per-sample loop"] = {"rel_err": bl.rel_err(got, ref_box["f"])}
                    except Exception as exc:  # noqa: BLE001
                        rec.checks[f"fisher {case} fastcl[{b}] vs per-sample loop"] = {"error": f"{type(exc).__name__}: {exc}"}
        if "f" in ref_box:
            try:
                rec.checks[f"fisher {case} vmap vs per-sample loop"] = {"rel_err": bl.rel_err(bl.fisher_vmap(model, batches), ref_box["f"])}
            except Exception as exc:  # noqa: BLE001
                rec.checks[f"fisher {case} vmap vs per-sample loop"] = {"error": f"{type(exc).__name__}: {exc}"}
        del model, batches
        free(device)


# ============================================================================ distillation


def _logits(rows, vocab, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(rows, vocab, generator=g)).to(device=device, dtype=dtype).requires_grad_(True)
    t = (3 * torch.randn(rows, vocab, generator=g)).to(device=device, dtype=dtype)
    return s, t


def bench_distill(cfg: Config, rec: Recorder) -> None:
    device = cfg.device
    T = TEMPERATURE
    for label, R, V, dtype in cfg.distill_cases:
        elt = torch.tensor([], dtype=dtype).element_size()
        nbytes = 3 * R * V * elt  # read s, t; write ∂/∂s
        k = rotation_count(2 * R * V * elt, device, cap=cfg.rotation_cap)
        pairs = [_logits(R, V, dtype, device, seed=i) for i in range(k)]
        nxt = cycle(pairs)
        chunk = max(1, R // 8)

        def torch_full():
            s, t = nxt()
            s.grad = None
            bl.kl_div_distill(s, t, T).backward()

        def torch_chunked():
            s, t = nxt()
            s.grad = None
            bl.chunked_kl_div_distill_backward(s, t, T, chunk)

        def fastcl_distill():
            s, t = nxt()
            s.grad = None
            fastcl.ops.distillation_loss(s, t, T).backward()

        rec.measure("distill", "torch_kl_div", label, R * V, torch_full, bytes_moved=nbytes, rotate=k)
        rec.measure("distill", f"torch_chunked({chunk} rows)", label, R * V, torch_chunked, bytes_moved=nbytes, rotate=k)
        for name, factory in (("liger_kl_div", bl.liger_kl_div_factory), ("liger_jsd (other loss)", bl.liger_jsd_factory)):
            run = factory() if device.type == "cuda" else None
            if run is None:
                rec.skip("distill", name, label, "Liger-Kernel runs on CUDA only" if device.type != "cuda" else "liger_kernel not importable")
                continue

            def liger(run=run):
                s, t = nxt()
                s.grad = None
                run(s, t, T).backward()

            rec.measure("distill", name, label, R * V, liger, bytes_moved=nbytes, rotate=k)
        for b in fastcl_backends(device, "distill", dtype, rec, "distill", label):
            rec.measure("distill", f"fastcl[{b}]", label, R * V, forced(b, fastcl_distill), bytes_moved=nbytes, rotate=k)
        try:
            s, t = pairs[0]
            ref = float(bl.kl_div_distill(s.detach().float(), t.float(), T))
            got = float(fastcl.ops.distillation_loss(s.detach(), t, T))
            rec.checks[f"distill {label}"] = {"rel_err": abs(got - ref) / max(abs(ref), 1e-30)}
        except Exception as exc:  # noqa: BLE001
            rec.checks[f"distill {label}"] = {"error": f"{type(exc).__name__}: {exc}"}
        del pairs, nxt
        free(device)

    for label, R, V, H, dtype in cfg.fused_cases:
        g = torch.Generator().manual_seed(0)
        h = torch.randn(R, H, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
        W = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(device=device, dtype=dtype).requires_grad_(True)
        ht = torch.randn(R, H, generator=g).to(device=device, dtype=dtype)
        Wt = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(device=device, dtype=dtype)

        def unfused():
            h.grad = W.grad = None
            bl.unfused_linear_distill(h, W, ht, Wt, T).backward()

        def fused():
            h.grad = W.grad = None
            fastcl.ops.fused_linear_distillation(h, W, teacher_hidden=ht, teacher_weight=Wt, temperature=T).backward()

        rec.measure("fused_linear_distill", "torch_unfused", label, R * V, unfused, slow=not cfg.quick and device.type == "cpu")
        for b in fastcl_backends(device, "distill", dtype, rec, "fused_linear_distill", label):
            rec.measure("fused_linear_distill", f"fastcl[{b}]", label, R * V, forced(b, fused), slow=not cfg.quick and device.type == "cpu")
        del h, W, ht, Wt
        free(device)


# ============================================================================ end to end


def bench_e2e(cfg: Config, rec: Recorder) -> None:
    device = cfg.device
    EWC = getattr(fastcl, "EWC", None)
    for kind, (n, batch) in cfg.e2e_cases.items():
        base = make_model(kind, device, quick=cfg.quick).train()
        batches = make_batches(kind, n, batch, device, seed=1)
        size = sum(p.numel() for p in base.parameters())
        g = torch.Generator().manual_seed(5)
        fisher = {k: torch.rand(p.shape, generator=g).to(device) for k, p in base.named_parameters()}
        anchors = {k: p.detach().clone() for k, p in base.named_parameters()}

        def fresh():
            m = copy.deepcopy(base)
            return m, torch.optim.SGD(m.parameters(), lr=1e-3)

        impls: dict[str, Callable] = {}
        notes: dict[str, str] = {}
        m0, o0 = fresh()
        impls["plain"] = lambda: bl.plain_epoch(m0, batches, o0)
        m1, o1 = fresh()
        impls["autograd_loop_ewc"] = lambda: bl.ewc_autograd_loop_epoch(m1, batches, o1, anchors, fisher, LAMBDA)
        if EWC is None:
            rec.skip("e2e", "fastcl[*]", kind, "fastcl.EWC not available yet")
        for b in fastcl_backends(device, "penalty", torch.float32, rec, "e2e", kind) if EWC is not None else ():
            try:
                m, opt = fresh()
                ewc = EWC(m, LAMBDA)
                ewc.consolidate(batches, verbose=False)  # default backends: only the penalty's backend is forced below
            except Exception as exc:  # noqa: BLE001
                rec.skip("e2e", f"fastcl[{b}]", kind, f"EWC.consolidate failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue

            def add_grad_epoch(m=m, opt=opt, ewc=ewc):
                for x, y in batches:
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(m(x), y).backward()
                    ewc.add_penalty_grad_()
                    opt.step()

            def differentiable_epoch(m=m, opt=opt, ewc=ewc):
                for x, y in batches:
                    opt.zero_grad(set_to_none=True)
                    (F.cross_entropy(m(x), y) + ewc.penalty()).backward()
                    opt.step()

            impls[f"fastcl[{b}]"] = forced(b, add_grad_epoch)
            notes[f"fastcl[{b}]"] = "EWC.add_penalty_grad_()"
            impls[f"fastcl[{b}] penalty()"] = forced(b, differentiable_epoch)
            notes[f"fastcl[{b}] penalty()"] = "differentiable EWC.penalty()"
        rec.measure_group("e2e", kind, size, impls, notes=notes)
        free(device)


BENCHES = {"penalty": bench_penalty, "fisher": bench_fisher, "distill": bench_distill, "e2e": bench_e2e}


# ============================================================================ ratios


def _find(rows, op, impl, case):
    for r in rows:
        if r["op"] == op and r["impl"] == impl and r["case"] == case:
            return r
    return None


def compute_ratios(rows: list[dict], cfg: Config, ran: set[str]) -> tuple[dict, dict]:
    ratios, details = {}, {}
    for name, (op, base_impl, kind, _) in RATIO_SPECS.items():
        bench_op = "distill" if op == "fused_linear_distill" else op
        case = FISHER_MEMORY_CASE if name == "fisher_memory_vs_fwd_bwd" else cfg.headline(op)
        dtype = torch.float32
        if op == "distill":
            dtype = cfg.distill_cases[-1][3]
        elif op == "fused_linear_distill":
            dtype = cfg.fused_cases[-1][4]
        info = {"op": op, "case": case, "baseline": base_impl}
        ratios[name] = None
        details[name] = info
        if bench_op not in ran:
            info["reason"] = "op not run (--ops)"
            continue
        backend = auto_backend(cfg.device, DISPATCH_OP[op], dtype)
        info["backend"] = backend
        fast = _find(rows, op, f"fastcl[{backend}]", case) if backend else None
        if fast is None:
            candidates = [r for r in rows if r["op"] == op and r["case"] == case and re.fullmatch(r"fastcl\[\w+\]", r["impl"])]
            if candidates:
                fast = min(candidates, key=lambda r: r["ms_median"])
                info["backend"] = fast["impl"][7:-1]
                info["note"] = f"default backend {backend!r} has no row; fastest measured fastcl row used"
        base = _find(rows, op, base_impl, case)
        if fast is None or base is None:
            info["reason"] = "missing row: " + ", ".join(x for x, r in (("fastcl", fast), (base_impl, base)) if r is None)
            continue
        info["fastcl_impl"] = fast["impl"]
        if kind in ("time", "bw"):
            value = base["ms_median"] / fast["ms_median"] if fast["ms_median"] > 0 else None
        else:
            value = fast["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else None
            if value is None:
                info["reason"] = "baseline peak is 0"
        ratios[name] = value
    return ratios, details


# ============================================================================ environment


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def git_commit() -> str | None:
    """HEAD, with ``-dirty`` for tracked changes; ``FASTCL_GIT_COMMIT`` where there is no git checkout
    (e.g. the copy of the tree on a lent GPU machine)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            # tracked changes only (git describe --dirty semantics)
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True, text=True, timeout=10)
            return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("FASTCL_GIT_COMMIT") or None


def triton_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:  # noqa: BLE001
        return None


# ============================================================================ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, short timing (smoke run, < 45 s on 2 CPU cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default=str(HERE / "results"), help="output directory (default benchmarks/results)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and OpenMP (default: torch's default; 1 with --quick)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        p.error(f"--ops: unknown op(s) {bad}; expected a subset of {OPS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    args.ops = ops
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    compile_ok = not args.no_compile and not args.quick
    cfg = Config(device=device, quick=args.quick, compile=compile_ok)
    rec = Recorder(cfg)
    name = device_name(device)
    t_start = time.perf_counter()
    print(f"fastcl {fastcl.__version__} benchmarks on {name} ({'quick' if args.quick else 'full'}), torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for op in args.ops:
        print(f"[{op}]", flush=True)
        t0 = time.perf_counter()
        BENCHES[op](cfg, rec)
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    ratios, ratio_details = compute_ratios(rec.rows, cfg, set(args.ops))
    result = {
        ("gpu" if device.type == "cuda" else "cpu"): name,
        "device": device.type,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "fastcl": fastcl.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "quick": args.quick,
        "ops": args.ops,
        "default_backends": {op: backend_info(device)[op] for op in ("penalty", "sqgrad", "distill")},
        "timing_method": "CUDA events per call" if device.type == "cuda" else "time.perf_counter per call",
        "memory_method": "torch.cuda.max_memory_allocated above the pre-call level" if device.type == "cuda"
        else "torch.profiler(profile_memory=True): peak running sum of CPU allocator events during one call",
        "rows": rec.rows,
        "ratios": ratios,
        "ratio_details": ratio_details,
        "required_ratios": list(REQUIRED_RATIOS),
        "checks": rec.checks,
        "skipped": rec.skipped,
        "wall_s": None,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = slug(name)
    if not args.no_plots:
        try:
            from plot import plot_result

            result["plots"] = [p.name for p in plot_result(result, out_dir, stem)]
        except Exception as exc:  # noqa: BLE001 - plots are a convenience
            print(f"plots failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            result["plots"] = []
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    from render_readme import render

    print()
    print(render(result))
    print(f"wrote {path} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
