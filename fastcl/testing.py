r"""float64 oracles, seeded inputs and tolerances for fastcl's ops (penalty, distill, sqgrad).

The one home shared by the tests (``tests/ops``, ``tests/kernels``) and the GPU check
(``benchmarks/gpu_check.py`` through ``benchmarks/oracles.py``); not imported by ``import fastcl``.

* penalty: ``value = s·Σ w·φ(θ−a)``, gradient step ``s·w·φ'(θ−a)``, φ = d²/2 (quadratic) or |d| (l1);
  :func:`penalty_oracle` is written from that formula (it checks the library's reference too).
* distill: ``T²·KL(softmax(t/T) ‖ softmax(s/T))`` per row and ``grad_scale·T·(p_s − p_t)``;
  :func:`distill_oracle` is :func:`fastcl.ops.distill_reference` on float64 copies (that
  reference is itself checked against ``F.kl_div`` and a hand-written formula).
* sqgrad: ``Σ_b |Σ_t g[b,t,o]·x[b,t,i]|^p`` (p = 2: ``norm="squared"``, 1: ``"abs"``);
  :func:`sqgrad_oracle` forms each sample's product in float64, one sample at a time.

Tolerances: :data:`TOLERANCES` pairs each dtype with its :class:`DtypeTol`, ready for
``pytest.mark.parametrize("dtype, tol", TOLERANCES, ids=param_id)``; :data:`KERNEL_TOLERANCES`
are the dtypes the compiled and Triton kernels take. Kernels compute in float32 (float64
stays float64) and round once, to nearest, into the output dtype: a gradient element is
allowed half an ulp of its dtype plus the float32 error. Triton's interpreter truncates
instead (compiled Triton rounds): :meth:`DtypeTol.truncating` allows a whole ulp.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .ops import distill_reference

__all__ = [
    "Tol",
    "DtypeTol",
    "TOLERANCES",
    "KERNEL_TOLERANCES",
    "TOL",
    "param_id",
    "seed_of",
    "at_thread_counts",
    "PENALTY_GRID",
    "check_penalty_kernel",
    "penalty_inputs",
    "penalty_oracle",
    "assert_penalty_matches",
    "assert_grads_close",
    "logits",
    "distill_oracle",
    "assert_distill_matches",
    "NONFINITE_ROWS",
    "nonfinite_case",
    "assert_nonfinite_contract",
    "sqgrad_oracle",
]

F64 = torch.float64


# ---------------------------------------------------------------------------- tolerances

@dataclass(frozen=True)
class Tol:
    """``|got − want| ≤ atol + rtol·|want|`` element-wise against a float64 oracle."""

    rtol: float
    atol: float


@dataclass(frozen=True)
class DtypeTol:
    """Tolerances of one input dtype against the float64 oracles.

    ``sum``: a float32 (float64) sum: the penalty's value, sqgrad's output;
    ``loss``: distill's per-row loss, ``atol`` relative to T²;
    ``grad``: a gradient element in this dtype, ``atol`` relative to the gradient's scale
    (distill: ``|grad_scale|·T``), plus ``floor`` (float16's subnormal spacing);
    ``rounding``: one float32 value rounded into this dtype, relative, truncation allowed, with
    a 2× margin (the GPU check adds it to bounds from the magnitudes of the terms).
    """

    sum: Tol
    loss: Tol
    grad: Tol
    rounding: float
    floor: float = 0.0

    def truncating(self) -> DtypeTol:
        """The same with a whole ulp of gradient rounding: for conversions that truncate."""
        return replace(self, grad=Tol(2 * self.grad.rtol, self.grad.atol))


TOLERANCES = (
    (torch.float64, DtypeTol(sum=Tol(1e-12, 1e-12), loss=Tol(1e-10, 1e-10), grad=Tol(1e-10, 1e-12), rounding=2**-52)),
    (torch.float32, DtypeTol(sum=Tol(2e-5, 2e-5), loss=Tol(1e-4, 1e-5), grad=Tol(1e-5, 1e-6), rounding=1e-6)),
    (torch.bfloat16, DtypeTol(sum=Tol(2e-5, 2e-5), loss=Tol(1e-4, 1e-5), grad=Tol(2**-8, 1e-6), rounding=1.6e-2)),
    (torch.float16, DtypeTol(sum=Tol(2e-5, 2e-5), loss=Tol(1e-4, 1e-5), grad=Tol(2**-10, 1e-6), rounding=2e-3,
                             floor=2**-24)),
)
KERNEL_TOLERANCES = TOLERANCES[1:]
TOL = dict(TOLERANCES)


def param_id(value) -> str | None:
    """pytest ids for :data:`TOLERANCES` parameters: the dtype's name, and none for the tolerance."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else "tol" if isinstance(value, DtypeTol) else None


def seed_of(*parts) -> int:
    """A seed that depends on the test case only (Python's ``hash`` is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def at_thread_counts(fn, counts=(1, 2)) -> list:
    """``fn()`` run once under each ``torch.set_num_threads`` count (restored after), results in order."""
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in counts:
            torch.set_num_threads(threads)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(saved)


# ---------------------------------------------------------------------------- penalty

# (anchor/weight storage dtype, weighted, form, store): every kernel path but θ's dtype.
PENALTY_GRID = [(storage, weighted, form, store) for storage in (torch.float32, torch.bfloat16)
                for weighted in (True, False) for form in ("quadratic", "l1") for store in (False, True)]

def penalty_inputs(shapes, dtype, storage, weighted, seed, device="cpu"):
    """``(params, anchors, weights, grads)``: θ of ``dtype``, a = θ + noise of ``storage`` (every
    fifth element of the first tensor equal to θ: d = 0), w ≥ 0 or ``None``, grads of ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    anchors = []
    for p, s in zip(params, shapes):
        a = p.double().cpu() + 0.5 * torch.randn(s, generator=g, dtype=F64)
        anchors.append(a.to(device=device, dtype=storage))
    if params and params[0].numel():
        anchors[0].view(-1)[::5] = params[0].view(-1)[::5].to(storage)
    weights = [torch.rand(s, generator=g).to(device=device, dtype=storage) for s in shapes] if weighted else None
    grads = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    return params, anchors, weights, grads


def penalty_oracle(params, anchors, weights, scale, form, grads, *, store=False):
    """float64 ``(value, new grads)``: new grads ``grads + s·w·φ'(θ−a)`` (``store``: ``s·w·φ'(θ−a)``;
    ``None`` entries without ``grads``), written from the formula."""
    value, new_grads = 0.0, []
    for i, p in enumerate(params):
        d = p.detach().double() - anchors[i].double()
        w = torch.ones_like(d) if weights is None else weights[i].double()
        phi, slope = (d * d / 2, d) if form == "quadratic" else (d.abs(), d.sign())
        value += (w * phi).sum().item()
        step = scale * w * slope
        new_grads.append(None if grads is None else step if store else grads[i].double() + step)
    return scale * value, new_grads


def assert_grads_close(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], dtype: torch.dtype,
                       tol: DtypeTol | None = None) -> None:
    """Gradients of ``dtype`` against float64 ones, within ``tol.grad`` (default ``TOL[dtype]``)."""
    tol = tol or TOL[dtype]
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double().cpu(), w.cpu(), rtol=tol.grad.rtol, atol=tol.grad.atol + tol.floor)


