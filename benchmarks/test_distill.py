"""Distillation loss (forward + backward) and LM-head fused distillation: fastcl vs the
baselines of ``suites/distill.py``.

    pytest benchmarks/test_distill.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import pytest
from cases import cases, size_set
from conftest import bench_device
from harness.record import Unavailable, available_backends
from inputs import make_lm_head
from suites import distill as suite

from fastcl.ops import use_backend

# Tests set ``benchmark.group`` to "distill <case>" / "fused linear distill <case>" so each case is its own table.
pytestmark = pytest.mark.benchmark(group="distill")
DEVICE = bench_device()
LOGIT_CASES = {c.label: c for c in cases(suite.OP, size_set(DEVICE, pytest=True))}
FUSED_CASES = {c.label: c for c in cases(suite.FUSED_OP, size_set(DEVICE, pytest=True))}


@pytest.fixture(scope="module", params=list(LOGIT_CASES))
def logits(request):
    return suite.make_logits_inputs(LOGIT_CASES[request.param], DEVICE)


@pytest.mark.parametrize("name", list(suite.BASELINES))
def test_baseline(benchmark, logits, name):
    benchmark.group = f"distill {logits.case.label}"
    try:
        step = suite.BASELINES[name](logits)
    except Unavailable as why:
        pytest.skip(str(why))
    benchmark(logits.on_next(step))


@pytest.mark.parametrize("backend", available_backends(DEVICE, suite.FASTCL_OP))
def test_fastcl_distill(benchmark, logits, backend):
    benchmark.group = f"distill {logits.case.label}"
    if backend not in available_backends(DEVICE, suite.FASTCL_OP, logits.case.dtype):
        pytest.skip(f"fastcl[{backend}] cannot run distill in {logits.case.dtype}")
    step = logits.on_next(suite.fastcl_distill)

    def run():
        with use_backend(backend):
            step()

    benchmark(run)


@pytest.fixture(scope="module", params=list(FUSED_CASES))
def head(request):
    c = FUSED_CASES[request.param]
    return c, make_lm_head(c.rows, c.vocab, c.hidden, c.dtype, DEVICE)


@pytest.mark.parametrize("name", list(suite.FUSED_BASELINES))
def test_fused_baseline(benchmark, head, name):
    case, tensors = head
    benchmark.group = f"fused linear distill {case.label}"
    benchmark(suite.fused_step(suite.FUSED_BASELINES[name], tensors))


@pytest.mark.parametrize("backend", available_backends(DEVICE, suite.FASTCL_OP))
def test_fastcl_fused_linear(benchmark, head, backend):
    case, tensors = head
    benchmark.group = f"fused linear distill {case.label}"
    if backend not in available_backends(DEVICE, suite.FASTCL_OP, case.dtype):
        pytest.skip(f"fastcl[{backend}] cannot run distill in {case.dtype}")
    step = suite.fused_step(suite.fastcl_fused, tensors)

    def run():
        with use_backend(backend):
            step()

    benchmark(run)
