#!/usr/bin/env python
"""Run fastcl's comparison matrix and write ``<out>/<device-slug>.json`` plus plots.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--out DIR] [--ops penalty,fisher,distill,e2e]

Every op (``suites/<op>.py``) is timed for each fastcl backend that can run on the device
(``fastcl[cpp]``, ``fastcl[torch]``, ... forced with :func:`fastcl.ops.use_backend`) and for
the baselines of its suite. Sizes: ``cases.py``; headline ratios: ``ratios.py``; timing and
memory methods: ``harness/timing.py``. A full run (not ``--quick``) also appends its
ratios to ``<out>/history.jsonl``.
"""
from __future__ import annotations

import os
import sys
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

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import time  # noqa: E402

import suites  # noqa: E402
import torch  # noqa: E402
from cases import headline  # noqa: E402
from harness import env, report  # noqa: E402
from harness.record import Config, Recorder, default_backend  # noqa: E402
from ratios import OPS, REQUIRED, compute_ratios  # noqa: E402

import fastcl  # noqa: E402
from fastcl.ops import backend_info  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, short timing (smoke run, < 45 s on 2 CPU cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default=str(HERE / "results"), help="output directory (default benchmarks/results)")
    p.add_argument("--ops", default=",".join(suites.NAMES), help=f"comma-separated subset of {','.join(suites.NAMES)}")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and OpenMP (default: torch's default; 1 with --quick)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in suites.NAMES]
    if bad:
        p.error(f"--ops: unknown op(s) {bad}; expected a subset of {suites.NAMES}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    args.ops = ops
    return args


def run(cfg: Config, ops: list[str]) -> Recorder:
    """Every suite of ``ops`` into one :class:`Recorder`."""
    rec = Recorder(cfg)
    for op in ops:
        print(f"[{op}]", flush=True)
        t0 = time.perf_counter()
        suites.load(op).bench(cfg, rec)
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return rec


def ratios_of(rec: Recorder, ops: list[str]) -> tuple[dict, dict]:
    cfg = rec.cfg

    def default(op):  # the dispatcher's backend for the op's headline dtype
        return default_backend(cfg.device, OPS[op].fastcl_op, getattr(headline(op, cfg.size), "dtype", torch.float32))

    return compute_ratios(rec.rows, headline=lambda op: headline(op, cfg.size).label, default_backend=default, ran=set(ops))


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    cfg = Config(device=device, quick=args.quick, compile=not args.no_compile and not args.quick)
    name = env.device_name(device)
    t_start = time.perf_counter()
    print(f"fastcl {fastcl.__version__} benchmarks on {name} ({'quick' if args.quick else 'full'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    rec = run(cfg, args.ops)
    ratios, ratio_details = ratios_of(rec, args.ops)
    header = env.environment(device)
    result = {
        **{k: header[k] for k in ("gpu", "cpu") if k in header},
        "device": device.type,
        "commit": header["commit"],
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **{k: header[k] for k in ("torch", "triton", "python", "fastcl", "threads", "cpu_count")},
        "quick": args.quick,
        "ops": args.ops,
        "default_backends": {op: backend_info(device)[op] for op in ("penalty", "sqgrad", "distill")},
        "timing_method": "CUDA events per call" if device.type == "cuda" else "time.perf_counter per call",
        "memory_method": "torch.cuda.max_memory_allocated above the pre-call level" if device.type == "cuda"
        else "torch.profiler(profile_memory=True): peak running sum of CPU allocator events during one call",
        "rows": rec.rows,
        "ratios": ratios,
        "ratio_details": ratio_details,
        "required_ratios": list(REQUIRED),
        "checks": rec.checks,
        "skipped": rec.skipped,
        "wall_s": None,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = env.slug(name)
    if not args.no_plots:
        try:
            from harness.plots import plot_result

            result["plots"] = [p.name for p in plot_result(result, out_dir, stem)]
        except Exception as exc:  # noqa: BLE001 - plots are a convenience
            print(f"plots failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            result["plots"] = []
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    path = report.write_result(result, out_dir, stem)
    history = None if args.quick else report.append_history(result, out_dir)
    print()
    print(report.render(result))
    print(f"wrote {path} ({result['wall_s']} s)" + (f"; appended to {history}" if history else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
