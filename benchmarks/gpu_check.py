#!/usr/bin/env python
"""One-call GPU validation of fastcl: environment, floors, correctness at real sizes, benchmarks.

    python benchmarks/gpu_check.py [--out DIR] [--quick] [--dry-run-cpu] [--sections a,b,...]

Sections (each timed and budgeted; one that fails or raises is recorded and the next runs):

``env``
    GPU, torch / triton / CUDA versions, driver, git commit (``-dirty`` with tracked
    changes; ``FASTCL_GIT_COMMIT`` where the tree has no ``.git``), date, whether
    ``fastcl._cuda`` is built and usable, ``fastcl.ops.backend_info("cuda")``, tunables.
``floors``
    Device-to-device copy bandwidth (bytes read + written / median time, CUDA events) and
    matmul rates (bf16, fp32 without TF32, TF32) in TFLOP/s: the ceilings of
    ``benchmarks/NOTES.md``'s floors.
``penalty``, ``sqgrad``, ``distill``, ``fused``
    Every kernel against float64 math on the same (fresh, random) inputs, computed chunk
    by chunk so memory stays bounded. Element-wise checks: ``|got − want| ≤ bound`` with a
    bound made of the output dtype's rounding (``rtol·|want|``) plus the float32 compute
    error allowed by the magnitudes of the terms involved; the reported number is the
    worst ``|got − want| / bound`` (pass: ≤ 1, NaN/inf never passes; masked or exact-zero
    outputs must be exactly 0). The fused LM-head check compares norms (whole tensor and
    per row) because its bf16 matmuls round the logits.
``bench``
    ``benchmarks/run.py`` once per op (``penalty``, ``distill``, ``fisher``, ``e2e``) as
    subprocesses, each into ``DIR/bench-<op>/``, with the time left in the budget; the
    required ratios of issue 9 are compared with their targets (:data:`TARGETS`).

Writes ``DIR/gpu_check-<device-slug>-<UTC date>.json`` (rewritten after every section, so
a run killed at its time limit still leaves the finished sections) and the markdown
summary beside it (``.md``), which is also printed last. Exit status: 1 when any
correctness check failed or a correctness section raised, else 0 (a missed performance
target is reported, not an error).

``--dry-run-cpu``: the same code path on the CPU at tiny sizes, Triton kernels under
``TRITON_INTERPRET=1`` (set here before anything imports them), the cuda backend and the
CUDA timings skipped with the reason recorded, ``run.py --quick --device cpu --ops
penalty``. ``FASTCL_GPU_CHECK_INJECT_FAULT=penalty|sqgrad|distill|fused`` (``1`` =
penalty) perturbs one output element of that section's first kernel call, to prove
the checks can fail.
"""
from __future__ import annotations

import os
import sys

_DRY = __name__ == "__main__" and "--dry-run-cpu" in sys.argv[1:]
if _DRY:
    # Before torch or Triton is imported: Triton fixes interpreter mode when it decorates kernels,
    # and 2 oversubscribed OpenMP threads on a shared small machine are slower than 1.
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):  # fastcl from this checkout even when not installed; _cases
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from run import device_name, git_commit, slug  # noqa: E402  (benchmarks/run.py)

import fastcl  # noqa: E402
from fastcl.ops import backend_info, use_backend  # noqa: E402

SECTIONS = ("env", "floors", "penalty", "sqgrad", "distill", "fused", "bench")
CORRECTNESS = ("penalty", "sqgrad", "distill", "fused")
BENCH_OPS = ("penalty", "distill", "fisher", "e2e")
# Issue 9's required ratios: (comparison, target). Time ratios: baseline / fastcl; memory: fastcl / baseline.
TARGETS = {
    "penalty_vs_autograd_loop": (">=", 20.0),
    "penalty_fraction_of_copy_bandwidth": (">=", 0.85),
    "fisher_vs_per_sample_loop": (">=", 50.0),
    "fisher_vs_vmap": (">=", 3.0),
    "distill_vs_torch_time": (">=", 2.0),
    "distill_vs_torch_memory": ("<=", 0.5),
    "fused_linear_distill_vs_torch_memory": ("<=", 0.2),
}
RATIO_OP = {"penalty": "penalty", "fisher": "fisher", "distill": "distill", "fused": "distill"}  # ratio prefix -> run.py op

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DT = {F32: "fp32", BF16: "bf16", F16: "fp16"}
# Rounding of one float32 value to the output dtype, relative to the result: one ulp (2^-7 bf16,
# 2^-10 fp16; conversions may truncate: Triton's interpreter rounds bf16 so) with a 2× margin.
OUT_RTOL = {F32: 1e-6, BF16: 1.6e-2, F16: 2e-3}
EPS32 = 2.0**-24
PENALTY_SCALE = 2.5
MiB = 2**20


# ============================================================================ sizes and budgets


