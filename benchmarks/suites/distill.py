"""Distillation loss (forward + backward) and LM-head fused distillation: fastcl vs what users run instead.

Rows, op ``distill`` (``cases.DISTILL``): each entry of :data:`BASELINES` and
``fastcl[<backend>]`` (``fastcl.ops.distillation_loss``). Rows, op ``fused_linear_distill``
(``cases.FUSED``): each entry of :data:`FUSED_BASELINES` and ``fastcl[<backend>]``
(``fastcl.ops.fused_linear_distillation``). The rows of a case are timed interleaved
(round-robin, ``cfg.rounds`` rounds), so a shared machine's drift falls on all alike.
**Add a baseline**: write it in ``baselines.py``, add one entry to :data:`BASELINES` or
:data:`FUSED_BASELINES`. A baseline's name may use ``{chunk}`` (rows per chunk, R/8).

``check_distill`` and ``check_fused`` are ``gpu_check.py``'s distill and fused sections:
the Triton kernel and the public APIs vs the float64 oracle.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import baselines as bl
import torch
import torch.nn.functional as F
from cases import DTYPE_NAMES, DistillCase, FusedCase, cases
from harness.record import Config, Recorder, Unavailable, available_backends, forced, free
from harness.timing import cycle, rotation_count
from inputs import make_lm_head, make_logits
from oracles import distill_expected, fused_expected, grad_bound, norm_errors, rows_for, worst_ratio

import fastcl
from fastcl.ops import op_backends, use_backend

OP = "distill"
FUSED_OP = "fused_linear_distill"
FASTCL_OP = "distill"
TEMPERATURE = 2.0


@dataclass
class Logits:
    """``copies`` seeded (student, teacher) logit pairs of one case; ``next()`` returns them round robin."""

    case: DistillCase
    device: torch.device
    pairs: list

    def __post_init__(self):
        self.next = cycle(self.pairs)
        self.chunk = max(1, self.case.rows // 8)
        self.nbytes = 3 * self.case.rows * self.case.vocab * torch.tensor([], dtype=self.case.dtype).element_size()  # read s, t; write ∂/∂s

    def on_next(self, step: Callable[[torch.Tensor, torch.Tensor], object]) -> Callable[[], None]:
        """A zero-argument forward + backward of ``step`` on the next pair (``student.grad`` reset first)."""
        def run():
            s, t = self.next()
            s.grad = None
            step(s, t)
        return run


def make_logits_inputs(case: DistillCase, device, *, rotation_cap: int = 1) -> Logits:
    elt = torch.tensor([], dtype=case.dtype).element_size()
    k = rotation_count(2 * case.rows * case.vocab * elt, device, cap=rotation_cap)
    return Logits(case, torch.device(device), [make_logits(case.rows, case.vocab, case.dtype, device, seed=i) for i in range(k)])


def _liger(factory: Callable[[], Callable | None]) -> Callable[[Logits], Callable]:
    def make(inp: Logits):
        if inp.device.type != "cuda":
            raise Unavailable("Liger-Kernel runs on CUDA only")
        run = factory()
        if run is None:
            raise Unavailable("liger_kernel not importable")
        return lambda s, t: run(s, t, TEMPERATURE).backward()
    return make


# name -> make(inputs) returning step(student, teacher): forward + backward into student.grad.
BASELINES: dict[str, Callable[[Logits], Callable]] = {
    "torch_kl_div": lambda inp: lambda s, t: bl.kl_div_distill(s, t, TEMPERATURE).backward(),
    "torch_chunked({chunk} rows)": lambda inp: lambda s, t: bl.chunked_kl_div_distill_backward(s, t, TEMPERATURE, inp.chunk),
    "liger_kl_div": _liger(bl.liger_kl_div_factory),
    "liger_jsd (other loss)": _liger(bl.liger_jsd_factory),
}


def fastcl_distill(s, t):
    fastcl.ops.distillation_loss(s, t, TEMPERATURE).backward()


# name -> step(h, W, h_t, W_t): forward + backward into h.grad and W.grad.
FUSED_BASELINES: dict[str, Callable] = {
    "torch_unfused": lambda h, W, ht, Wt: bl.unfused_linear_distill(h, W, ht, Wt, TEMPERATURE).backward(),
}


def fastcl_fused(h, W, ht, Wt):
    fastcl.ops.fused_linear_distillation(h, W, teacher_hidden=ht, teacher_weight=Wt, temperature=TEMPERATURE).backward()


def fused_step(step: Callable, head: tuple) -> Callable[[], None]:
    """A zero-argument forward + backward of ``step`` on ``head = (h, W, h_t, W_t)`` (grads reset first)."""
    h, W, ht, Wt = head

    def run():
        h.grad = W.grad = None
        step(h, W, ht, Wt)
    return run


# ---------------------------------------------------------------------------- run.py


def bench(cfg: Config, rec: Recorder) -> None:
    for case in cases(OP, cfg.size):
        _bench_logits(cfg, rec, case)
        free(cfg.device)
    for case in cases(FUSED_OP, cfg.size):
        _bench_fused(cfg, rec, case)
        free(cfg.device)


def _bench_logits(cfg: Config, rec: Recorder, case: DistillCase) -> None:
    """Every row of one case timed round-robin (``cfg.rounds`` rounds), so drift of a shared
    machine falls on all rows alike; then each row's peak memory."""
    device, label, size = cfg.device, case.label, case.rows * case.vocab
    inp = make_logits_inputs(case, device, rotation_cap=cfg.rotation_cap)
    k = len(inp.pairs)
    steps = {}
    for key, make in BASELINES.items():
        name = key.format(chunk=inp.chunk)
        try:
            steps[name] = inp.on_next(make(inp))
        except Unavailable as why:
            rec.skip(OP, name, label, str(why))
    for b in available_backends(device, FASTCL_OP, case.dtype, on_skip=lambda b, why: rec.skip(OP, f"fastcl[{b}]", label, why)):
        steps[f"fastcl[{b}]"] = forced(b, inp.on_next(fastcl_distill))
    rec.measure_group(OP, label, size, steps, slow=False, bytes_moved=inp.nbytes, rotate=k)

    def loss_error():
        s, t = inp.pairs[0]
        ref = float(bl.kl_div_distill(s.detach().float(), t.float(), TEMPERATURE))
        got = float(fastcl.ops.distillation_loss(s.detach(), t, TEMPERATURE))
        return abs(got - ref) / max(abs(ref), 1e-30)

    rec.check(f"distill {label}", loss_error)


