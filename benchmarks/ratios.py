"""What fastcl is compared against: the ops' rows, their speedup baseline, and the headline ratios.

Every ratio compares two rows of the same run on one case: the op's headline case
(:func:`cases.headline`) unless the ratio names its own, and the fastcl row of the backend
the dispatcher picks by default for that device and dtype.

Kinds
    ``time``: baseline ms / fastcl ms (> 1: fastcl faster).
    ``bw``: copy ms / fastcl ms for the same bytes (1: fastcl at the memory-bandwidth limit).
    ``mem``: fastcl peak MiB / baseline peak MiB (< 1: fastcl uses less).

A ratio with a ``target`` is required: ``gpu_check.py`` compares it with its target and the
quick-run test demands a value. Add a ratio: one entry in :data:`RATIOS` (its rows must exist).

This module imports neither torch nor fastcl, so the renderers can use it anywhere.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Op", "OPS", "Ratio", "RATIOS", "REQUIRED", "compute_ratios", "target_met"]


@dataclass(frozen=True)
class Op:
    """One kind of row (``row["op"]``)."""

    suite: str       # the run.py --ops name (benchmarks/suites/<suite>.py) that records these rows
    fastcl_op: str   # the dispatcher op whose backend the fastcl rows force (fastcl.ops.backend_info)
    baseline: str    # the impl every row's speedup is quoted against (README tables, plots)
    title: str


OPS = {
    "penalty": Op("penalty", "penalty", "autograd_loop", "Anchored penalty, value + gradient (EWC, λ·Σ F(θ−θ*)²/2)"),
    "fisher": Op("fisher", "sqgrad", "per_sample_loop", "Diagonal empirical Fisher (one pass over the data)"),
    "distill": Op("distill", "distill", "torch_kl_div", "Distillation loss, forward + backward"),
    "fused_linear_distill": Op("distill", "distill", "torch_unfused", "LM-head distillation from hidden states, forward + backward"),
    "e2e": Op("e2e", "penalty", "autograd_loop_ewc", "One EWC training epoch (task loss + penalty, SGD)"),
}


@dataclass(frozen=True)
class Ratio:
    op: str                                   # a key of OPS
    baseline: str                             # the baseline row's impl
    measure: str                                 # "time" | "bw" | "mem" (module docstring)
    meaning: str
    target: tuple[str, float] | None = None   # (">=" or "<=", value): a required ratio
    case: str | None = None                   # a fixed case instead of the op's headline case
    fastcl: str = ""                          # suffix of the fastcl row: "fastcl[<backend>]<fastcl>"


RATIOS = {
    "penalty_vs_autograd_loop": Ratio("penalty", "autograd_loop", "time", "penalty: time, autograd loop / fastcl", (">=", 20.0)),
    "penalty_fraction_of_copy_bandwidth": Ratio(
        "penalty", "copy_same_bytes", "bw", "penalty: fastcl bandwidth / copy bandwidth (1 = at the memory limit)", (">=", 0.85)),
    "penalty_vs_foreach": Ratio("penalty", "foreach", "time", "penalty: time, torch._foreach_* / fastcl"),
    "penalty_vs_compiled_loop": Ratio("penalty", "compiled_loop", "time", "penalty: time, torch.compile(loop) / fastcl"),
    # penalty().backward() with .grad None, then present: against a copy of the same bytes, and the autograd loop
    **{f"penalty_backward{key}_{what}": Ratio(
        "penalty", baseline + (" grad=None" if key == "" and what == "vs_autograd_loop" else ""), measure,
        f"penalty().backward(), .grad {state}: {title}", (">=", bound if what == "vs_autograd_loop" else bw_bound),
        fastcl=" penalty().backward()" + suffix)
       for what, baseline, measure, title, bound in (
           ("fraction_of_copy_bandwidth", "copy_same_bytes", "bw", "copy time / fastcl time (same bytes)", None),
           ("vs_autograd_loop", "autograd_loop", "time", "time, autograd loop / fastcl", 4.0))
       for key, state, suffix, bw_bound in (("", "None", "", 0.8), ("_grad", "present", " +grad", 0.55))},
    "fisher_vs_per_sample_loop": Ratio("fisher", "per_sample_loop", "time", "Fisher: time, per-sample loop / fastcl", (">=", 50.0)),
    "fisher_vs_vmap": Ratio("fisher", "vmap_grad", "time", "Fisher: time, torch.func vmap(grad) / fastcl", (">=", 3.0)),
    "fisher_memory_vs_fwd_bwd": Ratio(
        "fisher", "plain_fwd_bwd", "mem", "Fisher: peak memory, fastcl / plain forward+backward", ("<=", 1.25),
        case="transformer"),
    # The Fisher against one ordinary forward+backward over the same data (targets:
    # fastcl ≤ 1.3× plain for the MLP, ≤ 1.5× for the CNN and the transformers), and against
    # the per-sample-gradient libraries wherever they run.
    "fisher_vs_fwd_bwd": Ratio(
        "fisher", "plain_fwd_bwd", "time", "Fisher (MLP): time, plain fwd+bwd / fastcl (≥ 0.77: fastcl ≤ 1.3× plain)",
        (">=", 0.77)),
    **{f"fisher_vs_fwd_bwd_{case}": Ratio(
        "fisher", "plain_fwd_bwd", "time", f"Fisher ({case}): time, plain fwd+bwd / fastcl (≥ 0.67: fastcl ≤ 1.5× plain)",
        (">=", 0.667), case=case) for case in ("cnn", "transformer_emb", "transformer_param", "gpt2")},
    "fisher_memory_vs_fwd_bwd_gpt2": Ratio(
        "fisher", "plain_fwd_bwd", "mem", "Fisher (GPT-2, batch = sequence): peak memory, fastcl / plain fwd+bwd",
        ("<=", 1.25), case="gpt2"),
    **{f"fisher_vs_{peer}_{case}": Ratio("fisher", peer, "time", f"Fisher ({case}): time, {title} / fastcl", case=case)
       for peer, title in (("vmap_grad", "torch.func vmap(grad)"), ("backpack", "BackPACK SumGradSquared"),
                           ("opacus", "Opacus per-sample gradients²"))
       for case in ("mlp", "cnn", "transformer_emb", "transformer_param", "gpt2")},
    "distill_vs_torch_time": Ratio("distill", "torch_kl_div", "time", "distill: time, F.kl_div / fastcl", (">=", 2.0)),
    "distill_vs_torch_memory": Ratio("distill", "torch_kl_div", "mem", "distill: peak memory, fastcl / F.kl_div", ("<=", 0.5)),
    "fused_linear_distill_vs_torch_time": Ratio(
        "fused_linear_distill", "torch_unfused", "time", "fused linear distill: time, unfused torch / fastcl"),
    "fused_linear_distill_vs_torch_memory": Ratio(
        "fused_linear_distill", "torch_unfused", "mem", "fused linear distill: peak memory, fastcl / unfused torch", ("<=", 0.2)),
    "e2e_ewc_vs_autograd_loop": Ratio("e2e", "autograd_loop_ewc", "time", "EWC epoch: time, autograd-loop EWC / fastcl"),
    # an EWC epoch against a plain one (1 = free); the drop-in path's target: within 1.10× of plain
    "e2e_penalty_vs_plain": Ratio(
        "e2e", "plain", "time", "EWC epoch with loss + ewc.penalty(): time, plain epoch / fastcl (1 = free)",
        (">=", 1 / 1.10), fastcl=" penalty()"),
    "e2e_fused_vs_plain": Ratio(
        "e2e", "plain", "time", "EWC epoch with ewc.add_penalty_grad_(): time, plain epoch / fastcl (1 = free)"),
    "e2e_attach_vs_plain": Ratio(
        "e2e", "plain", "time", "EWC epoch with ewc.attach(optimizer): time, plain epoch / fastcl (1 = free)",
        fastcl=" attach"),
}
REQUIRED = tuple(name for name, r in RATIOS.items() if r.target is not None)


def target_met(name: str, value: float | None) -> bool | None:
    """Whether ``value`` meets ratio ``name``'s target (``None``: no value or no target)."""
    target = RATIOS[name].target
    if value is None or target is None:
        return None
    cmp, bound = target
    return value >= bound if cmp == ">=" else value <= bound