def assert_penalty_matches(value, grads, params, anchors, weights, scale, form, start, *, store=False,
                           tol: DtypeTol | None = None) -> None:
    """A penalty kernel's ``value`` (0-dim, float32; float64 for float64 θ) and ``grads`` against
    :func:`penalty_oracle` on the inputs (``start``: the gradients before the call)."""
    want_value, want_grads = penalty_oracle(params, anchors, weights, scale, form, start, store=store)
    dtype = params[0].dtype
    tol = tol or TOL[dtype]
    assert value.dim() == 0 and value.dtype == (F64 if dtype == F64 else torch.float32)
    assert abs(value.item() - want_value) <= tol.sum.atol + tol.sum.rtol * abs(want_value), (value.item(), want_value)
    if grads is not None:
        assert_grads_close(grads, want_grads, dtype, tol)


def check_penalty_kernel(kernel, shapes, dtype, tol, storage, weighted, form, store, *, scale=0.37, device="cpu") -> torch.Tensor:
    """Call a backend's penalty ``kernel`` on :func:`penalty_inputs` (NaN gradients in store mode,
    which must never be read) and check it against the oracle; returns the value."""
    params, anchors, weights, start = penalty_inputs(shapes, dtype, storage, weighted, seed_of(dtype, storage, weighted, form),
                                                     device=device)
    grads = [torch.full_like(g, float("nan")) if store else g.clone() for g in start]
    value = kernel(params, anchors, weights, scale, form, grads, store=store)
    assert_penalty_matches(value, grads, params, anchors, weights, scale, form, start, store=store, tol=tol)
    return value


# ---------------------------------------------------------------------------- distill

