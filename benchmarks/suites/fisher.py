"""Diagonal empirical Fisher over a small data set: fastcl's engine vs what users run instead.

Rows per case (``cases.FISHER``, one per model kind: MLP, CNN, transformers with float
features, ``nn.Embedding`` positions and ``Parameter`` positions, a GPT-2-shaped causal LM
whose batch size equals its sequence length): each entry of :data:`BASELINES` (the
per-sample loop, ``torch.func`` vmap(grad), BackPACK's ``SumGradSquared``, Opacus' per-sample
gradients squared, a plain forward+backward as the yardstick) and ``fastcl[<backend>]``
(``fastcl.importance.diagonal_fisher``, the ``sqgrad`` backend forced). Every row computes
the same per-sample losses (:data:`LOSSES`: the cross-entropy of a label, or the per-sequence
next-token loss of the causal LM). **Add a baseline** (e.g. another per-sample-gradient
library): write its factory in ``baselines.py`` (model, loss -> ``fisher(batches)``, or
``None`` when not importable) and add one :class:`Baseline` entry to :data:`BASELINES`.

Checks recorded with the rows: every other row's Fisher vs the per-sample loop's.
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
import torch.nn.functional as F
from cases import DTYPE_NAMES, ModelCase, cases
from harness.record import Config, Recorder, Unavailable, available_backends, forced, free
from inputs import make_batches, make_model
from oracles import EPS32, sqgrad_expected, worst_ratio

import fastcl
from fastcl.importance import diagonal_fisher
from fastcl.ops import use_backend

INSTALL_PEERS = ('pip install -c requirements/torch-cpu.txt -e ".[bench]" && '
                 "pip install -c requirements/torch-cpu.txt --no-deps backpack-for-pytorch")
OP = "fisher"
FASTCL_OP = "sqgrad"


@dataclass(frozen=True)
class Loss:
    """The per-sample loss of a case, in the three forms the rows need."""

    per_sample: Callable  # (outputs, targets) -> [B]: fastcl's loss_fn
    mean: Callable        # (outputs, targets) -> scalar mean: the autograd baselines' loss_fn
    sum: Callable         # (outputs, targets) -> scalar sum: BackPACK's and Opacus' backward


def _causal_lm(per_sample):
    return Loss(per_sample, lambda o, t: per_sample(o, t).mean(), lambda o, t: per_sample(o, t).sum())


CROSS_ENTROPY = Loss(partial(F.cross_entropy, reduction="none"), F.cross_entropy, partial(F.cross_entropy, reduction="sum"))


def loss_of(label: str) -> Loss:
    if label == "gpt2":
        from fastcl.integrations.hf import causal_lm_per_sequence_loss

        return _causal_lm(causal_lm_per_sequence_loss)
    return CROSS_ENTROPY


@dataclass(frozen=True)
class Baseline:
    """``make(model, loss)`` returns ``fisher(batches) -> {name: tensor}`` (``None``: its library is not importable)."""

    make: Callable[[torch.nn.Module, Loss], Callable | None]
    note: str | None = None
    slow: bool = False   # seconds per call: few repetitions


# The order is the round-robin order of the timed calls (the fastcl rows come last). The peers that
# allocate and release hundreds of MiB (vmap, Opacus) come first and the cheap reference row
# squared_minibatch follows them, so that the yardstick (plain_fwd_bwd) and the fastcl rows each
# follow a small pass on a warm allocator, not the page faults of the memory a peer just released.
BASELINES: dict[str, Baseline] = {
    "per_sample_loop": Baseline(lambda m, loss: partial(bl.fisher_per_sample_loop, m, loss_fn=loss.mean), slow=True),
    "vmap_grad": Baseline(lambda m, loss: partial(bl.fisher_vmap, m, loss_fn=loss.mean)),
    "backpack": Baseline(lambda m, loss: bl.fisher_backpack_factory(copy.deepcopy(m), loss.sum)),
    "opacus": Baseline(lambda m, loss: bl.fisher_opacus_factory(copy.deepcopy(m), loss.sum)),
    "squared_minibatch (wrong)": Baseline(lambda m, loss: partial(bl.fisher_squared_minibatch, m, loss_fn=loss.mean),
                                          note="not the Fisher: squares of mini-batch mean gradients"),
    "plain_fwd_bwd": Baseline(lambda m, loss: partial(bl.plain_forward_backward, m, loss_fn=loss.mean),
                              note="one ordinary forward+backward pass over the same data (yardstick)"),
}
REFERENCE = "per_sample_loop"  # the exact Fisher the others are checked against


def fastcl_fisher(model, batches, loss: Loss = CROSS_ENTROPY):
    return diagonal_fisher(model, batches, None if loss is CROSS_ENTROPY else loss.per_sample, kind="empirical")


def make_inputs(case: ModelCase, device, *, quick: bool = False):
    """The model (eval mode) and the labelled batches of one case; :class:`Unavailable` when it cannot be built."""
    try:
        model = make_model(case.label, device, quick=quick)
    except ImportError as exc:
        raise Unavailable(f"{case.label} needs {exc.name or exc}") from exc
    return model, make_batches(case.label, case.samples, case.batch, device)


def baseline_fn(name: str, model, batches, loss: Loss = CROSS_ENTROPY) -> Callable[[], object]:
    """Zero-argument call of baseline ``name`` on ``batches``; raises :class:`Unavailable` with the reason."""
    try:
        run = BASELINES[name].make(model, loss)
    except Exception as exc:  # noqa: BLE001 - a factory that breaks on this model is a skipped row
        raise Unavailable(f"{type(exc).__name__}: {exc}".splitlines()[0][:300]) from exc
    if run is None:
        raise Unavailable(f"{name} not importable: {INSTALL_PEERS}")
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
    try:
        model, batches = make_inputs(case, device, quick=cfg.quick)
    except Unavailable as why:
        for name in [*BASELINES, "fastcl[*]"]:
            rec.skip(OP, name, label, str(why))
        return
    loss = loss_of(label)
    size = sum(p.numel() for p in model.parameters())
    outputs: dict = {}  # the last result of each row, for the checks below
    rows: dict = {}
    for name, spec in BASELINES.items():
        try:
            rows[name] = baseline_fn(name, model, batches, loss)
        except Unavailable as why:
            rec.skip(OP, name, label, str(why))
    fastcl_rows = []
    for b in available_backends(device, FASTCL_OP, torch.float32, on_skip=lambda b, why: rec.skip(OP, f"fastcl[{b}]", label, why)):
        fastcl_rows.append(f"fastcl[{b}]")
        rows[f"fastcl[{b}]"] = forced(b, partial(fastcl_fisher, model, batches, loss))
    # Everything but the per-sample loop (seconds per call) is timed round-robin on the same inputs.
    slow = {n for n in rows if n in BASELINES and BASELINES[n].slow}
    interleaved = {n: _keep(outputs, n, fn) for n, fn in rows.items() if n not in slow}
    notes = {n: BASELINES[n].note for n in interleaved if n in BASELINES and BASELINES[n].note}
    rec.measure_group(OP, label, size, interleaved, notes=notes)
    for n in slow:
        rec.measure(OP, n, label, size, _keep(outputs, n, rows[n]), slow=True, note=BASELINES[n].note)
    ref = outputs.get(REFERENCE)
    if ref is None:
        return
    for impl in [*fastcl_rows, "vmap_grad", "backpack", "opacus"]:
        if impl in outputs:
            rec.check(f"fisher {label} {impl} vs per-sample loop", lambda impl=impl: bl.rel_err(outputs[impl], ref))


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
                        api = fastcl.ops.sqgrad(x_nc, g, norm="squared")  # power == 2 here
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    ratios["api(non-contiguous x)"] = worst_ratio(api, want, bound)
                sec.record(name, ratios, seconds=time.perf_counter() - t0)
                del x, g, start, out, want, mag
