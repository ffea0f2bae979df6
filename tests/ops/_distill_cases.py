"""Shared by the distill tests: the float64 oracle, tolerances per dtype, non-finite inputs.

The oracle is the library's own :func:`fastcl.ops.distill_reference` run on float64
copies (it is itself checked against ``F.kl_div`` and a hand-written formula in
tests/ops/test_distill.py). Tolerances sit next to their dtypes in :data:`DTYPES`.
"""
from __future__ import annotations

import pytest
import torch

from fastcl.ops import distill_reference


class Tol:
    """Tolerances of one input dtype against the float64 oracle.

    ``loss``: (rtol, atol / T²) of the per-row loss; ``grad``: (rtol, atol / (grad_scale·T),
    absolute floor) of the gradient, the floor covering float16's subnormal spacing.
    """

    def __init__(self, loss, grad):
        self.loss, self.grad = loss, grad

    def __repr__(self):
        return f"Tol(loss={self.loss}, grad={self.grad})"


# Inputs are drawn in float32 and rounded to the dtype, so the oracle sees the same values
# the kernels do; the error left is the kernels' float32 math and the gradient's rounding.
DTYPES = [
    pytest.param(torch.float64, Tol(loss=(1e-10, 1e-10), grad=(1e-10, 1e-12, 0.0)), id="float64"),
    pytest.param(torch.float32, Tol(loss=(1e-4, 1e-5), grad=(1e-5, 1e-6, 0.0)), id="float32"),
    pytest.param(torch.bfloat16, Tol(loss=(1e-4, 1e-5), grad=(2**-8, 1e-6, 0.0)), id="bfloat16"),
    pytest.param(torch.float16, Tol(loss=(1e-4, 1e-5), grad=(2**-10, 1e-6, 2**-24)), id="float16"),
]
KERNEL_DTYPES = DTYPES[1:]  # what the compiled kernels take


def oracle(student, teacher, temperature, mask=None, grad_scale=1.0):
    """float64 ``(row_loss, grad)`` of the distill kernel contract."""
    return distill_reference(student.double(), teacher.double(), temperature, mask, grad_scale)


def assert_matches_oracle(row_loss, grad, student, teacher, temperature, tol, mask=None, grad_scale=1.0):
    """Kernel outputs against :func:`oracle`: dtypes, shapes, the same non-finite entries, close finite ones."""
    want_loss, want_grad = oracle(student, teacher, temperature, mask, grad_scale)
    assert row_loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    assert row_loss.shape == (student.shape[0],)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    rtol, atol = tol.loss
    torch.testing.assert_close(row_loss.double(), want_loss, rtol=rtol, atol=atol * temperature**2, equal_nan=True)
    rtol, atol, floor = tol.grad
    torch.testing.assert_close(
        grad.double(), want_grad, rtol=rtol, atol=atol * abs(grad_scale) * temperature + floor, equal_nan=True
    )


def logits(rows, vocab, dtype, seed, spread=3.0):
    """``(student, teacher)`` ``[rows, vocab]`` of ``dtype`` (drawn in float32), fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    student = (spread * torch.randn(rows, vocab, generator=gen)).to(dtype)
    teacher = (spread * torch.randn(rows, vocab, generator=gen)).to(dtype)
    return student, teacher


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


def nonfinite_case(dtype, seed=0):
    """``(student, teacher, mask, expect)``: one row per :data:`NONFINITE_ROWS` entry, in that order."""
    student, teacher = logits(len(NONFINITE_ROWS), 11, dtype, seed)
    expect = []
    for r, (kind, spoil) in enumerate(NONFINITE_ROWS.values()):
        spoil(student[r], teacher[r])
        expect.append(kind)
    mask = torch.tensor([kind != "masked" for kind in expect])
    return student, teacher, mask, expect


def assert_nonfinite_contract(row_loss, grad, expect):
    """Each row of a :func:`nonfinite_case` ends as the contract says (fastcl/ops/distill.py)."""
    grad = grad.double()
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