def _find(rows, op, impl, case):
    return next((r for r in rows if r["op"] == op and r["impl"] == impl and r["case"] == case), None)


def compute_ratios(rows: list[dict], *, headline: Callable[[str], str], default_backend: Callable[[str], str | None],
                   ran: set[str]) -> tuple[dict, dict]:
    """``({name: value or None}, {name: details})`` for every ratio of :data:`RATIOS`.

    ``headline(op)``: the op's headline case label; ``default_backend(op)``: the backend the
    dispatcher picks for the op's fastcl rows on the headline case (``None``: unavailable);
    ``ran``: the suites that ran. A missing value comes with a ``reason``.
    """
    ratios, details = {}, {}
    for name, spec in RATIOS.items():
        case = spec.case or headline(spec.op)
        info = {"op": spec.op, "case": case, "baseline": spec.baseline}
        ratios[name] = None
        details[name] = info
        if OPS[spec.op].suite not in ran:
            info["reason"] = "op not run (--ops)"
            continue
        backend = default_backend(spec.op)
        info["backend"] = backend
        fast = _find(rows, spec.op, f"fastcl[{backend}]{spec.fastcl}", case) if backend else None
        if fast is None:
            pattern = r"fastcl\[\w+\]" + re.escape(spec.fastcl)
            candidates = [r for r in rows if r["op"] == spec.op and r["case"] == case and re.fullmatch(pattern, r["impl"])]
            if candidates:
                fast = min(candidates, key=lambda r: r["ms_median"])
                info["backend"] = fast["impl"][7:-1]
                info["note"] = f"default backend {backend!r} has no row; fastest measured fastcl row used"
        base = _find(rows, spec.op, spec.baseline, case)
        if fast is None or base is None:
            info["reason"] = "missing row: " + ", ".join(x for x, r in (("fastcl", fast), (spec.baseline, base)) if r is None)
            continue
        info["fastcl_impl"] = fast["impl"]
        if spec.measure in ("time", "bw"):
            value = base["ms_median"] / fast["ms_median"] if fast["ms_median"] > 0 else None
        else:
            value = fast["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else None
            if value is None:
                info["reason"] = "baseline peak is 0"
        ratios[name] = value
    return ratios, details