@dataclass(frozen=True)
class Plan:
    """Sizes and time budgets of one mode (``full``, ``quick``, ``dry-run-cpu``)."""

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
        distill=((8192, 128256, BF16, 2.0, True, True, True), (1031, 50257, F32, 1.0, False, True, True), (513, 32000, F16, 4.0, True, False, False)),
        fused=((1024, 128256, 4096, BF16, "hidden", True, False, None), (333, 32003, 1024, F32, "logits", False, True, 100)),
        copy_bytes=2 * 2**30, matmul_n=8192, ref_chunk_bytes=256 * MiB,
    ),
    "quick": Plan(
        mode="quick", budget_s=150,
        section_budget_s={"env": 20, "floors": 15, "penalty": 30, "sqgrad": 20, "distill": 20, "fused": 20},
        penalty=(211, 10_000_000),
        sqgrad=((32, 1, 1024, 4096), (8, 7, 1024, 4096), (4, 128, 1024, 4096), (5, 7, 1000, 513)),
        distill=((2048, 128256, BF16, 2.0, True, True, True), (257, 50257, F32, 1.0, False, True, True), (129, 32000, F16, 4.0, True, False, False)),
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


# ============================================================================ fault injection


class FaultInjector:
    """Perturbs one output element of the first kernel call of one section (``FASTCL_GPU_CHECK_INJECT_FAULT``)."""

    ALIASES = {"1": "penalty", "true": "penalty", "yes": "penalty"}

    def __init__(self, value: str | None):
        value = (value or "").strip().lower()
        self.section = self.ALIASES.get(value, value) or None
        if self.section is not None and self.section not in CORRECTNESS:
            raise SystemExit(f"FASTCL_GPU_CHECK_INJECT_FAULT must be 1 or one of {CORRECTNESS}, got {value!r}")
        self.done = False

    def perturb(self, section: str, tensor: torch.Tensor, index: int = -1) -> bool:
        """Add 1 to element ``index`` (of the flattened view) of ``tensor`` once, for ``section``."""
        if self.done or section != self.section:
            return False
        flat = tensor.detach().view(-1)
        flat[index] = flat[index] + 1.0
        self.done = True
        return True


# ============================================================================ recording


@dataclass
class SectionResult:
    name: str
    budget_s: float
    status: str = "pending"               # pass | fail | error | skipped | done
    checks: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    error: str | None = None
    wall_s: float = 0.0
    data: dict = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    def time_left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def record(self, name: str, ratios: dict, *, seconds: float, **info) -> dict:
        """One check: ``ratios`` maps sub-checks to ``error / allowed error`` (pass: every one ≤ 1)."""
        clean = {k: (float(v) if v is not None else None) for k, v in ratios.items()}
        worst_key = max(clean, key=lambda k: _sort_key(clean[k]))
        worst = clean[worst_key]
        passed = all(v is not None and math.isfinite(v) and v <= 1.0 for v in clean.values())
        check = {"name": name, "passed": passed, "worst": worst, "worst_of": worst_key, "ratios": clean, "seconds": round(seconds, 3), **info}
        self.checks.append(check)
        tag = "PASS" if passed else "FAIL"
        print(f"  {tag} {name:<62} worst err/tol {_fmt(worst):>9} ({worst_key})  {seconds:6.2f} s", flush=True)
        return check

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append({"name": name, "reason": reason})
        print(f"  SKIP {name:<62} {reason}", flush=True)

    def as_dict(self) -> dict:
        out = {"status": self.status, "wall_s": round(self.wall_s, 2), "budget_s": self.budget_s}
        if self.checks or self.name in CORRECTNESS:
            out["checks"] = self.checks
            out["n_checks"] = len(self.checks)
            out["n_failed"] = sum(not c["passed"] for c in self.checks)
        if self.skipped:
            out["skipped"] = self.skipped
        if self.error:
            out["error"] = self.error
        out.update(self.data)
        return out


def _sort_key(v):
    return math.inf if v is None or not math.isfinite(v) else v


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}"
    return str(v)


# ============================================================================ comparison helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worst_ratio(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> float:
    """``max |got − want| / bound`` (``inf`` for a non-finite ``got``; 0/0 counts as 0)."""
    got = got.to(torch.float64)
    if not bool(torch.isfinite(got).all()):
        return math.inf
    err = (got - want).abs()
    ratio = torch.where(err == 0, torch.zeros_like(err), err / bound)
    return float(ratio.max()) if ratio.numel() else 0.0


def norm_errors(got: torch.Tensor, want: torch.Tensor, rows_per_chunk: int) -> tuple[float, float]:
    """``(‖got − want‖ / ‖want‖, max over rows of the same per row)``, computed in row chunks."""
    num = den = 0.0
    worst_row = 0.0
    for start in range(0, want.shape[0], rows_per_chunk):
        g = got[start:start + rows_per_chunk].to(torch.float64)
        w = want[start:start + rows_per_chunk]
        if not bool(torch.isfinite(g).all()):
            return math.inf, math.inf
        d2 = (g - w).reshape(g.shape[0], -1).square().sum(1)
        w2 = w.reshape(w.shape[0], -1).square().sum(1)
        num += float(d2.sum())
        den += float(w2.sum())
        nz = w2 > 0
        if bool((~nz & (d2 > 0)).any()):
            worst_row = math.inf
        if bool(nz.any()):
            worst_row = max(worst_row, float((d2[nz] / w2[nz]).sqrt().max()))
    return (math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)), worst_row