def _bench_fused(cfg: Config, rec: Recorder, case: FusedCase) -> None:
    """Every row of one case timed round-robin, as :func:`_bench_logits`."""
    device, label, size = cfg.device, case.label, case.rows * case.vocab
    head = make_lm_head(case.rows, case.vocab, case.hidden, case.dtype, device)
    slow = not cfg.quick and device.type == "cpu"
    steps = {name: fused_step(step, head) for name, step in FUSED_BASELINES.items()}
    for b in available_backends(device, FASTCL_OP, case.dtype, on_skip=lambda b, why: rec.skip(FUSED_OP, f"fastcl[{b}]", label, why)):
        steps[f"fastcl[{b}]"] = forced(b, fused_step(fastcl_fused, head))
    rec.measure_group(FUSED_OP, label, size, steps, slow=slow)


# ---------------------------------------------------------------------------- gpu_check.py


def check_inputs(R, V, dtype, masked, neg_inf, seed, device):
    """Logits ``3·N(0,1)``; with ``neg_inf`` every 8th teacher row has half its vocabulary at −inf
    (row 1: all but 3 entries); with ``masked`` a quarter of the rows are masked out (row 0 kept, row 2 masked)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    s = (3.0 * torch.randn(R, V, generator=gen, device=device)).to(dtype)
    t = (3.0 * torch.randn(R, V, generator=gen, device=device)).to(dtype)
    if neg_inf:
        rows = torch.arange(0, R, 8, device=device)
        cols = torch.rand(len(rows), V, generator=gen, device=device) < 0.5
        cols[:, 0] = False
        sub = t[rows]
        sub[cols] = float("-inf")
        t[rows] = sub
        if R > 1:
            t[1, 3:] = float("-inf")
    mask = None
    if masked:
        mask = torch.rand(R, generator=gen, device=device) >= 0.25
        mask[0] = True
        if R > 2:
            mask[2] = False
    return s, t, mask


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _api_runs(sec, api: str, label: str, device, dtype):
    """``(backend, check name)`` for the public API checks: the dispatcher's choice ("auto"), then
    Triton forced where it is not the choice; checks past the section's time budget are skipped."""
    choice = op_backends(device, dtype)["distill"]
    auto = choice.name if choice.available else "none"
    for backend in ["auto"] + (["triton"] if auto != "triton" else []):
        name = f"{api}[{backend}{'=' + auto if backend == 'auto' else ''}] {label}"
        if sec.time_left() <= 0:
            sec.skip(name, "section time budget spent")
            continue
        yield backend, name


