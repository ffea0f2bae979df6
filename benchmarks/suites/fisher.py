"""Diagonal empirical Fisher over a small data set: fastcl's engine vs what users run instead.

Rows per case (``cases.FISHER``, one per model kind): each entry of :data:`BASELINES` and
``fastcl[<backend>]`` (``fastcl.importance.diagonal_fisher``, the ``sqgrad`` backend forced).
**Add a baseline** (e.g. another per-sample-gradient library): write its factory in
``baselines.py`` (model -> ``fisher(batches)``, or ``None`` when not importable) and add one
:class:`Baseline` entry to :data:`BASELINES`.

Checks recorded with the rows: fastcl's and vmap's Fisher vs the per-sample loop's.
``check_sqgrad`` is ``gpu_check.py``'s sqgrad section: the Triton kernel at real layer sizes
vs the float64 oracle.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import baselines as bl
import torch
from cases import DTYPE_NAMES, ModelCase, cases
from harness.record import Config, Recorder, Unavailable, available_backends, forced, free
from inputs import make_batches, make_model
from oracles import EPS32, sqgrad_expected, worst_ratio

import fastcl
from fastcl.importance import diagonal_fisher
from fastcl.ops import use_backend

OP = "fisher"
FASTCL_OP = "sqgrad"


@dataclass(frozen=True)
class Baseline:
    """``make(model)`` returns ``fisher(batches) -> {name: tensor}`` (``None``: its library is not importable)."""

    make: Callable[[torch.nn.Module], Callable | None]
    note: str | None = None
    slow: bool = False   # seconds per call: few repetitions


BASELINES: dict[str, Baseline] = {
    "per_sample_loop": Baseline(lambda m: partial(bl.fisher_per_sample_loop, m), slow=True),
    "vmap_grad": Baseline(lambda m: partial(bl.fisher_vmap, m)),
    "squared_minibatch (wrong)": Baseline(lambda m: partial(bl.fisher_squared_minibatch, m),
                                          note="not the Fisher: squares of mini-batch mean gradients"),
    "plain_fwd_bwd": Baseline(lambda m: partial(bl.plain_forward_backward, m),
                              note="one ordinary forward+backward pass over the same data (yardstick)"),
    "backpack": Baseline(lambda m: bl.fisher_backpack_factory(copy.deepcopy(m))),
    "opacus": Baseline(lambda m: bl.fisher_opacus_factory(copy.deepcopy(m))),
}
REFERENCE = "per_sample_loop"  # the exact Fisher the others are checked against


def fastcl_fisher(model, batches):
    return diagonal_fisher(model, batches, kind="empirical")


def make_inputs(case: ModelCase, device, *, quick: bool = False):
    """The model (eval mode) and the labelled batches of one case."""
    return make_model(case.label, device, quick=quick), make_batches(case.label, case.samples, case.batch, device)


def baseline_fn(name: str, model, batches) -> Callable[[], object]:
    """Zero-argument call of baseline ``name`` on ``batches``; raises :class:`Unavailable` with the reason."""
    try:
        run = BASELINES[name].make(model)
    except Exception as exc:  # noqa: BLE001 - a factory that breaks on this model is a skipped row
        raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
    if run is None:
        raise Unavailable(f"{name} not importable")
    return partial(run, batches)


# ---------------------------------------------------------------------------- run.py


def bench(cfg: Config, rec: Recorder) -> None:
    for case in cases(OP, cfg.size):
        _bench_case(cfg, rec, case)
        free(cfg.device)


def _keep(outputs: dict, name: str, fn: Callable) -> Callable:
    def run():
        outputs[name] = fn()
    return run


def _bench_case(cfg: Config, rec: Recorder, case: ModelCase) -> None:
    device, label = cfg.device, case.label
    model, batches = make_inputs(case, device, quick=cfg.quick)
    size = sum(p.numel() for p in model.parameters())
    outputs: dict = {}  # the last result of each row, for the checks below
    for name, spec in BASELINES.items():
        try:
            fn = baseline_fn(name, model, batches)
        except Unavailable as why:
            rec.skip(OP, name, label, str(why))
            continue
        rec.measure(OP, name, label, size, _keep(outputs, name, fn), slow=spec.slow, note=spec.note)
    fastcl_rows = []
    for b in available_backends(device, FASTCL_OP, torch.float32, on_skip=lambda b, why: rec.skip(OP, f"fastcl[{b}]", label, why)):
        impl = f"fastcl[{b}]"
        if rec.measure(OP, impl, label, size, forced(b, _keep(outputs, impl, partial(fastcl_fisher, model, batches)))) is not None:
            fastcl_rows.append(impl)
    ref = outputs.get(REFERENCE)
    if ref is None:
        return
    for impl in fastcl_rows:
        rec.check(f"fisher {label} {impl} vs per-sample loop", lambda impl=impl: bl.rel_err(outputs[impl], ref))
    rec.check(f"fisher {label} vmap vs per-sample loop",
              lambda: bl.rel_err(outputs.get("vmap_grad") or bl.fisher_vmap(model, batches), ref))


# ---------------------------------------------------------------------------- gpu_check.py


def check_sqgrad(ctx, sec) -> None:
    """The Triton sqgrad kernel (fp32, bf16; powers 2 and 1) and the public API on a
    non-contiguous input vs the float64 oracle, at the layer sizes of ``ctx.plan.sqgrad``."""
    from fastcl.kernels import triton as kt

    device = ctx.device
    kernel = kt.OPS["sqgrad"]
    seed = 0
    for (B, T, I, O) in ctx.plan.sqgrad:
        for dtype in (torch.float32, torch.bfloat16):
            for power in (2, 1):
                seed += 1
                name = f"sqgrad[triton kernel] B={B} T={T} I={I} O={O} {DTYPE_NAMES[dtype]} p={power}"
                if sec.time_left() <= 0:
                    sec.skip(name, "section time budget spent")
                    continue
                t0 = time.perf_counter()
                gen = torch.Generator(device=device).manual_seed(2000 + seed)
                x = torch.randn(B, T, I, generator=gen, device=device).to(dtype)
                g = torch.randn(B, T, O, generator=gen, device=device).to(dtype)
                start = torch.rand(O, I, generator=gen, device=device)
                out = start.clone()
                kernel(x, g, out, power)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                ctx.fault.perturb("sqgrad", out)
                want, mag = sqgrad_expected(x, g, power)
                c = max(4 * T, 64) * EPS32
                bound = 2e-5 * (want + start.double()).abs() + c * mag
                ratios = {"out": worst_ratio(out, want + start.double(), bound)}
                if T == 7 and power == 2:
                    # Public API, forced Triton, non-contiguous x (the wrapper makes it contiguous).
                    x_nc = x.transpose(1, 2).contiguous().transpose(1, 2)
                    with use_backend("triton"):
                        api = fastcl.ops.sqgrad(x_nc, g, power=power)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    ratios["api(non-contiguous x)"] = worst_ratio(api, want, bound)
                sec.record(name, ratios, seconds=time.perf_counter() - t0)
                del x, g, start, out, want, mag