def rows_for(nbytes_per_row: int, budget: int) -> int:
    return max(1, budget // max(1, nbytes_per_row))


# ============================================================================ env


def section_env(ctx: Context, sec: SectionResult) -> None:
    env: dict = {
        "device_name": device_name(ctx.device),
        "device_type": ctx.device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "fastcl": fastcl.__version__,
        "commit": git_commit(),
        "date": ctx.date.isoformat(timespec="seconds"),
        "hostname": platform.node(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton"] = None
        env["triton_error"] = f"{type(exc).__name__}: {exc}"
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            l2_mib=round(getattr(props, "L2_cache_size", 0) / MiB, 1),
        )
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = f"failed: {exc}"
    from fastcl.kernels import cuda as kcuda

    env["fastcl_cuda_build_error"] = kcuda.BUILD_ERROR
    try:
        env["fastcl_cuda_unavailable_reason"] = kcuda.unavailable_reason("cuda")
    except Exception as exc:  # noqa: BLE001
        env["fastcl_cuda_unavailable_reason"] = f"check raised {type(exc).__name__}: {exc}"
    env["fastcl_cuda_usable"] = env["fastcl_cuda_unavailable_reason"] is None and torch.cuda.is_available()
    for dev in ("cuda", "cpu"):
        for dtype in (F32, BF16):
            try:
                env[f"backend_info_{dev}_{DT[dtype]}"] = backend_info(dev, dtype)
            except Exception as exc:  # noqa: BLE001
                env[f"backend_info_{dev}_{DT[dtype]}"] = f"raised {type(exc).__name__}: {exc}"
    try:
        from fastcl.ops import backend_status

        env["backend_status"] = {dev: backend_status(dev) for dev in ("cuda", "cpu")}
    except Exception as exc:  # noqa: BLE001
        env["backend_status"] = f"raised {type(exc).__name__}: {exc}"
    env["tunables"] = triton_tunables()
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    sec.data["env"] = env
    ctx.env = env
    for key in ("device_name", "torch", "torch_cuda", "triton", "commit", "date", "fastcl_cuda_usable", "fastcl_cuda_unavailable_reason", "nvidia_smi"):
        if key in env:
            print(f"  {key:<32} {env[key]}", flush=True)
    print(f"  {'backend_info(cuda)':<32} {env['backend_info_cuda_fp32']}", flush=True)
    sec.status = "done"


def triton_tunables() -> dict:
    try:
        from fastcl.kernels.triton import distill as kd
        from fastcl.kernels.triton import penalty as kp
        from fastcl.kernels.triton import sqgrad as ks
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}
    pick = lambda mod, names: {n: getattr(mod, n, None) for n in names}  # noqa: E731
    return {
        "penalty": pick(kp, ("BLOCK", "CHUNK", "NUM_WARPS", "PROGRAMS_PER_SM", "REDUCE_BLOCK")),
        "sqgrad": pick(ks, ("BLOCK_O", "BLOCK_I", "BLOCK_T", "NUM_WARPS", "NUM_STAGES", "TARGET_PROGRAMS_PER_SM", "MAX_BATCH_SPLITS", "FP32_INPUT_PRECISION")),
        "distill": {"MAX_BLOCK_V": getattr(kd, "MAX_BLOCK_V", None), "num_warps_for(MAX_BLOCK_V)": kd.num_warps_for(kd.MAX_BLOCK_V)},
    }


# ============================================================================ floors


def _cuda_median_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def section_floors(ctx: Context, sec: SectionResult) -> None:
    if ctx.device.type != "cuda":
        sec.status = "skipped"
        sec.data["reason"] = "no CUDA device (--dry-run-cpu): copy bandwidth and matmul rates are timed with CUDA events only"
        print(f"  {sec.data['reason']}", flush=True)
        return
    device = ctx.device
    floors: dict = {}
    n = ctx.plan.copy_bytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = _cuda_median_ms(lambda: dst.copy_(src), device, warmup=3, reps=20)
    floors["copy"] = {"bytes_each_way": n * 4, "ms_median": ms, "gbps_read_plus_write": 2 * n * 4 / (ms * 1e-3) / 1e9}
    print(f"  copy {n * 4 / 2**30:.2f} GiB: {ms:.3f} ms, {floors['copy']['gbps_read_plus_write']:.0f} GB/s (read + write)", flush=True)
    del src, dst
    N = ctx.plan.matmul_n
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for label, dtype, tf32 in (("bf16", BF16, False), ("fp32", F32, False), ("tf32", F32, True)):
            if sec.time_left() < 3:
                floors[f"matmul_{label}"] = {"skipped": "section budget spent"}
                continue
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(N, N, device=device, dtype=dtype)
            b = torch.randn(N, N, device=device, dtype=dtype)
            ms = _cuda_median_ms(lambda: torch.mm(a, b), device, warmup=3, reps=10)
            floors[f"matmul_{label}"] = {"n": N, "ms_median": ms, "tflops": 2 * N**3 / (ms * 1e-3) / 1e12}
            print(f"  matmul {label} {N}^3: {ms:.3f} ms, {floors[f'matmul_{label}']['tflops']:.1f} TFLOP/s", flush=True)
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    sec.data["floors"] = floors
    ctx.floors = floors
    sec.status = "done"


# ============================================================================ penalty


def penalty_shapes(n_tensors: int, total: int) -> list[tuple[int, ...]]:
    """A network-like list (weight matrices and bias vectors of log-uniform sizes) plus odd sizes."""
    from _cases import param_shapes

    odd = [(1,), (3,), (17,), (7, 13), (1029,), (4099,)]
    return param_shapes(max(2, n_tensors - len(odd)), max(1, total - sum(math.prod(s) for s in odd))) + odd


def _penalty_inputs(shapes, p_dtype, s_dtype, weighted, seed, device, misaligned):
    """θ = a + 0.1·N(0,1) (every fifth θ equal to its anchor), a ~ N(0,1), w ~ U(0,1), grad ~ N(0,1)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def place(values: torch.Tensor, dtype) -> torch.Tensor:
        if not misaligned:
            return values.to(dtype)
        buf = torch.empty(values.numel() + 1, dtype=dtype, device=device)  # one element off: not 16-byte aligned
        out = buf[1:].view(values.shape)
        out.copy_(values)
        return out

    params, anchors, weights, grads = [], [], [], []
    for shape in shapes:
        a = place(torch.randn(shape, generator=g, device=device), s_dtype)
        p32 = a.float() + 0.1 * torch.randn(shape, generator=g, device=device)
        p32.view(-1)[::5] = a.float().view(-1)[::5]
        params.append(place(p32, p_dtype))
        anchors.append(a)
        if weighted:
            weights.append(place(torch.rand(shape, generator=g, device=device), s_dtype))
        grads.append(place(torch.randn(shape, generator=g, device=device), p_dtype))
    return params, anchors, (weights if weighted else None), grads


def _penalty_cases(backends):
    """(backend, θ dtype, a/w dtype, kind, weighted, with grads, misaligned): a covering set, not the full product
    (each new combination of Triton constexprs is a compile, ~1 s on a fresh machine)."""
    pairs = [(F32, F32), (F32, BF16), (BF16, BF16), (BF16, F32), (F16, F32), (F16, BF16)]
    cases = []
    for b in backends:
        for p, s in pairs:
            for kind in ("quadratic", "l1"):
                cases.append((b, p, s, kind, True, True, False))
        for p, s in ((F32, F32), (BF16, BF16)):
            for kind in ("quadratic", "l1"):
                cases.append((b, p, s, kind, False, True, False))
                cases.append((b, p, s, kind, True, False, False))
        for p, s in ((F32, F32), (BF16, BF16), (F16, F32)):
            cases.append((b, p, s, "quadratic", True, True, True))
        cases.append((b, F32, F32, "l1", False, False, True))
    return cases


def section_penalty(ctx: Context, sec: SectionResult) -> None:
    device = ctx.device
    n_tensors, total = ctx.plan.penalty
    shapes = penalty_shapes(n_tensors, total)
    numel = sum(math.prod(s) for s in shapes)
    sec.data["sizes"] = {"n_tensors": len(shapes), "numel": numel, "scale": PENALTY_SCALE}
    print(f"  {len(shapes)} tensors, {numel:.3g} elements, scale {PENALTY_SCALE}", flush=True)
    backends = ["triton"]
    if device.type == "cuda":
        backends.insert(0, "cuda")
    else:
        sec.skip("penalty[cuda] *", "the cuda backend needs a CUDA device (--dry-run-cpu)")
    for seed, (backend, p_dtype, s_dtype, kind, weighted, with_grads, misaligned) in enumerate(_penalty_cases(backends)):
        name = (f"penalty[{backend}] θ={DT[p_dtype]} a/w={DT[s_dtype]} {kind}"
                f"{' weighted' if weighted else ' unweighted'}{' +grads' if with_grads else ' value-only'}{' misaligned' if misaligned else ''}")
        if sec.time_left() <= 0:
            sec.skip(name, "section time budget spent")
            continue
        t0 = time.perf_counter()
        params, anchors, weights, grads = _penalty_inputs(shapes, p_dtype, s_dtype, weighted, 1000 + seed, device, misaligned)
        before = [g.clone() for g in grads] if with_grads else None
        with use_backend(backend):
            value = fastcl.ops.penalty(params, anchors, weights, scale=PENALTY_SCALE, kind=kind, grads=grads if with_grads else None)
        sync(device)
        ctx.fault.perturb("penalty", grads[-1] if with_grads else value)
        want_value = torch.zeros((), dtype=torch.float64, device=device)
        grad_ratio = 0.0
        for i, p in enumerate(params):
            d = p.double() - anchors[i].double()
            w = None if weights is None else weights[i].double()
            term, slope = (0.5 * d * d, d) if kind == "quadratic" else (d.abs(), d.sign())
            if w is not None:
                term, slope = w * term, w * slope
            want_value += term.sum()
            if with_grads:
                step = PENALTY_SCALE * slope
                old = before[i].double()
                want = old + step
                dt = grads[i].dtype
                bound = OUT_RTOL[dt] * want.abs() + 1e-6 * (old.abs() + step.abs()) + torch.finfo(dt).tiny * torch.finfo(dt).eps
                grad_ratio = max(grad_ratio, worst_ratio(grads[i], want, bound))
        want_v = PENALTY_SCALE * float(want_value)
        got_v = float(value)
        value_ratio = abs(got_v - want_v) / (1e-4 * abs(want_v) + 1e-30) if math.isfinite(got_v) else math.inf
        ratios = {"value": value_ratio}
        if with_grads:
            ratios["grad"] = grad_ratio
        sec.record(name, ratios, seconds=time.perf_counter() - t0, value=got_v, value_ref=want_v,
                   value_dtype=str(value.dtype).replace("torch.", ""))
        del params, anchors, weights, grads, before, value


# ============================================================================ sqgrad


def _sqgrad_reference(x, g, power, chunk_bytes):
    """float64 ``Σ_b |g_bᵀ x_b|^p`` and the magnitude ``Σ_b (|g_b|ᵀ|x_b|)^p`` (bounds the float32 error), by sample chunks."""
    B, T, I = x.shape
    O = g.shape[-1]
    want = torch.zeros(O, I, dtype=torch.float64, device=x.device)
    mag = torch.zeros_like(want)
    step = rows_for(2 * O * I * 8, chunk_bytes)
    for s in range(0, B, step):
        xs, gs = x[s:s + step].double(), g[s:s + step].double()
        per = torch.bmm(gs.transpose(1, 2), xs)
        per_abs = torch.bmm(gs.abs().transpose(1, 2), xs.abs())
        want += (per.square() if power == 2 else per.abs()).sum(0)
        mag += (per_abs.square() if power == 2 else per_abs).sum(0)
    return want, mag


def section_sqgrad(ctx: Context, sec: SectionResult) -> None:
    from fastcl.kernels import triton as kt

    device = ctx.device
    kernel = kt.OPS["sqgrad"]
    seed = 0
    for (B, T, I, O) in ctx.plan.sqgrad:
        for dtype in (F32, BF16):
            for power in (2, 1):
                seed += 1
                name = f"sqgrad[triton kernel] B={B} T={T} I={I} O={O} {DT[dtype]} p={power}"
                if sec.time_left() <= 0:
                    sec.skip(name, "section time budget spent")
                    continue
                t0 = time.perf_counter()
                gen = torch.Generator(device=device).manual_seed(2000 + seed)
                x = torch.randn(B, T, I, generator=gen, device=device).to(dtype)
                g = torch.randn(B, T, O, generator=gen, device=device).to(dtype)
                start = torch.rand(O, I, generator=gen, device=device)
                out = start.clone()
                kernel(x, g, out, power)
                sync(device)
                ctx.fault.perturb("sqgrad", out)
                want, mag = _sqgrad_reference(x, g, power, ctx.plan.ref_chunk_bytes)
                want += start.double()
                c = max(4 * T, 64) * EPS32
                ratio = worst_ratio(out, want, 2e-5 * want.abs() + c * mag)
                ratios = {"out": ratio}
                if T == 7 and power == 2:
                    # Public API, forced Triton, non-contiguous x (the wrapper makes it contiguous).
                    x_nc = x.transpose(1, 2).contiguous().transpose(1, 2)
                    with use_backend("triton"):
                        api = fastcl.ops.sqgrad(x_nc, g, power=power)
                    sync(device)
                    ratios["api(non-contiguous x)"] = worst_ratio(api, want - start.double(), 2e-5 * want.abs() + c * mag)
                sec.record(name, ratios, seconds=time.perf_counter() - t0)
                del x, g, start, out, want, mag


# ============================================================================ distill


def _distill_inputs(R, V, dtype, masked, neg_inf, seed, device):
    gen = torch.Generator(device=device).manual_seed(seed)
    s = (3.0 * torch.randn(R, V, generator=gen, device=device)).to(dtype)
    t = (3.0 * torch.randn(R, V, generator=gen, device=device)).to(dtype)
    if neg_inf:
        # every 8th row: half the vocabulary impossible for the teacher; row 1: all but 3 entries
        rows = torch.arange(0, R, 8, device=device)
        cols = torch.rand(len(rows), V, generator=gen, device=device) < 0.5
        cols[:, 0] = False
        sub = t[rows]
        sub[cols] = float("-inf")
        t[rows] = sub
        if R > 1:
            t[1, 3:] = float("-inf")
    mask = None
    if masked:
        mask = torch.rand(R, generator=gen, device=device) >= 0.25
        mask[0] = True
        if R > 2:
            mask[2] = False
    return s, t, mask


def _distill_row_reference(s, t, T, mask):
    """float64 per-row loss, gradient, and error scales for one chunk of rows."""
    s64 = s.double() / T
    t64 = t.double() / T
    log_ps = s64 - torch.logsumexp(s64, -1, keepdim=True)
    log_pt = t64 - torch.logsumexp(t64, -1, keepdim=True)
    ps, pt = log_ps.exp(), log_pt.exp()
    terms = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt))
    loss = T * T * terms.sum(-1)
    grad = T * (ps - pt)
    grad_mag = T * (ps + pt)
    # float32 error of the loss: eps × magnitudes of the logsumexps and cross term
    finite_t = torch.where(torch.isfinite(t64), t64.abs(), torch.zeros_like(t64))
    loss_mag = T * T * (1.0 + s64.abs().amax(-1) + finite_t.amax(-1) + math.log(s.shape[-1]))
    if mask is not None:
        keep = mask.to(torch.float64)
        loss, loss_mag = loss * keep, loss_mag * keep
        grad, grad_mag = grad * keep[:, None], grad_mag * keep[:, None]
    return loss, grad, grad_mag, loss_mag


def _grad_bound(want, mag, dtype, rounding=1.0):
    return rounding * OUT_RTOL[dtype] * want.abs() + 2e-5 * mag + torch.finfo(dtype).tiny * torch.finfo(dtype).eps


def section_distill(ctx: Context, sec: SectionResult) -> None:
    from fastcl.kernels import triton as kt

    device = ctx.device
    kernel = kt.OPS["distill"]
    for n, (R, V, dtype, T, masked, neg_inf, api) in enumerate(ctx.plan.distill):
        label = f"R={R} V={V} {DT[dtype]} T={T}{' masked' if masked else ''}{' -inf teacher' if neg_inf else ''}"
        name = f"distill[triton kernel] {label}"
        if sec.time_left() <= 0:
            sec.skip(name, "section time budget spent")
            continue
        t0 = time.perf_counter()
        s, t, mask = _distill_inputs(R, V, dtype, masked, neg_inf, 3000 + n, device)
        row_loss, grad = kernel(s, t, T, mask)
        sync(device)
        ctx.fault.perturb("distill", grad)
        step = rows_for(6 * V * 8, ctx.plan.ref_chunk_bytes)
        loss_ratio = grad_ratio = 0.0
        for r in range(0, R, step):
            m = None if mask is None else mask[r:r + step]
            want_l, want_g, g_mag, l_mag = _distill_row_reference(s[r:r + step], t[r:r + step], T, m)
            loss_ratio = max(loss_ratio, worst_ratio(row_loss[r:r + step], want_l, 1e-4 * want_l.abs() + 1e-5 * l_mag))
            grad_ratio = max(grad_ratio, worst_ratio(grad[r:r + step], want_g, _grad_bound(want_g, g_mag, dtype)))
        sec.record(name, {"row_loss": loss_ratio, "grad": grad_ratio}, seconds=time.perf_counter() - t0)
        del row_loss, grad
        if not api:
            continue
        backends = ["auto"]
        auto = backend_info(device, dtype)["distill"]
        if auto != "triton":
            backends.append("triton")
        for backend in backends:
            name = f"distillation_loss[{backend}{'=' + auto if backend == 'auto' else ''}] fwd+bwd {label}"
            if sec.time_left() <= 0:
                sec.skip(name, "section time budget spent")
                continue
            t0 = time.perf_counter()
            leaf = s.detach().requires_grad_(True)
            with use_backend(None if backend == "auto" else backend):
                loss = fastcl.ops.distillation_loss(leaf, t, T, mask=mask)
                loss.backward()
            sync(device)
            count = R if mask is None else max(1, int(mask.sum()))
            want_total = bound_total = 0.0
            grad_ratio = 0.0
            for r in range(0, R, step):
                m = None if mask is None else mask[r:r + step]
                want_l, want_g, g_mag, l_mag = _distill_row_reference(s[r:r + step], t[r:r + step], T, m)
                want_total += float(want_l.sum())
                bound_total += float((1e-4 * want_l.abs() + 1e-5 * l_mag).sum())
                grad_ratio = max(grad_ratio, worst_ratio(leaf.grad[r:r + step], want_g / count,
                                                         _grad_bound(want_g, g_mag, dtype, rounding=2.0) / count))
            got = float(loss.detach())
            loss_ratio = abs(got - want_total / count) / (bound_total / count + 1e-30) if math.isfinite(got) else math.inf
            sec.record(name, {"loss": loss_ratio, "grad": grad_ratio}, seconds=time.perf_counter() - t0, loss=got, loss_ref=want_total / count)
            leaf.grad = None
            del leaf, loss
        del s, t, mask


# ============================================================================ fused linear distillation


def _fused_reference(h, W, b, t_logits, ht, Wt, T, mask, chunk_bytes):
    """float64 loss (batchmean over unmasked rows) and gradients for h, W, b.

    Logits are formed in row chunks of about ``chunk_bytes`` each; the float64 logit gradients
    of all rows are kept (``R·V·8`` bytes) so that ∂h and ∂W are one matmul each, not one pass
    over the ``V×H`` weight per chunk."""
    R, H = h.shape
    V = W.shape[0]
    W64 = W.double()
    h64 = h.double()
    b64 = None if b is None else b.double()
    Wt64 = None if Wt is None else Wt.double()
    grad_s = torch.empty(R, V, dtype=torch.float64, device=h.device)
    total = 0.0
    step = rows_for(6 * V * 8, chunk_bytes)
    for r in range(0, R, step):
        s = h64[r:r + step] @ W64.t()
        if b64 is not None:
            s += b64
        t = t_logits[r:r + step].double() if t_logits is not None else ht[r:r + step].double() @ Wt64.t()
        m = None if mask is None else mask[r:r + step]
        loss, grad_s[r:r + step], _, _ = _distill_row_reference(s, t, T, m)
        total += float(loss.sum())
        del s, t
    del Wt64
    count = R if mask is None else max(1, int(mask.sum()))
    gh = (grad_s @ W64) / count
    del W64
    gW = (grad_s.t() @ h64) / count
    gb = None if b is None else grad_s.sum(0) / count
    return total / count, gh, gW, gb


def _torch_unfused(h, W, b, t_logits, ht, Wt, T, mask):
    """What users write without fastcl, in the inputs' dtype (a yardstick for the rounding of bf16 logits)."""
    s = F.linear(h, W, b)
    with torch.no_grad():
        t = t_logits if t_logits is not None else ht @ Wt.t()
    rows = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1) * (T * T)
    if mask is None:
        return rows.mean()
    return (rows * mask).sum() / mask.sum().clamp(min=1)


