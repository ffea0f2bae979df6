"""Smoke test of the benchmark harness: ``benchmarks/run.py --quick`` runs, writes a
well-formed results JSON with every required ratio, plots, and renders into a README;
full runs append to the results history, quick ones do not.

No timing is asserted (speed belongs in benchmarks/); only the shape of the output.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RUN = BENCH / "run.py"
RENDER = BENCH / "render_readme.py"
ROW_KEYS = {"op": str, "impl": str, "case": str, "ms_median": float, "ms_p20": float, "ms_p80": float, "peak_mb": float}
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
from harness import report  # noqa: E402
from ratios import RATIOS, REQUIRED  # noqa: E402

pytestmark = pytest.mark.slow


def _fisher_engine_missing() -> bool:
    try:
        from fastcl.importance import diagonal_fisher  # noqa: F401
    except Exception:  # noqa: BLE001
        return True
    return False


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchq")
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, f"run.py --quick failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, f"expected one results JSON in {out}, found {[f.name for f in files]}"
    return out, files[0], json.loads(files[0].read_text()), proc.stdout


def test_required_ratios_are_the_targets():
    assert set(REQUIRED) == {
        "penalty_vs_autograd_loop", "penalty_fraction_of_copy_bandwidth", "fisher_vs_per_sample_loop", "fisher_vs_vmap",
        "distill_vs_torch_time", "distill_vs_torch_memory", "fused_linear_distill_vs_torch_memory",
        "fisher_memory_vs_fwd_bwd", "fisher_vs_fwd_bwd", "fisher_vs_fwd_bwd_cnn", "fisher_vs_fwd_bwd_transformer_emb",
        "fisher_vs_fwd_bwd_transformer_param", "fisher_vs_fwd_bwd_gpt2", "fisher_memory_vs_fwd_bwd_gpt2",
        "penalty_backward_fraction_of_copy_bandwidth", "penalty_backward_grad_fraction_of_copy_bandwidth",
        "penalty_backward_vs_autograd_loop", "penalty_backward_grad_vs_autograd_loop", "e2e_penalty_vs_plain",
    }


def test_header(quick_run):
    _, _, result, _ = quick_run
    for key in ("cpu", "commit", "date", "torch", "triton", "python", "threads", "rows", "ratios"):
        assert key in result, f"results JSON lacks {key!r}"
    assert isinstance(result["cpu"], str) and result["cpu"]
    assert isinstance(result["threads"], int) and result["threads"] >= 1
    assert result["triton"] is None or isinstance(result["triton"], str)


def test_rows_schema(quick_run):
    _, _, result, _ = quick_run
    rows = result["rows"]
    assert rows, "no rows measured"
    for row in rows:
        for key, typ in ROW_KEYS.items():
            assert isinstance(row.get(key), (int, float) if typ is float else typ), f"row {row} has bad {key!r}"
        assert row["gbps"] is None or (isinstance(row["gbps"], float) and row["gbps"] > 0)
        assert 0 < row["ms_p20"] <= row["ms_median"] <= row["ms_p80"], row
        assert row["peak_mb"] >= 0, row
    ops = {r["op"] for r in rows}
    assert {"penalty", "fisher", "distill", "fused_linear_distill", "e2e"} <= ops
    assert any(r["impl"].startswith("fastcl[") for r in rows if r["op"] == "penalty")


def test_required_ratios(quick_run):
    _, _, result, _ = quick_run
    ratios, details = result["ratios"], result.get("ratio_details", {})
    engine_missing = _fisher_engine_missing()
    for name in REQUIRED:
        assert name in ratios, f"ratio {name} missing"
        value = ratios[name]
        if engine_missing and name.startswith("fisher_"):
            assert value is None and details[name].get("reason"), f"{name}: expected n/a with a reason while the Fisher engine is missing"
            continue
        assert isinstance(value, float) and math.isfinite(value), f"{name} = {value!r} ({details.get(name)})"
        assert value >= 0 if RATIOS[name].measure == "mem" else value > 0, f"{name} = {value}"
        assert details[name].get("backend"), f"{name}: no backend recorded"


def test_plots_written(quick_run):
    out, _, result, _ = quick_run
    pngs = sorted(out.glob("*.png"))
    assert pngs and result.get("plots"), "no plots written"
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_readme(quick_run, tmp_path):
    _, path, _, _ = quick_run
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- perf:start -->\nold text\n<!-- perf:end -->\nafter\n")
    proc = subprocess.run([sys.executable, str(RENDER), str(path), "--write", str(readme)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert "old text" not in text and "penalty_vs_autograd_loop" in text
    assert text.startswith("# x\n\nbefore\n<!-- perf:start -->\n") and text.endswith("<!-- perf:end -->\nafter\n")

    readme.write_text("# no markers here\n")
    proc = subprocess.run([sys.executable, str(RENDER), str(path), "--write", str(readme)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "perf:start" in (proc.stderr + proc.stdout)
    assert readme.read_text() == "# no markers here\n"


def test_history(quick_run, tmp_path):
    out, path, result, _ = quick_run
    assert not (out / report.HISTORY).exists(), "a --quick run must not append to the results history"
    first = report.append_history(result, tmp_path)
    report.append_history({**result, "commit": "abc"}, tmp_path)
    lines = [json.loads(line) for line in first.read_text().splitlines()]
    assert len(lines) == 2 and [e["commit"] for e in lines] == [result["commit"], "abc"]
    for entry in lines:
        assert entry["date"] == result["date"] and entry["machine"] == result["cpu"] and entry["threads"] == result["threads"]
        assert entry["ratios"] == result["ratios"]