def logits(rows, vocab, dtype, seed, spread=3.0, device="cpu"):
    """``(student, teacher)`` ``[rows, vocab]`` of ``dtype`` (drawn in float32), fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    student = (spread * torch.randn(rows, vocab, generator=gen)).to(device=device, dtype=dtype)
    teacher = (spread * torch.randn(rows, vocab, generator=gen)).to(device=device, dtype=dtype)
    return student, teacher


def distill_oracle(student, teacher, temperature, mask=None, grad_scale=1.0):
    """float64 ``(row_loss, grad)`` of the distill kernel contract."""
    return distill_reference(student.detach().double(), teacher.double(), temperature, mask, grad_scale)


def assert_distill_matches(row_loss, grad, student, teacher, temperature, tol: DtypeTol, mask=None, grad_scale=1.0):
    """Kernel outputs against :func:`distill_oracle`: dtypes, shapes, the same non-finite entries, close finite ones."""
    want_loss, want_grad = distill_oracle(student, teacher, temperature, mask, grad_scale)
    assert row_loss.dtype == (F64 if student.dtype == F64 else torch.float32)
    assert row_loss.shape == (student.shape[0],)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    torch.testing.assert_close(row_loss.double().cpu(), want_loss.cpu(), rtol=tol.loss.rtol,
                               atol=tol.loss.atol * temperature**2, equal_nan=True)
    torch.testing.assert_close(grad.double().cpu(), want_grad.cpu(), rtol=tol.grad.rtol,
                               atol=tol.grad.atol * abs(grad_scale) * temperature + tol.floor, equal_nan=True)


NAN, INF = float("nan"), float("inf")


def _put(*edits):
    """Spoil a row: each edit is ``(which, index, value)`` with ``which`` "s" or "t"."""
    def spoil(s, t):
        for which, index, value in edits:
            (s if which == "s" else t)[index] = value
    return spoil


# Row name -> (what the contract says the row gives, how to spoil it). V = 11.
NONFINITE_ROWS = {
    "teacher NaN": ("nan", _put(("t", 3, NAN))),
    "teacher +inf": ("nan", _put(("t", 4, INF))),
    "teacher all -inf": ("nan", _put(("t", slice(None), -INF))),
    "student NaN": ("nan", _put(("s", 0, NAN))),
    "student +inf": ("nan", _put(("s", 10, INF))),
    "student all -inf": ("nan", _put(("s", slice(None), -INF))),
    "student -inf where p_t > 0": ("inf", _put(("s", 2, -INF))),
    "teacher -inf (p_t = 0)": ("finite", _put(("t", slice(None, None, 3), -INF))),
    "both -inf (p_t = 0)": ("finite", _put(("t", slice(5, 7), -INF), ("s", slice(5, 7), -INF))),
    "one-hot teacher": ("finite", _put(("t", slice(1, None), -INF))),
    "masked NaN row": ("masked", _put(("s", 1, NAN), ("t", 2, NAN))),
    "plain": ("finite", _put()),
}


def nonfinite_case(dtype, seed=0, device="cpu"):
    """``(student, teacher, mask, expect)``: one row per :data:`NONFINITE_ROWS` entry, in that order."""
    student, teacher = logits(len(NONFINITE_ROWS), 11, dtype, seed)
    expect = []
    for r, (kind, spoil) in enumerate(NONFINITE_ROWS.values()):
        spoil(student[r], teacher[r])
        expect.append(kind)
    mask = torch.tensor([kind != "masked" for kind in expect])
    return student.to(device), teacher.to(device), mask.to(device), expect


def assert_nonfinite_contract(row_loss, grad, expect):
    """Each row of a :func:`nonfinite_case` ends as the contract says (fastcl/ops/distill.py)."""
    grad = grad.double().cpu()
    for r, (name, kind) in enumerate(zip(NONFINITE_ROWS, expect)):
        loss = row_loss[r].item()
        if kind == "nan":
            assert loss != loss and grad[r].isnan().all(), f"{name}: loss {loss}, grad {grad[r]}"
        elif kind == "inf":
            assert loss == INF and grad[r].isfinite().all(), f"{name}: loss {loss}, grad {grad[r]}"
        elif kind == "masked":
            assert loss == 0.0 and (grad[r] == 0).all(), f"{name}: loss {loss}, grad {grad[r]}"
        else:
            assert abs(loss) < INF and grad[r].isfinite().all(), f"{name}: loss {loss}, grad {grad[r]}"


# ---------------------------------------------------------------------------- sqgrad

def sqgrad_oracle(x: torch.Tensor, g: torch.Tensor, power: int = 2) -> torch.Tensor:
    """float64 ``Σ_b |g_bᵀ x_b|^p`` (``[O, I]``) for ``x`` ``[B, (T,) I]``, ``g`` ``[B, (T,) O]`` and
    p = 2 (``norm="squared"``) or 1 (``"abs"``), one sample's float64 product at a time (memory ``O·I``)."""
    if x.dim() == 2:
        x, g = x[:, None], g[:, None]
    out = torch.zeros(g.shape[-1], x.shape[-1], dtype=F64, device=x.device)
    for xb, gb in zip(x, g):
        per_sample = gb.double().t() @ xb.double()
        out += per_sample.square() if power == 2 else per_sample.abs()
    return out
