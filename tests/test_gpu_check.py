"""``benchmarks/gpu_check.py --dry-run-cpu``: the GPU validation script's own code path on the CPU.

The dry run must pass (exit 0, every correctness section PASS against float64, the JSON and
markdown written, run.py's penalty benchmark merged in), and a fault injected into one
kernel output of any section must make it exit nonzero naming that check, so the checks
are shown able to fail. No timing is asserted.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CORRECTNESS = ("penalty", "sqgrad", "distill", "fused")
if str(SCRIPT.parent) not in sys.path:
    sys.path.insert(0, str(SCRIPT.parent))
import oracles  # noqa: E402
from ratios import REQUIRED  # noqa: E402

pytestmark = pytest.mark.slow


def _run(out: Path, *extra: str, fault: str | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTCL_GPU_CHECK_INJECT_FAULT", "FASTCL_BACKEND", "TRITON_INTERPRET")}
    if fault is not None:
        env["FASTCL_GPU_CHECK_INJECT_FAULT"] = fault
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run-cpu", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    files = sorted(out.glob("gpu_check-*.json"))
    assert len(files) == 1, f"expected one gpu_check JSON in {out}, found {[f.name for f in files]}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(files[0].read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc, result = _run(out)
    assert proc.returncode == 0, f"dry run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, proc, result


def test_outputs_written(dry_run):
    out, proc, result = dry_run
    assert result["exit_code"] == 0 and result["failures"] == []
    assert result["mode"] == "dry-run-cpu" and result["device"] == "cpu"
    md = out / result["json_name"].replace(".json", ".md")
    assert md.is_file() and "### Correctness" in md.read_text()
    assert "### Correctness" in proc.stdout and "| penalty | PASS |" in proc.stdout


def test_env_recorded(dry_run):
    _, _, result = dry_run
    env = result["env"]
    for key in ("device_name", "torch", "triton", "python", "commit", "date", "fastcl_cuda_usable", "backend_info_cuda_fp32", "tunables"):
        assert key in env, f"env lacks {key!r}"
    assert env["fastcl_cuda_usable"] is False
    assert isinstance(env["fastcl_cuda_unavailable_reason"], str) and env["fastcl_cuda_unavailable_reason"]
    assert set(env["backend_info_cuda_fp32"]) == {"penalty", "sqgrad", "distill"}
    assert env["tunables"]["penalty"]["BLOCK"] > 0


def test_cuda_only_parts_skipped_with_reason(dry_run):
    _, _, result = dry_run
    floors = result["sections"]["floors"]
    assert floors["status"] == "skipped" and "CUDA" in floors["reason"]
    skipped = result["sections"]["penalty"].get("skipped", [])
    assert any(s["name"].startswith("penalty[cuda]") and "CUDA" in s["reason"] for s in skipped), skipped


@pytest.mark.parametrize("section", CORRECTNESS)
def test_correctness_section_passes(dry_run, section):
    _, _, result = dry_run
    sec = result["sections"][section]
    assert sec["status"] == "pass", sec.get("error") or [c for c in sec.get("checks", []) if not c["passed"]]
    checks = sec["checks"]
    assert checks and sec["n_failed"] == 0
    for c in checks:
        assert c["passed"] and c["worst"] is not None and 0 <= c["worst"] <= 1, c
    assert any("triton" in c["name"] for c in checks), f"no Triton check in {section}"
    assert not [s for s in sec.get("skipped", []) if "budget" in s["reason"]], "a case was skipped for time"


def test_penalty_covers_dtypes_kinds_and_modes(dry_run):
    _, _, result = dry_run
    names = [c["name"] for c in result["sections"]["penalty"]["checks"]]
    for part in ("θ=fp32", "θ=bf16", "θ=fp16", "a/w=fp32", "a/w=bf16", "quadratic", " l1 ", "unweighted", "+grads", "value-only", "misaligned"):
        assert any(part in n for n in names), f"no penalty check with {part!r}"
    assert result["sections"]["penalty"]["sizes"]["n_tensors"] > 30


def test_public_apis_checked(dry_run):
    _, _, result = dry_run
    distill = [c["name"] for c in result["sections"]["distill"]["checks"]]
    assert any(n.startswith("distillation_loss[auto") for n in distill) and any(n.startswith("distillation_loss[triton]") for n in distill)
    assert any("masked" in n and "-inf teacher" in n for n in distill)
    fused = result["sections"]["fused"]["checks"]
    assert {c["name"].split("]")[0] for c in fused} >= {"fused_linear_distillation[triton"}
    assert any("torch_unfused_same_dtype" in c for c in fused)
    sq = result["sections"]["sqgrad"]["checks"]
    assert {n for c in sq for n in c["ratios"]} >= {"out", "api(non-contiguous x)"}
    assert {c["name"].split(" T=")[1].split()[0] for c in sq} == {"1", "7", "128"}


def test_bench_section_merges_run_py(dry_run):
    out, _, result = dry_run
    bench = result["sections"]["bench"]
    run = bench["runs"]["penalty"]
    assert run["rc"] == 0 and (out / run["json"]).is_file()
    assert "--quick" in run["cmd"] and "cpu" in run["cmd"]
    value = bench["ratios"]["penalty_vs_autograd_loop"]
    assert isinstance(value, float) and math.isfinite(value) and value > 0
    targets = result["targets"]
    assert set(targets) == set(REQUIRED)
    assert targets["penalty_vs_autograd_loop"]["met"] in (True, False)
    assert targets["fisher_vs_vmap"]["value"] is None and targets["fisher_vs_vmap"]["met"] is None


@pytest.mark.parametrize("fault, section", [("1", "penalty"), ("sqgrad", "sqgrad"), ("distill", "distill"), ("fused", "fused")])
def test_injected_fault_is_detected(tmp_path, fault, section):
    proc, result = _run(tmp_path, "--sections", section, fault=fault)
    assert proc.returncode == 1, f"fault in {section} not detected:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    failures = result["failures"]
    assert len(failures) == 1, failures  # exactly the perturbed check; the others still pass
    name = failures[0]["check"]
    assert name.startswith({"penalty": "penalty[", "sqgrad": "sqgrad[", "distill": "distill[", "fused": "fused_linear"}[section]), name
    assert result["sections"][section]["status"] == "fail"
    assert f"FAIL {name}" in proc.stdout and "FAILURES (1)" in proc.stdout


def test_comparison_helpers():
    want = torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64)
    bound = torch.tensor([0.1, 0.0, 0.1], dtype=torch.float64)
    assert oracles.worst_ratio(torch.tensor([1.05, 0.0, -2.0]), want, bound) == pytest.approx(0.5, rel=1e-6)
    assert oracles.worst_ratio(torch.tensor([1.0, 1e-30, -2.0]), want, bound) == math.inf  # an exact zero must stay zero
    assert oracles.worst_ratio(torch.tensor([float("nan"), 0.0, -2.0]), want, bound) == math.inf
    got = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    ref = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 4.5]], dtype=torch.float64)
    norm, row = oracles.norm_errors(got, ref, rows_per_chunk=2)
    assert norm == pytest.approx(0.5 / math.sqrt(1 + 9 + 20.25)) and row == pytest.approx(0.5 / math.sqrt(9 + 20.25))
    assert oracles.norm_errors(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [0.0]], dtype=torch.float64), 1)[1] == math.inf
