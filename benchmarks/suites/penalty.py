"""Anchored penalty, value + gradient: fastcl per backend vs what users run instead.

Rows per case (``cases.PENALTY``): each entry of :data:`BASELINES`, ``compiled_loop``
(headline case of a full run only: each shape set recompiles), ``copy_same_bytes`` (the
bandwidth ceiling) and, for each backend that can run it, the three ways fastcl adds the
penalty's gradient (:data:`FASTCL_STEPS`): ``fastcl[<backend>]`` (``penalty(grads=...)``,
the fused path of ``add_penalty_grad_()``), ``fastcl[<backend>] penalty().backward()``
(the differentiable penalty with ``.grad`` None, as after ``zero_grad(set_to_none=True)``)
and ``fastcl[<backend>] penalty().backward() +grad`` (``.grad`` present). The autograd
loop also has both: ``autograd_loop`` (``.grad`` present) and ``autograd_loop grad=None``.
**Add a baseline**: write it in ``baselines.py``, add one entry to :data:`BASELINES`.

On the CPU every row of a case is timed interleaved (one call of each per round, see
``harness.timing.measure_interleaved``), so machine drift does not enter the ratios.
The rows cycle through ``k`` input copies so that a cycle spans 4× the last-level cache
(``harness.timing.rotation_count``); every byte count (``bytes_moved``, hence the
``bw`` ratios) is the fused path's minimal traffic, 5 arrays. ``check`` is
``gpu_check.py``'s penalty section: every backend, dtype pair, form and mode against the
float64 oracle.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import baselines as bl
import torch
from cases import DTYPE_NAMES, PenaltyCase, cases, headline
from harness.record import Config, Recorder, available_backends, forced, free
from harness.timing import cycle, measure_interleaved, rotation_count
from inputs import PenaltySet, make_penalty_set, param_shapes, penalty_bytes
from oracles import OUT_RTOL, penalty_expected, worst_ratio

import fastcl
from fastcl.ops import use_backend

OP = "penalty"
FASTCL_OP = "penalty"
LAMBDA = 100.0

def _present(s: PenaltySet) -> PenaltySet:
    """``s`` with every ``.grad`` allocated (a row that sets them to None may have run before)."""
    for p in s.params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return s


def _cleared(s: PenaltySet) -> PenaltySet:
    """``s`` with every ``.grad`` None, as after ``optimizer.zero_grad(set_to_none=True)``."""
    for p in s.params:
        p.grad = None
    return s


# impl -> one value + gradient (into ``p.grad``) on input set ``s``, scaled by LAMBDA.
BASELINES: dict[str, Callable[[PenaltySet], object]] = {
    "autograd_loop": lambda s: bl.autograd_loop_step(_present(s).params, s.anchors, s.weights, LAMBDA),
    "autograd_loop grad=None": lambda s: bl.autograd_loop_step(_cleared(s).params, s.anchors, s.weights, LAMBDA),
    "foreach": lambda s: bl.foreach_penalty(s.params, s.anchors, s.weights, _present(s).grads, LAMBDA),
}


def fastcl_step(s: PenaltySet):
    """The fused path (``add_penalty_grad_()``): ``p.grad += λ·w·(θ−a)`` in one pass."""
    return fastcl.ops.penalty(s.params, s.anchors, s.weights, scale=LAMBDA, grads=_present(s).grads)


def fastcl_backward(s: PenaltySet):
    """The differentiable penalty in a loss: ``anchored_penalty(...).backward()``."""
    value = fastcl.ops.anchored_penalty(s.params, s.anchors, s.weights, scale=LAMBDA)
    value.backward()
    return value.detach()


# row suffix -> how fastcl adds the gradient on input set ``s``
FASTCL_STEPS: dict[str, Callable[[PenaltySet], object]] = {
    "": fastcl_step,
    " penalty().backward()": lambda s: fastcl_backward(_cleared(s)),
    " penalty().backward() +grad": lambda s: fastcl_backward(_present(s)),
}


@dataclass
class Inputs:
    """``copies`` seeded input sets of one case; ``next()`` returns them round robin."""

    case: PenaltyCase
    shapes: list
    sets: list[PenaltySet]
    numel: int
    nbytes: int   # minimal traffic of one call (inputs.penalty_bytes)

    def __post_init__(self):
        self.next = cycle(self.sets)

    def on_next(self, step: Callable[[PenaltySet], object]) -> Callable[[], object]:
        return lambda: step(self.next())


def make_inputs(case: PenaltyCase, device, *, rotation_cap: int = 1) -> Inputs:
    shapes = param_shapes(case.n_tensors, case.total)
    numel = sum(math.prod(s) for s in shapes)
    elt = torch.tensor([], dtype=case.dtype).element_size()
    k = rotation_count(4 * numel * elt, device, cap=rotation_cap)
    sets = [make_penalty_set(shapes, case.dtype, device, seed=i) for i in range(k)]
    return Inputs(case, shapes, sets, numel, penalty_bytes(numel, case.dtype))


# ---------------------------------------------------------------------------- run.py


def bench(cfg: Config, rec: Recorder) -> None:
    for case in cases(OP, cfg.size):
        _bench_case(cfg, rec, case)
        free(cfg.device)


def _bench_case(cfg: Config, rec: Recorder, case: PenaltyCase) -> None:
    device, label = cfg.device, case.label
    inp = make_inputs(case, device, rotation_cap=cfg.rotation_cap)
    k = len(inp.sets)
    impls: dict[str, Callable[[], object]] = {name: inp.on_next(step) for name, step in BASELINES.items()}
    notes: dict[str, str] = {}
    if not cfg.compile:
        rec.skip(OP, "compiled_loop", label, "torch.compile skipped (--quick: compiling takes tens of seconds; or --no-compile)")
    elif label != headline(OP, cfg.size).label:
        rec.skip(OP, "compiled_loop", label, "torch.compile timed on the headline case only (each shape set recompiles)")
    else:
        try:
            compiled = bl.compiled_loop_penalty(LAMBDA)
            t0 = time.perf_counter()
            s0 = _present(inp.sets[0])
            compiled(s0.params, s0.anchors, s0.weights)
            notes["compiled_loop"] = f"first call (compile) {time.perf_counter() - t0:.1f} s"
            impls["compiled_loop"] = inp.on_next(lambda s: compiled(_present(s).params, s.anchors, s.weights))
        except Exception as exc:  # noqa: BLE001 - a compiler failure is a skipped row
            rec.skip(OP, "compiled_loop", label, f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    copies = cycle([bl.copy_same_bytes(inp.nbytes, device) for _ in range(k)])
    impls["copy_same_bytes"] = lambda: copies()()
    for b in available_backends(device, FASTCL_OP, case.dtype, on_skip=lambda b, why: rec.skip(OP, f"fastcl[{b}]", label, why)):
        for suffix, fastcl_path in FASTCL_STEPS.items():
            impls[f"fastcl[{b}]{suffix}"] = forced(b, inp.on_next(fastcl_path))

    timings: dict = {}
    if device.type == "cpu":  # CUDA rows keep per-row event timing (interleaving would sync every call)
        try:
            timings = measure_interleaved(impls, device, warmup=1, rounds=cfg.rounds if cfg.quick else 21)
        except Exception as exc:  # noqa: BLE001 - one-by-one timing reports the failing row
            print(f"  interleaved timing failed ({type(exc).__name__}: {exc}); timing one by one", flush=True)
    for impl, fn in impls.items():
        rec.measure(OP, impl, label, inp.numel, fn, bytes_moved=inp.nbytes, rotate=k, note=notes.get(impl),
                    timing=timings.get(impl))

    def value_error():  # the default fastcl backend vs the autograd loop, on fresh inputs
        s = make_penalty_set(inp.shapes[: min(len(inp.shapes), 10)], case.dtype, device, seed=99)
        ref = float(bl.autograd_loop_penalty(s.params, s.anchors, s.weights, LAMBDA).detach())
        got = float(fastcl.ops.penalty(s.params, s.anchors, s.weights, scale=LAMBDA))
        return abs(got - ref) / max(abs(ref), 1e-30)

    rec.check(f"penalty {label}", value_error)


# ---------------------------------------------------------------------------- gpu_check.py

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CHECK_SCALE = 2.5


def check_shapes(n_tensors: int, total: int) -> list[tuple[int, ...]]:
    """A network-like list (weight matrices and bias vectors of log-uniform sizes) plus odd sizes."""
    odd = [(1,), (3,), (17,), (7, 13), (1029,), (4099,)]
    return param_shapes(max(2, n_tensors - len(odd)), max(1, total - sum(math.prod(s) for s in odd))) + odd


def check_inputs(shapes, p_dtype, s_dtype, weighted, seed, device, misaligned):
    """θ = a + 0.1·N(0,1) (every fifth θ equal to its anchor), a ~ N(0,1), w ~ U(0,1), grad ~ N(0,1)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def place(values: torch.Tensor, dtype) -> torch.Tensor:
        if not misaligned:
            return values.to(dtype)
        buf = torch.empty(values.numel() + 1, dtype=dtype, device=device)  # one element off: not 16-byte aligned
        out = buf[1:].view(values.shape)
        out.copy_(values)
        return out

    params, anchors, weights, grads = [], [], [], []
    for shape in shapes:
        a = place(torch.randn(shape, generator=g, device=device), s_dtype)
        p32 = a.float() + 0.1 * torch.randn(shape, generator=g, device=device)
        p32.view(-1)[::5] = a.float().view(-1)[::5]
        params.append(place(p32, p_dtype))
        anchors.append(a)
        if weighted:
            weights.append(place(torch.rand(shape, generator=g, device=device), s_dtype))
        grads.append(place(torch.randn(shape, generator=g, device=device), p_dtype))
    return params, anchors, (weights if weighted else None), grads


