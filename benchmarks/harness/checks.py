"""Recording correctness checks (``gpu_check.py``): sections with time budgets, checks as
``error / allowed error`` ratios, and fault injection that proves a check can fail."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

__all__ = ["SectionResult", "FaultInjector", "fmt", "sort_key"]


def sort_key(v):
    return math.inf if v is None or not math.isfinite(v) else v


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}"
    return str(v)


@dataclass
class SectionResult:
    name: str
    budget_s: float
    status: str = "pending"               # pass | fail | error | skipped | done
    checks: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    error: str | None = None
    wall_s: float = 0.0
    data: dict = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)
    correctness: bool = False             # a correctness section: its check list is always reported

    def time_left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def record(self, name: str, ratios: dict, *, seconds: float, **info) -> dict:
        """One check: ``ratios`` maps sub-checks to ``error / allowed error`` (pass: every one ≤ 1)."""
        clean = {k: (float(v) if v is not None else None) for k, v in ratios.items()}
        worst_key = max(clean, key=lambda k: sort_key(clean[k]))
        worst = clean[worst_key]
        passed = all(v is not None and math.isfinite(v) and v <= 1.0 for v in clean.values())
        check = {"name": name, "passed": passed, "worst": worst, "worst_of": worst_key, "ratios": clean, "seconds": round(seconds, 3), **info}
        self.checks.append(check)
        tag = "PASS" if passed else "FAIL"
        print(f"  {tag} {name:<62} worst err/tol {fmt(worst):>9} ({worst_key})  {seconds:6.2f} s", flush=True)
        return check

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append({"name": name, "reason": reason})
        print(f"  SKIP {name:<62} {reason}", flush=True)

    def as_dict(self) -> dict:
        out = {"status": self.status, "wall_s": round(self.wall_s, 2), "budget_s": self.budget_s}
        if self.checks or self.correctness:
            out["checks"] = self.checks
            out["n_checks"] = len(self.checks)
            out["n_failed"] = sum(not c["passed"] for c in self.checks)
        if self.skipped:
            out["skipped"] = self.skipped
        if self.error:
            out["error"] = self.error
        out.update(self.data)
        return out


class FaultInjector:
    """Perturbs one output element of the first kernel call of one section (``FASTCL_GPU_CHECK_INJECT_FAULT``)."""

    ALIASES = {"1": "penalty", "true": "penalty", "yes": "penalty"}

    def __init__(self, value: str | None, sections: tuple[str, ...]):
        value = (value or "").strip().lower()
        self.section = self.ALIASES.get(value, value) or None
        if self.section is not None and self.section not in sections:
            raise SystemExit(f"FASTCL_GPU_CHECK_INJECT_FAULT must be 1 or one of {sections}, got {value!r}")
        self.done = False

    def perturb(self, section: str, tensor: torch.Tensor, index: int = -1) -> bool:
        """Add 1 to element ``index`` (of the flattened view) of ``tensor`` once, for ``section``."""
        if self.done or section != self.section:
            return False
        flat = tensor.detach().view(-1)
        flat[index] = flat[index] + 1.0
        self.done = True
        return True
