#!/usr/bin/env python
"""Render a results JSON (from ``run.py``) as a markdown performance section.

    python benchmarks/render_readme.py benchmarks/results/<device>.json             # print
    python benchmarks/render_readme.py benchmarks/results/<device>.json --write README.md

``--write`` replaces the text between the lines ``<!-- perf:start -->`` and
``<!-- perf:end -->`` of the given file (both markers must be present, in that order).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

START, END = "<!-- perf:start -->", "<!-- perf:end -->"

BASELINE_IMPL = {
    "penalty": "autograd_loop",
    "fisher": "per_sample_loop",
    "distill": "torch_kl_div",
    "fused_linear_distill": "torch_unfused",
    "e2e": "autograd_loop_ewc",
}
OP_TITLES = {
    "penalty": "Anchored penalty, value + gradient (EWC, λ·Σ F(θ−θ*)²/2)",
    "fisher": "Diagonal empirical Fisher (one pass over the data)",
    "distill": "Distillation loss, forward + backward",
    "fused_linear_distill": "LM-head distillation from hidden states, forward + backward",
    "e2e": "One EWC training epoch (task loss + penalty, SGD)",
}
RATIO_TEXT = {
    "penalty_vs_autograd_loop": "penalty: time, autograd loop / fastcl",
    "penalty_fraction_of_copy_bandwidth": "penalty: fastcl bandwidth / copy bandwidth (1 = at the memory limit)",
    "penalty_vs_foreach": "penalty: time, torch._foreach_* / fastcl",
    "penalty_vs_compiled_loop": "penalty: time, torch.compile(loop) / fastcl",
    "fisher_vs_per_sample_loop": "Fisher: time, per-sample loop / fastcl",
    "fisher_vs_vmap": "Fisher: time, torch.func vmap(grad) / fastcl",
    "fisher_memory_vs_fwd_bwd": "Fisher: peak memory, fastcl / plain forward+backward",
    "distill_vs_torch_time": "distill: time, F.kl_div / fastcl",
    "distill_vs_torch_memory": "distill: peak memory, fastcl / F.kl_div",
    "fused_linear_distill_vs_torch_time": "fused linear distill: time, unfused torch / fastcl",
    "fused_linear_distill_vs_torch_memory": "fused linear distill: peak memory, fastcl / unfused torch",
    "e2e_ewc_vs_autograd_loop": "EWC epoch: time, autograd-loop EWC / fastcl",
}


def _fmt(x, digits=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.2f}"


def render(result: dict, heading: str = "### Performance") -> str:
    """Markdown for one results dict: machine line, per-op tables, ratios."""
    machine = result.get("gpu") or result.get("cpu") or "unknown device"
    kind = "GPU" if "gpu" in result else "CPU"
    lines = [heading, ""]
    lines.append(
        f"{kind}: **{machine}** · {result.get('threads')} threads · torch {result.get('torch')} · "
        f"triton {result.get('triton') or 'n/a'} · Python {result.get('python')} · "
        f"commit `{result.get('commit') or 'unknown'}` · {result.get('date')}"
        + (" · **quick run (small sizes)**" if result.get("quick") else "")
    )
    lines.append("")
    lines.append("Median of repeated calls (p20–p80 in brackets); peak = extra memory allocated during one call "
                 f"({result.get('memory_method', 'see benchmarks/_timing.py')}). "
                 "Speedup = baseline time / row time on the same case.")
    rows = result.get("rows", [])
    ops = [op for op in OP_TITLES if any(r["op"] == op for r in rows)]
    for op in ops:
        lines += ["", f"**{OP_TITLES[op]}**", ""]
        has_bw = any(r["op"] == op and r.get("gbps") is not None for r in rows)
        head = "| case | impl | ms | peak MiB |" + (" GB/s |" if has_bw else "") + " speedup |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            if r["op"] != op:
                continue
            base = next((b for b in rows if b["op"] == op and b["case"] == r["case"] and b["impl"] == BASELINE_IMPL.get(op)), None)
            speed = base["ms_median"] / r["ms_median"] if base and r["ms_median"] > 0 else None
            cells = [r["case"], r["impl"], f"{_fmt(r['ms_median'])} [{_fmt(r['ms_p20'])}–{_fmt(r['ms_p80'])}]", _fmt(r.get("peak_mb"))]
            if has_bw:
                cells.append(_fmt(r.get("gbps")))
            cells.append("—" if speed is None else f"{_fmt(speed)}×")
            lines.append("| " + " | ".join(cells) + " |")
    ratios = result.get("ratios", {})
    details = result.get("ratio_details", {})
    if ratios:
        lines += ["", "**Headline ratios** (time: >1 means fastcl is faster; memory: <1 means fastcl uses less)", "",
                  "| ratio | value | fastcl backend | case | meaning |", "|---|---|---|---|---|"]
        for name, value in ratios.items():
            d = details.get(name, {})
            shown = _fmt(value) if value is not None else f"n/a ({d.get('reason', 'not measured')})"
            lines.append(f"| `{name}` | {shown} | {d.get('backend') or '—'} | {d.get('case', '—')} | {RATIO_TEXT.get(name, '')} |")
    skipped = result.get("skipped", [])
    if skipped:
        lines += ["", f"<details><summary>{len(skipped)} skipped rows</summary>", ""]
        lines += [f"- {s['op']} / {s['impl']} / {s['case']}: {s['reason']}" for s in skipped]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def write_between_markers(path: Path, body: str) -> None:
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == START]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise SystemExit(
            f"{path}: expected exactly one line '{START}' followed later by one line '{END}' "
            f"(found {len(starts)} start and {len(ends)} end markers)"
        )
    new = "".join(lines[: starts[0] + 1]) + body + ("" if body.endswith("\n") else "\n") + "".join(lines[ends[0]:])
    path.write_text(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Render benchmark results as markdown.")
    p.add_argument("results", type=Path, help="a JSON file written by benchmarks/run.py")
    p.add_argument("--write", type=Path, metavar="README", help="replace the text between the perf markers of this file")
    args = p.parse_args(argv)
    result = json.loads(args.results.read_text())
    body = render(result)
    if args.write:
        write_between_markers(args.write, body)
        print(f"updated {args.write}")
    else:
        sys.stdout.write(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
