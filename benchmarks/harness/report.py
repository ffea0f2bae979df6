"""Results on disk: the latest JSON per device, the append-only history, the README's markdown.

Files in a results directory (``benchmarks/results`` by default)
    ``<device-slug>.json``: the latest run on that device (rows, ratios, checks, skips).
    ``<device-slug>-<op>.png``: speedup-vs-size plots of that run (:mod:`harness.plots`).
    ``history.jsonl``: one JSON object per full run, appended, never rewritten: date, commit,
    machine, threads and the headline ratios, so that a ratio's drift over commits is one
    ``grep`` away.

The README's performance section is :func:`render` of one results JSON written between the
lines ``<!-- perf:start -->`` and ``<!-- perf:end -->`` (:func:`write_between_markers`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ratios import OPS, RATIOS

__all__ = ["write_result", "append_history", "history_entry", "render", "write_between_markers", "START", "END", "HISTORY"]

START, END = "<!-- perf:start -->", "<!-- perf:end -->"
HISTORY = "history.jsonl"


def write_result(result: dict, out_dir: Path, stem: str) -> Path:
    path = Path(out_dir) / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    return path


def history_entry(result: dict) -> dict:
    """The line ``history.jsonl`` keeps of one results dict."""
    return {
        "date": result.get("date"),
        "commit": result.get("commit"),
        "machine": result.get("gpu") or result.get("cpu"),
        "device": result.get("device"),
        "threads": result.get("threads"),
        "quick": result.get("quick"),
        "ops": result.get("ops"),
        "torch": result.get("torch"),
        "ratios": result.get("ratios", {}),
    }


def append_history(result: dict, out_dir: Path) -> Path:
    """Append :func:`history_entry` of ``result`` as one line to ``out_dir/history.jsonl``."""
    path = Path(out_dir) / HISTORY
    with path.open("a") as f:
        f.write(json.dumps(history_entry(result), default=float, ensure_ascii=False) + "\n")
    return path


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
    platform = "GPU" if "gpu" in result else "CPU"
    lines = [heading, ""]
    lines.append(
        f"{platform}: **{machine}** · {result.get('threads')} threads · torch {result.get('torch')} · "
        f"triton {result.get('triton') or 'n/a'} · Python {result.get('python')} · "
        f"commit `{result.get('commit') or 'unknown'}` · {result.get('date')}"
        + (" · **quick run (small sizes)**" if result.get("quick") else "")
    )
    lines.append("")
    lines.append("Median of repeated calls (p20–p80 in brackets); peak = extra memory allocated during one call "
                 f"({result.get('memory_method', 'see benchmarks/harness/timing.py')}). "
                 "Speedup = baseline time / row time on the same case.")
    rows = result.get("rows", [])
    for op, spec in OPS.items():
        if not any(r["op"] == op for r in rows):
            continue
        lines += ["", f"**{spec.title}**", ""]
        has_bw = any(r["op"] == op and r.get("gbps") is not None for r in rows)
        head = "| case | impl | ms | peak MiB |" + (" GB/s |" if has_bw else "") + " speedup |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            if r["op"] != op:
                continue
            base = next((b for b in rows if b["op"] == op and b["case"] == r["case"] and b["impl"] == spec.baseline), None)
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
            meaning = RATIOS[name].meaning if name in RATIOS else ""
            lines.append(f"| `{name}` | {shown} | {d.get('backend') or '—'} | {d.get('case', '—')} | {meaning} |")
    skipped = result.get("skipped", [])
    if skipped:
        lines += ["", f"<details><summary>{len(skipped)} skipped rows</summary>", ""]
        lines += [f"- {s['op']} / {s['impl']} / {s['case']}: {s['reason']}" for s in skipped]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def write_between_markers(path: Path, body: str) -> None:
    """Replace the text between the perf markers of ``path`` with ``body`` (both markers once, in order)."""
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