def section_fused(ctx: Context, sec: SectionResult) -> None:
    device = ctx.device
    for n, (R, V, H, dtype, teacher, masked, bias, chunk) in enumerate(ctx.plan.fused):
        label = f"R={R} V={V} H={H} {DT[dtype]} teacher={teacher}{' masked' if masked else ''}{' bias' if bias else ''} chunk={chunk or 'auto'}"
        gen = torch.Generator(device=device).manual_seed(4000 + n)
        h = torch.randn(R, H, generator=gen, device=device).to(dtype)
        W = (torch.randn(V, H, generator=gen, device=device) / math.sqrt(H)).to(dtype)
        b = (0.1 * torch.randn(V, generator=gen, device=device)).to(dtype) if bias else None
        ht = Wt = t_logits = None
        if teacher == "hidden":
            ht = torch.randn(R, H, generator=gen, device=device).to(dtype)
            Wt = (torch.randn(V, H, generator=gen, device=device) / math.sqrt(H)).to(dtype)
        else:
            t_logits = (2.0 * torch.randn(R, V, generator=gen, device=device)).to(dtype)
        mask = None
        if masked:
            mask = torch.rand(R, generator=gen, device=device) >= 0.25
            mask[0] = True
            mask[-1] = False
        T = 2.0
        want = None
        auto = backend_info(device, dtype)["distill"]
        backends = ["auto"] + (["triton"] if auto != "triton" else [])
        tol = {"loss": 5e-3, "norm": 2e-2, "row": 6e-2} if dtype != F32 else {"loss": 1e-4, "norm": 1e-4, "row": 1e-3}
        for backend in backends:
            name = f"fused_linear_distillation[{backend}{'=' + auto if backend == 'auto' else ''}] {label}"
            if sec.time_left() <= 0:
                sec.skip(name, "section time budget spent")
                continue
            t0 = time.perf_counter()
            hl = h.detach().clone().requires_grad_(True)
            Wl = W.detach().clone().requires_grad_(True)
            bl_ = None if b is None else b.detach().clone().requires_grad_(True)
            with use_backend(None if backend == "auto" else backend):
                loss = fastcl.ops.fused_linear_distillation(hl, Wl, t_logits, teacher_hidden=ht, teacher_weight=Wt, student_bias=bl_,
                                                            temperature=T, mask=mask, chunk_size=chunk)
                loss.backward()
            sync(device)
            ctx.fault.perturb("fused", hl.grad)
            if want is None:
                want = _fused_reference(h, W, b, t_logits, ht, Wt, T, mask, 8 * ctx.plan.ref_chunk_bytes)
            w_loss, w_gh, w_gW, w_gb = want
            got = float(loss.detach())
            rows_chunk = rows_for(H * 8 * 4, ctx.plan.ref_chunk_bytes)
            gh_norm, gh_row = norm_errors(hl.grad, w_gh, rows_chunk)
            gW_norm, gW_row = norm_errors(Wl.grad, w_gW, rows_chunk)
            ratios = {
                "loss": (abs(got - w_loss) / (tol["loss"] * abs(w_loss)) if math.isfinite(got) else math.inf),
                "grad_h norm": gh_norm / tol["norm"],
                "grad_h worst row": gh_row / tol["row"],
                "grad_W norm": gW_norm / tol["norm"],
                "grad_W worst vocab row": gW_row / tol["row"],
            }
            if mask is not None:
                ratios["grad_h masked rows == 0"] = 0.0 if bool((hl.grad[~mask] == 0).all()) else math.inf
            if bl_ is not None:
                ratios["grad_b norm"] = norm_errors(bl_.grad[:, None], w_gb[:, None], rows_chunk)[0] / tol["norm"]
            info = {"loss": got, "loss_ref": w_loss, "tolerances": tol,
                    "rel_errors": {"grad_h_norm": gh_norm, "grad_h_worst_row": gh_row, "grad_W_norm": gW_norm, "grad_W_worst_row": gW_row}}
            del hl, Wl, bl_, loss
            if backend == "auto":
                info["torch_unfused_same_dtype"] = _yardstick(h, W, b, t_logits, ht, Wt, T, mask, want, rows_chunk)
            sec.record(name, ratios, seconds=time.perf_counter() - t0, **info)
        del h, W, b, ht, Wt, t_logits, want


