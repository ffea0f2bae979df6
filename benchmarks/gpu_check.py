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
    Every kernel against the float64 oracles the tests use (``fastcl.testing``, through
    ``oracles.py``) on the same (fresh, random) inputs, computed chunk by chunk so memory
    stays bounded; each check lives with its op in ``suites/``. Element-wise checks:
    ``|got − want| ≤ bound`` with a bound made of the output dtype's rounding
    (``rtol·|want|``) plus the float32 compute error allowed by the magnitudes of the
    terms involved; the reported number is the worst ``|got − want| / bound`` (pass: ≤ 1, NaN/inf never passes; masked or exact-zero
    outputs must be exactly 0). The fused LM-head check compares norms (whole tensor and
    per row) because its bf16 matmuls round the logits.
``bench``
    ``benchmarks/run.py`` once per op (``penalty``, ``distill``, ``fisher``, ``e2e``) as
    subprocesses, each into ``DIR/bench-<op>/``, with the time left in the budget; the
    required ratios are compared with their targets (``ratios.RATIOS``).

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
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):  # fastcl from this checkout even when not installed; the harness
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from cases import DTYPE_NAMES, PLANS, Plan  # noqa: E402
from harness.checks import FaultInjector, SectionResult, fmt, sort_key  # noqa: E402
from harness.env import device_name, git_commit, slug  # noqa: E402
from harness.timing import measure_time  # noqa: E402
from ratios import RATIOS, REQUIRED, target_met  # noqa: E402
from suites import distill as s_distill  # noqa: E402
from suites import fisher as s_fisher  # noqa: E402
from suites import penalty as s_penalty  # noqa: E402

import fastcl  # noqa: E402
from fastcl.ops import backend_info  # noqa: E402

SECTIONS = ("env", "floors", "penalty", "sqgrad", "distill", "fused", "bench")
CORRECTNESS = ("penalty", "sqgrad", "distill", "fused")
BENCH_OPS = ("penalty", "distill", "fisher", "e2e")
MiB = 2**20


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
        for dtype in (torch.float32, torch.bfloat16):
            try:
                env[f"backend_info_{dev}_{DTYPE_NAMES[dtype]}"] = backend_info(dev, dtype)
            except Exception as exc:  # noqa: BLE001
                env[f"backend_info_{dev}_{DTYPE_NAMES[dtype]}"] = f"raised {type(exc).__name__}: {exc}"
    try:
        from fastcl.ops import backend_status

        env["backend_status"] = {dev: {b: s.reason if not s.available else None for b, s in backend_status(dev).items()}
                                 for dev in ("cuda", "cpu")}
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
        "sqgrad": {**pick(ks, ("BLOCK_O", "BLOCK_I", "BLOCK_T", "NUM_STAGES", "TARGET_WARPS_PER_SM", "MAX_BATCH_SPLITS", "FP32_INPUT_PRECISION")),
                   "tiles_for(16, 9, 784)": ks.tiles_for(16, 9, 784), "tiles_for(768, 768, 128)": ks.tiles_for(768, 768, 128)},
        "distill": {"MAX_BLOCK_V": getattr(kd, "MAX_BLOCK_V", None), "num_warps_for(MAX_BLOCK_V)": kd.num_warps_for(kd.MAX_BLOCK_V)},
    }


# ============================================================================ floors


