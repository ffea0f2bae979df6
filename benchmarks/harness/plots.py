"""Speedup-vs-size plots, one PNG per op: y = speedup baseline time / row time on the same
case (the baseline of ``ratios.OPS``), x = problem size (parameters, logits elements, or
model parameters)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ratios import OPS

__all__ = ["plot_result"]


def plot_result(result: dict, out_dir: Path, stem: str) -> list[Path]:
    """Write ``<out_dir>/<stem>-<op>.png`` for each op with baseline rows; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.get("rows", [])
    machine = result.get("gpu") or result.get("cpu") or ""
    written = []
    for op, spec in OPS.items():
        op_rows = [r for r in rows if r["op"] == op]
        bases = {r["case"]: r for r in op_rows if r["impl"] == spec.baseline}
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
        ax.set_ylabel(f"speedup vs {spec.baseline}")
        ax.set_title(f"{spec.title}\n{machine}", fontsize=9)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = Path(out_dir) / f"{stem}-{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