def _yardstick(h, W, b, t_logits, ht, Wt, T, mask, want, rows_chunk) -> dict:
    """Errors of unfused torch in the same dtype against the same float64 reference (recorded, not judged)."""
    try:
        hl = h.detach().clone().requires_grad_(True)
        Wl = W.detach().clone().requires_grad_(True)
        bl_ = None if b is None else b.detach().clone().requires_grad_(True)
        loss = _torch_unfused(hl, Wl, bl_, t_logits, ht, Wt, T, mask)
        loss.backward()
        got = float(loss.detach())
        out = {
            "loss_rel": abs(got - want[0]) / abs(want[0]) if want[0] else None,
            "grad_h_norm": norm_errors(hl.grad, want[1], rows_chunk)[0],
            "grad_W_norm": norm_errors(Wl.grad, want[2], rows_chunk)[0],
        }
        del hl, Wl, bl_, loss
        return out
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: the yardstick is optional
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


# ============================================================================ bench


def _bench_command(ctx: Context, op: str, out_dir: Path) -> list[str]:
    cmd = [sys.executable, str(HERE / "run.py"), "--device", ctx.device.type, "--ops", op, "--out", str(out_dir), "--no-plots"]
    if ctx.plan.mode != "full":
        cmd.append("--quick")
    if not ctx.args.bench_compile:
        cmd.append("--no-compile")
    return cmd