def _cuda_median_ms(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median of ``reps`` CUDA-event-timed calls (no host sync between them)."""
    return measure_time(fn, device, warmup=warmup, min_reps=reps, max_reps=reps, budget_s=0.0).ms_median


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
    ms = _cuda_median_ms(lambda src=src, dst=dst: dst.copy_(src), device, warmup=3, reps=20)
    floors["copy"] = {"bytes_each_way": n * 4, "ms_median": ms, "gbps_read_plus_write": 2 * n * 4 / (ms * 1e-3) / 1e9}
    print(f"  copy {n * 4 / 2**30:.2f} GiB: {ms:.3f} ms, {floors['copy']['gbps_read_plus_write']:.0f} GB/s (read + write)", flush=True)
    del src, dst
    N = ctx.plan.matmul_n
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for label, dtype, tf32 in (("bf16", torch.bfloat16, False), ("fp32", torch.float32, False), ("tf32", torch.float32, True)):
            if sec.time_left() < 3:
                floors[f"matmul_{label}"] = {"skipped": "section budget spent"}
                continue
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(N, N, device=device, dtype=dtype)
            b = torch.randn(N, N, device=device, dtype=dtype)
            ms = _cuda_median_ms(lambda a=a, b=b: torch.mm(a, b), device, warmup=3, reps=10)
            floors[f"matmul_{label}"] = {"n": N, "ms_median": ms, "tflops": 2 * N**3 / (ms * 1e-3) / 1e12}
            print(f"  matmul {label} {N}^3: {ms:.3f} ms, {floors[f'matmul_{label}']['tflops']:.1f} TFLOP/s", flush=True)
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    sec.data["floors"] = floors
    ctx.floors = floors
    sec.status = "done"


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
    for name in REQUIRED:
        cmp, target = RATIOS[name].target
        targets[name] = {"value": ratios.get(name), "target": f"{cmp} {target:g}", "met": target_met(name, ratios.get(name))}
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
    "env": section_env, "floors": section_floors, "penalty": s_penalty.check, "sqgrad": s_fisher.check_sqgrad,
    "distill": s_distill.check_distill, "fused": s_distill.check_fused, "bench": section_bench,
}


def run_section(ctx: Context, name: str) -> SectionResult:
    budget = ctx.plan.section_budget_s.get(name, max(0.0, ctx.time_left()))
    if name in CORRECTNESS or name == "floors":
        budget = min(budget, max(0.0, ctx.time_left()))
    sec = SectionResult(name=name, budget_s=round(budget, 1), correctness=name in CORRECTNESS)
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
                out.append({"check": c["name"], "worst": c["worst"], "detail": f"worst err/tol {fmt(c['worst'])} in {c['worst_of']}; " +
                            ", ".join(f"{k} {fmt(v)}" for k, v in c["ratios"].items())})
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
        cell = lambda k, v: fmt(f.get(k, {}).get(v))  # noqa: E731
        lines.append(f"| {cell('copy', 'gbps_read_plus_write')} | {cell('matmul_bf16', 'tflops')} | {cell('matmul_fp32', 'tflops')} | {cell('matmul_tf32', 'tflops')} |")
    else:
        lines.append(f"not measured: {floors.get('reason') or floors.get('error') or floors.get('status')}")
    lines += ["", "### Correctness (float64 references)", "", "| section | status | checks | failed | skipped | worst err/tol | s |", "|---|---|---|---|---|---|---|"]
    for name in CORRECTNESS:
        sec = result["sections"].get(name)
        if sec is None:
            continue
        checks = sec.get("checks", [])
        worst = max((c["worst"] for c in checks), key=sort_key, default=None)
        lines.append(f"| {name} | {sec['status'].upper()} | {len(checks)} | {sec.get('n_failed', 0)} | {len(sec.get('skipped', []))} | {fmt(worst)} | {sec['wall_s']:.1f} |")
    if result["failures"]:
        lines += ["", f"### FAILURES ({len(result['failures'])})", "", "| check | detail |", "|---|---|"]
        lines += [f"| {f['check']} | {f['detail']} |" for f in result["failures"]]
    bench = result["sections"].get("bench")
    if bench is not None:
        lines += ["", "### Targets", ""]
        targets = bench.get("targets") or {}
        if targets:
            lines += ["| ratio | value | target | met |", "|---|---|---|---|"]
            for name, t in targets.items():
                met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
                lines.append(f"| `{name}` | {fmt(t['value'])} | {t['target']} | {met} |")
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
        plan = replace(plan, budget_s=args.budget_s)
    device = torch.device("cpu" if args.dry_run_cpu else "cuda")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    else:
        torch.set_num_threads(1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(args=args, plan=plan, device=device, out_dir=out_dir, fault=FaultInjector(os.environ.get("FASTCL_GPU_CHECK_INJECT_FAULT"), CORRECTNESS))
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
