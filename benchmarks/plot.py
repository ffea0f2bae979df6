#!/usr/bin/env python
"""Speedup-vs-size plots, one PNG per op, from a results JSON (see :mod:`harness.plots`).

    python benchmarks/plot.py benchmarks/results/<device>.json [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.plots import plot_result  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Plot speedup vs size per op.")
    p.add_argument("results", type=Path)
    p.add_argument("--out", type=Path, default=None, help="directory for the PNGs (default: beside the JSON)")
    args = p.parse_args(argv)
    result = json.loads(args.results.read_text())
    out = args.out or args.results.parent
    out.mkdir(parents=True, exist_ok=True)
    for path in plot_result(result, out, args.results.stem):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