def section_bench(ctx: Context, sec: SectionResult) -> None:
    ops = ("penalty",) if ctx.plan.mode == "dry-run-cpu" else BENCH_OPS
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTCL_GPU_CHECK_INJECT_FAULT", "FASTCL_BACKEND")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    runs: dict = {}
    ratios: dict = {}
    for op in ops:
        left = ctx.time_left()
        if left < 20:
            runs[op] = {"skipped": f"time budget spent ({left:.0f} s left); run it alone: python benchmarks/run.py --device cuda --ops {op}"}
            print(f"  SKIP run.py --ops {op}: {runs[op]['skipped']}", flush=True)
            continue
        out_dir = ctx.out_dir / f"bench-{op}"
        cmd = _bench_command(ctx, op, out_dir)
        print(f"  $ {' '.join(cmd[1:])}   (timeout {left:.0f} s)", flush=True)
        t0 = time.perf_counter()
        run: dict = {"cmd": cmd[1:], "timeout_s": round(left)}
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
            run["rc"] = proc.returncode
            run["output_tail"] = (proc.stdout + proc.stderr)[-4000:]
        except subprocess.TimeoutExpired as exc:
            run["rc"] = None
            run["error"] = f"timed out after {left:.0f} s"
            run["output_tail"] = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""))[-4000:]
        run["wall_s"] = round(time.perf_counter() - t0, 1)
        files = sorted(out_dir.glob("*.json")) if out_dir.is_dir() else []
        if run.get("rc") == 0 and files:
            result = json.loads(files[0].read_text())
            run["json"] = str(files[0].relative_to(ctx.out_dir))
            run["result"] = result
            for name, value in result.get("ratios", {}).items():
                if value is not None or name not in ratios:
                    ratios[name] = value
            print(f"    rc 0, {run['wall_s']} s, wrote {run['json']}", flush=True)
        else:
            run.setdefault("error", f"run.py exited {run.get('rc')} without a results JSON")
            print(f"    FAILED ({run['error']}); last output:\n" + "\n".join("      " + ln for ln in run["output_tail"].splitlines()[-15:]), flush=True)
        runs[op] = run
    sec.data["runs"] = runs
    sec.data["ratios"] = ratios
    targets = {}
    for name, (cmp, target) in TARGETS.items():
        value = ratios.get(name)
        met = None if value is None else (value >= target if cmp == ">=" else value <= target)
        targets[name] = {"value": value, "target": f"{cmp} {target:g}", "met": met}
    sec.data["targets"] = targets
    ctx.targets = targets
    failed = [op for op, r in runs.items() if r.get("error")]
    sec.status = "error" if failed else "done"
    if failed:
        sec.error = f"run.py failed for {failed}"


