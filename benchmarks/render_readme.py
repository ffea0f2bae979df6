#!/usr/bin/env python
"""Render a results JSON (from ``run.py``) as a markdown performance section (see :mod:`harness.report`).

    python benchmarks/render_readme.py benchmarks/results/<device>.json             # print
    python benchmarks/render_readme.py benchmarks/results/<device>.json --write README.md

``--write`` replaces the text between the lines ``<!-- perf:start -->`` and
``<!-- perf:end -->`` of the given file (both markers must be present, in that order).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.report import render, write_between_markers  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Render benchmark results as markdown.")
    p.add_argument("results", type=Path, help="a JSON file written by benchmarks/run.py")
    p.add_argument("--write", type=Path, metavar="README", help="replace the text between the perf markers of this file")
    args = p.parse_args(argv)
    result = json.loads(args.results.read_text())
    body = render(result, heading="### Latest run")
    if args.write:
        write_between_markers(args.write, body)
        print(f"updated {args.write}")
    else:
        sys.stdout.write(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
