#!/usr/bin/env python
"""Speedup-vs-size plots, one PNG per op, from a results dict or JSON file.

    python benchmarks/plot.py benchmarks/results/<device>.json [--out DIR]

y = baseline time / impl time on the same case (baseline: the "what users run today"
row of the op), x = problem size (parameters, logits elements, or model parameters).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from render_readme import BASELINE_IMPL, OP_TITLES


def plot_result(result: dict, out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.get("rows", [])
    machine = result.get("gpu") or result.get("cpu") or ""
    written = []
    for op, base_impl in BASELINE_IMPL.items():
        op_rows = [r for r in rows if r["op"] == op]
        bases = {r["case"]: r for r in op_rows if r["impl"] == base_impl}
        if not bases:
            continue
        dtypes = {c.split()[-1] for c in bases if c.split()[-1] in ("fp32", "bf16", "fp16")}
        series: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        for r in op_rows:
            base = bases.get(r["case"])
            if base is None or r["ms_median"] <= 0:
                continue
            label = r["impl"]
            if len(dtypes) > 1:
                label += " " + r["case"].split()[-1]
            series[label].append((float(r["size"]), base["ms_median"] / r["ms_median"], r["case"]))
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("size (elements / parameters)")
        ax.set_ylabel(f"speedup vs {base_impl}")
        ax.set_title(f"{OP_TITLES.get(op, op)}\n{machine}", fontsize=9)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = Path(out_dir) / f"{stem}-{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


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