# ============================================================================ driver


@dataclass
class Context:
    args: argparse.Namespace
    plan: Plan
    device: torch.device
    out_dir: Path
    fault: FaultInjector
    t0: float = field(default_factory=time.perf_counter)
    date: _dt.datetime = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc))
    env: dict = field(default_factory=dict)
    floors: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)

    def time_left(self) -> float:
        return self.plan.budget_s - (time.perf_counter() - self.t0)


RUNNERS = {
    "env": section_env, "floors": section_floors, "penalty": section_penalty, "sqgrad": section_sqgrad,
    "distill": section_distill, "fused": section_fused, "bench": section_bench,
}


def run_section(ctx: Context, name: str) -> SectionResult:
    budget = ctx.plan.section_budget_s.get(name, max(0.0, ctx.time_left()))
    if name in CORRECTNESS or name == "floors":
        budget = min(budget, max(0.0, ctx.time_left()))
    sec = SectionResult(name=name, budget_s=round(budget, 1))
    print(f"\n[{name}] (budget {sec.budget_s:.0f} s, {ctx.time_left():.0f} s left overall)", flush=True)
    try:
        RUNNERS[name](ctx, sec)
        if name in CORRECTNESS:
            sec.status = "fail" if any(not c["passed"] for c in sec.checks) else ("pass" if sec.checks else "skipped")
    except Exception as exc:  # noqa: BLE001 - a broken section is recorded; the others still run
        sec.status = "error"
        sec.error = f"{type(exc).__name__}: {exc}".strip()[:2000]
        sec.data["traceback"] = traceback.format_exc()[-6000:]
        print(f"  ERROR {sec.error}\n{sec.data['traceback']}", flush=True)
    finally:
        sec.wall_s = time.perf_counter() - sec.t0
        if ctx.device.type == "cuda":
            try:
                torch.cuda.synchronize(ctx.device)
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - a dead context is already recorded by the section
                pass
    print(f"  -> {sec.status} ({sec.wall_s:.1f} s)", flush=True)
    return sec


def failures_of(sections: dict) -> list[dict]:
    out = []
    for name, sec in sections.items():
        if name not in CORRECTNESS:
            continue
        if sec.status == "error":
            out.append({"check": f"{name} (section raised)", "worst": None, "detail": sec.error})
        for c in sec.checks:
            if not c["passed"]:
                out.append({"check": c["name"], "worst": c["worst"], "detail": f"worst err/tol {_fmt(c['worst'])} in {c['worst_of']}; " +
                            ", ".join(f"{k} {_fmt(v)}" for k, v in c["ratios"].items())})
    return out