def check_cases(backends):
    """(backend, θ dtype, a/w dtype, form, weighted, with grads, misaligned): a covering set, not the full product
    (each new combination of Triton constexprs is a compile, ~1 s on a fresh machine)."""
    pairs = [(F32, F32), (F32, BF16), (BF16, BF16), (BF16, F32), (F16, F32), (F16, BF16)]
    out = []
    for b in backends:
        for p, s in pairs:
            for form in ("quadratic", "l1"):
                out.append((b, p, s, form, True, True, False))
        for p, s in ((F32, F32), (BF16, BF16)):
            for form in ("quadratic", "l1"):
                out.append((b, p, s, form, False, True, False))
                out.append((b, p, s, form, True, False, False))
        for p, s in ((F32, F32), (BF16, BF16), (F16, F32)):
            out.append((b, p, s, "quadratic", True, True, True))
        out.append((b, F32, F32, "l1", False, False, True))
    return out


def check(ctx, sec) -> None:
    """Every penalty backend on the GPU (Triton only under ``--dry-run-cpu``) vs the float64 oracle."""
    device = ctx.device
    shapes = check_shapes(*ctx.plan.penalty)
    numel = sum(math.prod(s) for s in shapes)
    sec.data["sizes"] = {"n_tensors": len(shapes), "numel": numel, "scale": CHECK_SCALE}
    print(f"  {len(shapes)} tensors, {numel:.3g} elements, scale {CHECK_SCALE}", flush=True)
    backends = ["triton"]
    if device.type == "cuda":
        backends.insert(0, "cuda")
    else:
        sec.skip("penalty[cuda] *", "the cuda backend needs a CUDA device (--dry-run-cpu)")
    for seed, (backend, p_dtype, s_dtype, form, weighted, with_grads, misaligned) in enumerate(check_cases(backends)):
        name = (f"penalty[{backend}] θ={DTYPE_NAMES[p_dtype]} a/w={DTYPE_NAMES[s_dtype]} {form}"
                f"{' weighted' if weighted else ' unweighted'}{' +grads' if with_grads else ' value-only'}{' misaligned' if misaligned else ''}")
        if sec.time_left() <= 0:
            sec.skip(name, "section time budget spent")
            continue
        t0 = time.perf_counter()
        params, anchors, weights, grads = check_inputs(shapes, p_dtype, s_dtype, weighted, 1000 + seed, device, misaligned)
        before = [g.clone() for g in grads] if with_grads else None
        with use_backend(backend):
            value = fastcl.ops.penalty(params, anchors, weights, scale=CHECK_SCALE, form=form, grads=grads if with_grads else None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ctx.fault.perturb("penalty", grads[-1] if with_grads else value)
        want_v = 0.0
        grad_ratio = 0.0
        for i, p in enumerate(params):
            w = None if weights is None else weights[i]
            v, want, step = penalty_expected(p, anchors[i], w, before[i] if with_grads else None, scale=CHECK_SCALE, form=form)
            want_v += float(v)
            if with_grads:
                dt = grads[i].dtype
                bound = OUT_RTOL[dt] * want.abs() + 1e-6 * (before[i].double().abs() + step) + torch.finfo(dt).tiny * torch.finfo(dt).eps
                grad_ratio = max(grad_ratio, worst_ratio(grads[i], want, bound))
        got_v = float(value)
        value_ratio = abs(got_v - want_v) / (1e-4 * abs(want_v) + 1e-30) if math.isfinite(got_v) else math.inf
        ratios = {"value": value_ratio}
        if with_grads:
            ratios["grad"] = grad_ratio
        sec.record(name, ratios, seconds=time.perf_counter() - t0, value=got_v, value_ref=want_v,
                   value_dtype=str(value.dtype).replace("torch.", ""))
        del params, anchors, weights, grads, before, value
