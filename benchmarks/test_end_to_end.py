"""One EWC training epoch: plain training, the baselines of ``suites/e2e.py`` and fastcl's EWC.

    pytest benchmarks/test_end_to_end.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import pytest
from cases import cases, size_set
from conftest import bench_device
from harness.record import available_backends, forced
from suites import e2e as suite

# Tests set ``benchmark.group`` to "ewc epoch <case>" so each case is its own comparison table.
pytestmark = pytest.mark.benchmark(group="ewc epoch")
DEVICE = bench_device()
CASES = {c.label: c for c in cases(suite.OP, size_set(DEVICE, pytest=True))}


@pytest.fixture(scope="module", params=list(CASES))
def inputs(request):
    return request.param, suite.make_inputs(CASES[request.param], DEVICE)


@pytest.mark.parametrize("name", list(suite.BASELINES))
def test_baseline(benchmark, inputs, name):
    arch, inp = inputs
    benchmark.group = f"ewc epoch {arch}"
    benchmark(inp.baseline_epoch(name))


@pytest.mark.parametrize("mode", list(suite.MODES))
@pytest.mark.parametrize("backend", available_backends(DEVICE, suite.FASTCL_OP))
def test_fastcl_ewc(benchmark, inputs, backend, mode):
    arch, inp = inputs
    benchmark.group = f"ewc epoch {arch}"
    epoch = inp.fastcl_epochs()[mode]  # consolidated with the default backends; the epoch forces the penalty's
    benchmark(forced(backend, epoch))
