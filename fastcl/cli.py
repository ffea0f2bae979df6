"""The ``fastcl`` command (also ``python -m fastcl``).

Subcommands:

* ``fastcl demo``: every strategy on permuted and split digits, one table (see :mod:`fastcl.demo`);
  ``--strength ewc=100`` overrides a strength, ``--sweep-strength`` trains each regularizer over
  a grid of strengths.
* ``fastcl info``: versions, devices and the backend each op would use on each device.
* ``fastcl bench [ARGS...]``: ``benchmarks/run.py ARGS...`` from the source tree (or
  ``$FASTCL_BENCHMARKS``), results in ``--out DIR`` (default ``./fastcl-bench``); from a
  wheel, it says what to run instead.

Bad input prints one line ``fastcl <cmd>: error: <what>`` on stderr and exits with 2; a
failure while running (e.g. a diverged training run) prints one line and exits with 1
(``FASTCL_DEBUG=1`` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump) and exit with 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(convert, accepts, what: str, bound_what: str | None = None):
    """An argparse ``type``: ``convert(text)`` that must satisfy ``accepts(value)``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {bound_what or what}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number", "a positive finite number")
_non_negative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0", "a finite number >= 0")
_FLOAT32_MAX = 3.4028234663852886e38  # the kernels compute in float32: a strength beyond it becomes inf
_strength = _number(float, lambda v: math.isfinite(v) and 0 <= v <= _FLOAT32_MAX, "a number >= 0",
                    f"a finite number >= 0 that fits in float32 (<= {_FLOAT32_MAX:.4g})")