def markdown(result: dict) -> str:
    env = result.get("env", {})
    lines = [f"## fastcl GPU check: {result['device_name']} ({result['mode']})", ""]
    lines += ["| item | value |", "|---|---|"]
    for key in ("date", "commit", "torch", "torch_cuda", "triton", "python", "capability", "sm_count", "memory_gib", "nvidia_smi", "fastcl_cuda_usable", "fastcl_cuda_unavailable_reason"):
        if key in env:
            lines.append(f"| {key} | {env[key]} |")
    if "backend_info_cuda_fp32" in env:
        lines.append(f"| backend_info(cuda) | {env['backend_info_cuda_fp32']} |")
    if result.get("inject_fault"):
        lines.append(f"| INJECTED FAULT | {result['inject_fault']} |")
    floors = result["sections"].get("floors", {})
    lines += ["", "### Floors", ""]
    if floors.get("floors"):
        f = floors["floors"]
        lines += ["| copy GB/s (read+write) | bf16 TFLOP/s | fp32 TFLOP/s | tf32 TFLOP/s |", "|---|---|---|---|"]
        cell = lambda k, v: _fmt(f.get(k, {}).get(v))  # noqa: E731
        lines.append(f"| {cell('copy', 'gbps_read_plus_write')} | {cell('matmul_bf16', 'tflops')} | {cell('matmul_fp32', 'tflops')} | {cell('matmul_tf32', 'tflops')} |")
    else:
        lines.append(f"not measured: {floors.get('reason') or floors.get('error') or floors.get('status')}")
    lines += ["", "### Correctness (float64 references)", "", "| section | status | checks | failed | skipped | worst err/tol | s |", "|---|---|---|---|---|---|---|"]
    for name in CORRECTNESS:
        sec = result["sections"].get(name)
        if sec is None:
            continue
        checks = sec.get("checks", [])
        worst = max((c["worst"] for c in checks), key=_sort_key, default=None)
        lines.append(f"| {name} | {sec['status'].upper()} | {len(checks)} | {sec.get('n_failed', 0)} | {len(sec.get('skipped', []))} | {_fmt(worst)} | {sec['wall_s']:.1f} |")
    if result["failures"]:
        lines += ["", f"### FAILURES ({len(result['failures'])})", "", "| check | detail |", "|---|---|"]
        lines += [f"| {f['check']} | {f['detail']} |" for f in result["failures"]]
    bench = result["sections"].get("bench")
    if bench is not None:
        lines += ["", "### Targets (issue 9)", ""]
        targets = bench.get("targets") or {}
        if targets:
            lines += ["| ratio | value | target | met |", "|---|---|---|---|"]
            for name, t in targets.items():
                met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
                lines.append(f"| `{name}` | {_fmt(t['value'])} | {t['target']} | {met} |")
        for op, run in (bench.get("runs") or {}).items():
            status = run.get("json") or run.get("skipped") or run.get("error")
            lines.append(f"- run.py `{op}`: {status} ({run.get('wall_s', '-')} s)")
        if bench.get("error"):
            lines.append(f"- bench error: {bench['error']}")
    lines += ["", f"Exit status {result['exit_code']}; {result['wall_s']:.0f} s; JSON: `{result['json_name']}`"]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results"), help="output directory (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, ~2 minutes on an H100")
    p.add_argument("--dry-run-cpu", action="store_true", help="tiny sizes on the CPU, Triton interpreted (tests this script)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--budget-s", type=float, default=None, help="overall time budget in seconds (default: 450 full, 150 quick)")
    p.add_argument("--bench-compile", action="store_true", help="let run.py time the torch.compile penalty baseline (slow to compile)")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {bad}; expected a subset of {SECTIONS}")
    if "env" not in sections:
        sections.insert(0, "env")
    args.sections = sections
    if args.dry_run_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--dry-run-cpu needs TRITON_INTERPRET=1 before fastcl.kernels.triton is imported; run this file as a script")
    if not args.dry_run_cpu and not torch.cuda.is_available():
        p.error("no CUDA device: torch.cuda.is_available() is False (use --dry-run-cpu to exercise the script on the CPU)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = "dry-run-cpu" if args.dry_run_cpu else ("quick" if args.quick else "full")
    plan = PLANS[mode]
    if args.budget_s is not None:
        plan = Plan(**{**plan.__dict__, "budget_s": args.budget_s})
    device = torch.device("cpu" if args.dry_run_cpu else "cuda")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    else:
        torch.set_num_threads(1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(args=args, plan=plan, device=device, out_dir=out_dir, fault=FaultInjector(os.environ.get("FASTCL_GPU_CHECK_INJECT_FAULT")))
    name = device_name(device)
    stem = f"gpu_check-{slug(name)}-{ctx.date.strftime('%Y%m%dT%H%M%SZ')}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    print(f"fastcl gpu_check ({mode}) on {name}; budget {plan.budget_s:.0f} s; sections {','.join(args.sections)}", flush=True)
    if ctx.fault.section:
        print(f"INJECTING A FAULT into section {ctx.fault.section!r} (FASTCL_GPU_CHECK_INJECT_FAULT)", flush=True)
    sections: dict[str, SectionResult] = {}
    result: dict = {}

    def write() -> None:
        result.clear()
        result.update({
            "schema": 1, "mode": mode, "device": device.type, "device_name": name, "json_name": json_path.name,
            "argv": sys.argv[1:] if argv is None else list(argv), "inject_fault": ctx.fault.section,
            "plan": {k: (str(v) if not isinstance(v, (int, float, str, dict)) else v) for k, v in plan.__dict__.items()},
            "env": ctx.env, "floors": ctx.floors, "targets": ctx.targets,
            "sections": {k: s.as_dict() for k, s in sections.items()},
            "failures": failures_of(sections), "wall_s": time.perf_counter() - ctx.t0,
        })
        result["exit_code"] = 1 if result["failures"] else 0
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
        tmp.replace(json_path)

    for section in args.sections:
        sections[section] = run_section(ctx, section)
        write()
    text = markdown(result)
    md_path.write_text(text + "\n")
    print("\n" + text)
    print(f"\nwrote {json_path} and {md_path.name}")
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