def check_distill(ctx, sec) -> None:
    """The Triton distill kernel (per-row loss and gradient) and ``distillation_loss`` forward +
    backward (default and Triton backends) vs the float64 oracle, by row chunks."""
    from fastcl.kernels import triton as kt

    device = ctx.device
    kernel = kt.OPS["distill"]
    for n, (R, V, dtype, T, masked, neg_inf, api) in enumerate(ctx.plan.distill):
        label = f"R={R} V={V} {DTYPE_NAMES[dtype]} T={T}{' masked' if masked else ''}{' -inf teacher' if neg_inf else ''}"
        name = f"distill[triton kernel] {label}"
        if sec.time_left() <= 0:
            sec.skip(name, "section time budget spent")
            continue
        t0 = time.perf_counter()
        s, t, mask = check_inputs(R, V, dtype, masked, neg_inf, 3000 + n, device)
        row_loss, grad = kernel(s, t, T, mask)
        _sync(device)
        ctx.fault.perturb("distill", grad)
        step = rows_for(6 * V * 8, ctx.plan.ref_chunk_bytes)
        loss_ratio = grad_ratio = 0.0
        for r in range(0, R, step):
            m = None if mask is None else mask[r:r + step]
            want_l, want_g, g_mag, l_mag = distill_expected(s[r:r + step], t[r:r + step], T, m)
            loss_ratio = max(loss_ratio, worst_ratio(row_loss[r:r + step], want_l, 1e-4 * want_l.abs() + 1e-5 * l_mag))
            grad_ratio = max(grad_ratio, worst_ratio(grad[r:r + step], want_g, grad_bound(want_g, g_mag, dtype)))
        sec.record(name, {"row_loss": loss_ratio, "grad": grad_ratio}, seconds=time.perf_counter() - t0)
        del row_loss, grad
        if not api:
            continue
        for backend, name in _api_runs(sec, "distillation_loss", f"fwd+bwd {label}", device, dtype):
            t0 = time.perf_counter()
            leaf = s.detach().requires_grad_(True)
            with use_backend(None if backend == "auto" else backend):
                loss = fastcl.ops.distillation_loss(leaf, t, T, mask=mask)
                loss.backward()
            _sync(device)
            count = R if mask is None else max(1, int(mask.sum()))
            want_total = bound_total = 0.0
            grad_ratio = 0.0
            for r in range(0, R, step):
                m = None if mask is None else mask[r:r + step]
                want_l, want_g, g_mag, l_mag = distill_expected(s[r:r + step], t[r:r + step], T, m)
                want_total += float(want_l.sum())
                bound_total += float((1e-4 * want_l.abs() + 1e-5 * l_mag).sum())
                grad_ratio = max(grad_ratio, worst_ratio(leaf.grad[r:r + step], want_g / count,
                                                         grad_bound(want_g, g_mag, dtype, rounding=2.0) / count))
            got = float(loss.detach())
            loss_ratio = abs(got - want_total / count) / (bound_total / count + 1e-30) if math.isfinite(got) else math.inf
            sec.record(name, {"loss": loss_ratio, "grad": grad_ratio}, seconds=time.perf_counter() - t0, loss=got, loss_ref=want_total / count)
            leaf.grad = None
            del leaf, loss
        del s, t, mask


def _torch_unfused(h, W, b, t_logits, ht, Wt, T, mask):
    """What users write without fastcl, in the inputs' dtype (a yardstick for the rounding of bf16 logits)."""
    s = F.linear(h, W, b)
    with torch.no_grad():
        t = t_logits if t_logits is not None else ht @ Wt.t()
    rows = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1) * (T * T)
    if mask is None:
        return rows.mean()
    return (rows * mask).sum() / mask.sum().clamp(min=1)


def _yardstick(h, W, b, t_logits, ht, Wt, T, mask, want, rows_chunk) -> dict:
    """Errors of unfused torch in the same dtype against the same float64 reference (recorded, not judged)."""
    try:
        hl = h.detach().clone().requires_grad_(True)
        Wl = W.detach().clone().requires_grad_(True)
        bl_ = None if b is None else b.detach().clone().requires_grad_(True)
        loss = _torch_unfused(hl, Wl, bl_, t_logits, ht, Wt, T, mask)
        loss.backward()
        got = float(loss.detach())
        out = {
            "loss_rel": abs(got - want[0]) / abs(want[0]) if want[0] else None,
            "grad_h_norm": norm_errors(hl.grad, want[1], rows_chunk)[0],
            "grad_W_norm": norm_errors(Wl.grad, want[2], rows_chunk)[0],
        }
        del hl, Wl, bl_, loss
        return out
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: the yardstick is optional
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