def _build_parser() -> tuple[_Parser, _Parser]:
    """The ``fastcl`` parser and its ``demo`` subparser."""
    from .demo import REGULARIZERS, SCENARIOS, STRATEGIES, SWEEP_FACTORS, DemoConfig

    defaults = DemoConfig()
    parser = _Parser(prog="fastcl", description="fastcl: retrain a PyTorch network on new data without forgetting the old.")
    parser.add_argument("--version", action="version", version=f"fastcl {_fastcl_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,info,bench}")

    demo = sub.add_parser(
        "demo",
        help="continual learning on the bundled digits with every strategy",
        description=(
            "Train every strategy on 5 tasks of scikit-learn's digits (permuted pixels: domain-incremental; "
            "pairs of digits: task-incremental) from the same initial weights and data order, and print "
            "average accuracy, forgetting and backward transfer after the last task."
        ),
    )
    demo.add_argument("--scenario", default="all", choices=(*SCENARIOS, "all"), help="scenario to run (default: all)")
    demo.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        metavar="LIST",
        help=f"comma-separated strategies from {','.join(STRATEGIES)} (default: all)",
    )
    demo.add_argument("--epochs", type=_positive_int, default=defaults.epochs, help=f"epochs per task (default: {defaults.epochs})")
    demo.add_argument("--seed", type=_non_negative_int, default=defaults.seed, help="seed of the data split, permutations, initial weights and batch order")
    demo.add_argument("--lr", type=_positive_float, default=defaults.lr, help=f"SGD learning rate (default: {defaults.lr})")
    demo.add_argument("--hidden", type=_positive_int, default=defaults.hidden, help=f"hidden width of the MLP (default: {defaults.hidden})")
    demo.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    demo.add_argument(
        "--strength",
        action="append",
        default=[],
        metavar="STRATEGY=VALUE",
        help=f"override a strategy's strength λ (repeatable), e.g. --strength ewc=100 --strength lwf=2; "
        f"strategies with one: {','.join(REGULARIZERS)} (a +replay variant uses its base's)",
    )
    demo.add_argument(
        "--sweep-strength",
        action="store_true",
        help="instead of one run per strategy, train each regularizer in --strategies over a grid of strengths "
        "(default × each of --sweep-factors) and report final accuracy and forgetting against strength",
    )
    demo.add_argument(
        "--sweep-factors",
        default=None,
        metavar="LIST",
        help="comma-separated multiples of each default strength for --sweep-strength only "
        f"(default: {','.join(f'{f:g}' for f in SWEEP_FACTORS)})",
    )
    demo.add_argument("--json", metavar="PATH", help="write the results, the configuration, versions and backends as JSON")
    demo.add_argument(
        "--plot",
        metavar="FILE.png",
        help="plot average accuracy after each task (with --sweep-strength: accuracy and forgetting against "
        "strength); .png, .pdf or .svg (needs matplotlib)",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bar (it is shown on stderr only when stderr is a terminal)")

    sub.add_parser("info", help="versions, devices and the backend of each op", description="Versions, devices and backends.")
    sub.add_parser(
        "bench",
        help="run benchmarks/run.py from the source tree (arguments are passed through; results in --out, default ./fastcl-bench)",
        description="Run benchmarks/run.py from the source tree; all arguments are passed to it.",
        add_help=False,
    )
    return parser, demo


def _fastcl_version() -> str:
    from ._version import __version__

    return __version__


# ---------------------------------------------------------------------------- demo
def _parse_strategies(parser: _Parser, text: str) -> list[str]:
    from .demo import STRATEGIES

    names = [s.strip() for s in text.split(",")]
    if not any(names):
        parser.error("--strategies is empty")
    if not all(names):
        parser.error(f"--strategies {text!r} has an empty entry (two commas in a row, or one at an end)")
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategy {', '.join(map(repr, unknown))} in --strategies; choose from {','.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


def _check_device(parser: _Parser, text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {text}: CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        parser.error(f"--device {text}: only cpu and cuda devices are supported")
    return str(device)


_PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def _check_output_path(parser: _Parser, flag: str, text: str, suffixes: tuple[str, ...]) -> Path:
    """An output file path checked before any work: not a directory, a known suffix, a writable folder."""
    path = Path(text).expanduser()
    if path.is_dir():
        parser.error(f"{flag} {text} is a directory; give a file name such as {path / ('demo' + suffixes[0])}")
    if path.suffix.lower() not in suffixes:
        parser.error(f"{flag} {text}: expected a file name ending in {', '.join(suffixes)}")
    parent = path.resolve().parent
    if not parent.is_dir():
        parser.error(f"{flag} {text}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        parser.error(f"{flag} {text}: not writable")
    return path


def _parse_strengths(parser: _Parser, items: Sequence[str]) -> dict[str, float]:
    from .demo import REGULARIZERS

    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            parser.error(f"--strength {item!r}: expected STRATEGY=VALUE, e.g. ewc=100")
        base = "finetune" if name == "replay" else name.removesuffix("+replay")
        if base not in REGULARIZERS:
            parser.error(f"--strength {item!r}: {name!r} has no strength; choose from {','.join(REGULARIZERS)}")
        try:
            out[base] = _strength(value)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"--strength {item!r}: {exc}")
    return out


def _parse_factors(parser: _Parser, text: str | None, sweep: bool) -> list[float]:
    from .demo import SWEEP_FACTORS

    if text is None:
        return list(SWEEP_FACTORS)
    if not sweep:
        parser.error("--sweep-factors applies to --sweep-strength only; add --sweep-strength or drop --sweep-factors")
    try:
        factors = [_positive_float(v) for v in text.split(",") if v.strip()]
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--sweep-factors: {exc}")
    if not factors:
        parser.error("--sweep-factors is empty")
    return factors


def _run_demo(args: argparse.Namespace, parser: _Parser) -> int:
    import json

    from .demo import REGULARIZERS, SCENARIOS, STRATEGIES

    strategies = _parse_strategies(parser, args.strategies)
    strengths = _parse_strengths(parser, args.strength)
    device = _check_device(parser, args.device)
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    json_path = None if args.json is None else _check_output_path(parser, "--json", args.json, (".json",))
    plot_path = None if args.plot is None else _check_output_path(parser, "--plot", args.plot, _PLOT_SUFFIXES)
    factors = _parse_factors(parser, args.sweep_factors, args.sweep_strength)
    if args.sweep_strength:
        requested = [s for s in strategies if s in REGULARIZERS]
        if args.strategies == ",".join(STRATEGIES):  # the default: every regularizer
            requested = list(REGULARIZERS)
        if not requested:
            parser.error(f"--sweep-strength needs regularizers in --strategies ({','.join(REGULARIZERS)})")
        strategies = requested
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("fastcl demo: error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("fastcl demo: error: the demo needs scikit-learn for its bundled digits (pip install scikit-learn)", file=sys.stderr)
        return 2
    import torch

    from .demo import config_with, format_sweep, format_table, run_demo, run_record, run_sweep, save_plot, save_sweep_plot

    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # the MLP is tiny: intra-op threads cost more than they bring
    cfg = config_with(epochs=args.epochs, seed=args.seed, device=device, lr=args.lr, hidden=args.hidden)
    cfg.strengths.update(strengths)
    progress = False if args.quiet else None
    if args.sweep_strength:
        results = run_sweep(scenarios, strategies, cfg, factors, progress=progress)
        print(format_sweep(results))
        record = run_record(cfg, scenarios, strategies, sweep_factors=factors)
    else:
        results = run_demo(scenarios, strategies, cfg, progress=progress)
        print(format_table(results))
        record = run_record(cfg, scenarios, strategies)
    if json_path is not None:
        with open(json_path, "w") as fh:
            json.dump({**record, "results": results}, fh, indent=2)
        print(f"wrote {json_path}", file=sys.stderr)
    if plot_path is not None:
        (save_sweep_plot if args.sweep_strength else save_plot)(results, str(plot_path))
        print(f"wrote {plot_path}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- info
def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _run_info() -> int:
    import torch

    from .ops import backend_status, op_backends

    print(f"fastcl  {_fastcl_version()}")
    print(f"torch   {torch.__version__}")
    print(f"triton  {_package_version('triton')}")
    print(f"python  {platform.python_version()} ({sys.executable})")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        print(f"cuda    {torch.version.cuda}")
    print("devices:")
    for dev in devices:
        name = (platform.processor() or platform.machine()) if dev == "cpu" else torch.cuda.get_device_name(dev)
        print(f"  {dev}: {name}")
        ops = op_backends(dev)
        print("    ops: " + ", ".join(f"{op} -> {s.name if s.available else 'unavailable'}" for op, s in ops.items()))
        for op, s in ops.items():
            if not s.available:
                print(f"      {op} cannot run: {_one_line(s.reason)}")
        for backend, s in backend_status(dev).items():
            detail = ""
            if backend == "cpp" and s.available:
                from .kernels import cpp

                detail = f" (distill kernel: {cpp._C.distill_isa()})"
            print(f"    {backend}: " + ("available" + detail if s.available else f"unavailable ({_one_line(s.reason)})"))
    from ._build_report import describe, status_path
    from .kernels import cpp, cuda

    print(f"build ({status_path().name}, written when fastcl was installed):")
    for name, module in (("fastcl._C", cpp), ("fastcl._cuda", cuda)):
        print(f"  {name}: {describe(name, module.BUILD_ERROR)}")
    return 0


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------- bench
BENCH_OUT = "fastcl-bench"
"""Where ``fastcl bench`` writes when not given ``--out``: a folder in the current directory."""


def _find_bench_script() -> Path | None:
    """``run.py`` from ``$FASTCL_BENCHMARKS``, the source tree around this package, or ``./benchmarks``."""
    candidates = []
    if os.environ.get("FASTCL_BENCHMARKS"):
        candidates.append(Path(os.environ["FASTCL_BENCHMARKS"]).expanduser())
    candidates += [Path(__file__).resolve().parent.parent / "benchmarks", Path.cwd() / "benchmarks"]
    for folder in candidates:
        if (folder / "run.py").is_file() and (folder / "suites").is_dir():
            return folder / "run.py"
    return None


def _run_bench(argv: Sequence[str]) -> int:
    """``benchmarks/run.py ARGS`` with results in ``--out`` (default ``./fastcl-bench``), never the source tree."""
    script = _find_bench_script()
    if script is None:
        print(
            "fastcl bench: the benchmarks are not installed with the package (they ship with fastcl's source tree).\n"
            "  From a checkout of the source:   pip install -e \".[bench]\" && fastcl bench --quick\n"
            "  Or point at its benchmarks:      FASTCL_BENCHMARKS=/path/to/fastcl/benchmarks fastcl bench --quick\n"
            f"  Results go to --out DIR (default ./{BENCH_OUT}).",
            file=sys.stderr,
        )
        return 2
    argv = list(argv)
    asks_help = any(a in ("-h", "--help") for a in argv)
    if not asks_help and not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", str(Path.cwd() / BENCH_OUT)]
        print(f"fastcl bench: writing results to {Path.cwd() / BENCH_OUT} (choose with --out DIR)", file=sys.stderr)
    return subprocess.call([sys.executable, str(script), *argv])


# ---------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fastcl`` / ``python -m fastcl``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _run_bench(argv[1:])
    parser, demo_parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        (demo_parser if args.command == "demo" else parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.error("a command is required: demo, info or bench")
    try:
        if args.command == "info":
            return _run_info()
        return _run_demo(args, demo_parser)
    except KeyboardInterrupt:
        print("fastcl: interrupted", file=sys.stderr)
        return 130
    except (FloatingPointError, ValueError, RuntimeError, OSError) as exc:
        # user-facing failures (a diverged run, a bad FASTCL_BACKEND, an unwritable path): one line,
        # no traceback unless FASTCL_DEBUG=1
        if os.environ.get("FASTCL_DEBUG"):
            raise
        print(f"fastcl {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
