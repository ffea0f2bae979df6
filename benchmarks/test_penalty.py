"""Anchored penalty, value + gradient: fastcl per backend vs the baselines of ``suites/penalty.py``.

    pytest benchmarks/test_penalty.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import baselines as bl
import pytest
from cases import cases, size_set
from conftest import bench_device
from harness.record import available_backends
from suites import penalty as suite

from fastcl.ops import use_backend

# Tests set ``benchmark.group`` to "penalty <case>" so each case is its own comparison table.
pytestmark = pytest.mark.benchmark(group="penalty")
DEVICE = bench_device()
CASES = {c.label: c for c in cases(suite.OP, size_set(DEVICE, pytest=True))}


@pytest.fixture(scope="module", params=list(CASES))
def inputs(request):
    return suite.make_inputs(CASES[request.param], DEVICE)


def _group(benchmark, inp):
    benchmark.group = f"penalty {inp.case.label}"
    benchmark.extra_info["bytes"] = inp.nbytes


@pytest.mark.parametrize("name", list(suite.BASELINES))
def test_baseline(benchmark, inputs, name):
    _group(benchmark, inputs)
    benchmark(suite.BASELINES[name], inputs.sets[0])


def test_copy_same_bytes(benchmark, inputs):
    _group(benchmark, inputs)
    benchmark(bl.copy_same_bytes(inputs.nbytes, DEVICE))


@pytest.mark.parametrize("backend", available_backends(DEVICE, suite.FASTCL_OP))
@pytest.mark.parametrize("path", list(suite.FASTCL_STEPS), ids=lambda p: p.strip() or "penalty(grads)")
def test_fastcl(benchmark, inputs, backend, path):
    _group(benchmark, inputs)
    if backend not in available_backends(DEVICE, suite.FASTCL_OP, inputs.case.dtype):
        pytest.skip(f"fastcl[{backend}] cannot run penalty in {inputs.case.dtype}")
    step = suite.FASTCL_STEPS[path]

    def run():
        with use_backend(backend):
            return step(inputs.sets[0])

    benchmark(run)