def check_fused(ctx, sec) -> None:
    """``fused_linear_distillation`` forward + backward (default and Triton backends) vs the
    float64 oracle, compared by norms (whole tensor and per row): its bf16 matmuls round the logits."""
    device = ctx.device
    for n, (R, V, H, dtype, teacher, masked, bias, chunk) in enumerate(ctx.plan.fused):
        label = (f"R={R} V={V} H={H} {DTYPE_NAMES[dtype]} teacher={teacher}{' masked' if masked else ''}"
                 f"{' bias' if bias else ''} chunk={chunk or 'auto'}")
        gen = torch.Generator(device=device).manual_seed(4000 + n)
        h = torch.randn(R, H, generator=gen, device=device).to(dtype)
        W = (torch.randn(V, H, generator=gen, device=device) / math.sqrt(H)).to(dtype)
        b = (0.1 * torch.randn(V, generator=gen, device=device)).to(dtype) if bias else None
        ht = Wt = t_logits = None
        if teacher == "hidden":
            ht = torch.randn(R, H, generator=gen, device=device).to(dtype)
            Wt = (torch.randn(V, H, generator=gen, device=device) / math.sqrt(H)).to(dtype)
        else:
            t_logits = (2.0 * torch.randn(R, V, generator=gen, device=device)).to(dtype)
        mask = None
        if masked:
            mask = torch.rand(R, generator=gen, device=device) >= 0.25
            mask[0] = True
            mask[-1] = False
        T = 2.0
        want = None
        tol = {"loss": 5e-3, "norm": 2e-2, "row": 6e-2} if dtype != torch.float32 else {"loss": 1e-4, "norm": 1e-4, "row": 1e-3}
        for backend, name in _api_runs(sec, "fused_linear_distillation", label, device, dtype):
            t0 = time.perf_counter()
            hl = h.detach().clone().requires_grad_(True)
            Wl = W.detach().clone().requires_grad_(True)
            bl_ = None if b is None else b.detach().clone().requires_grad_(True)
            with use_backend(None if backend == "auto" else backend):
                loss = fastcl.ops.fused_linear_distillation(hl, Wl, t_logits, teacher_hidden=ht, teacher_weight=Wt, student_bias=bl_,
                                                            temperature=T, mask=mask, chunk_size=chunk)
                loss.backward()
            _sync(device)
            ctx.fault.perturb("fused", hl.grad)
            if want is None:
                want = fused_expected(h, W, b, t_logits, ht, Wt, T, mask, 8 * ctx.plan.ref_chunk_bytes)
            w_loss, w_gh, w_gW, w_gb = want
            got = float(loss.detach())
            rows_chunk = rows_for(H * 8 * 4, ctx.plan.ref_chunk_bytes)
            gh_norm, gh_row = norm_errors(hl.grad, w_gh, rows_chunk)
            gW_norm, gW_row = norm_errors(Wl.grad, w_gW, rows_chunk)
            ratios = {
                "loss": (abs(got - w_loss) / (tol["loss"] * abs(w_loss)) if math.isfinite(got) else math.inf),
                "grad_h norm": gh_norm / tol["norm"],
                "grad_h worst row": gh_row / tol["row"],
                "grad_W norm": gW_norm / tol["norm"],
                "grad_W worst vocab row": gW_row / tol["row"],
            }
            if mask is not None:
                ratios["grad_h masked rows == 0"] = 0.0 if bool((hl.grad[~mask] == 0).all()) else math.inf
            if bl_ is not None:
                ratios["grad_b norm"] = norm_errors(bl_.grad[:, None], w_gb[:, None], rows_chunk)[0] / tol["norm"]
            info = {"loss": got, "loss_ref": w_loss, "tolerances": tol,
                    "rel_errors": {"grad_h_norm": gh_norm, "grad_h_worst_row": gh_row, "grad_W_norm": gW_norm, "grad_W_worst_row": gW_row}}
            del hl, Wl, bl_, loss
            if backend == "auto":
                info["torch_unfused_same_dtype"] = _yardstick(h, W, b, t_logits, ht, Wt, T, mask, want, rows_chunk)
            sec.record(name, ratios, seconds=time.perf_counter() - t0, **info)
        del h, W, b, ht, Wt, t_logits, want
