"""Diagonal empirical Fisher over a small data set: fastcl's engine vs the baselines of ``suites/fisher.py``.

    pytest benchmarks/test_fisher.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import pytest
from cases import cases, size_set
from conftest import bench_device
from harness.record import Unavailable, available_backends
from suites import fisher as suite

from fastcl.ops import use_backend

# Tests set ``benchmark.group`` to "fisher <case>" so each case is its own comparison table.
pytestmark = pytest.mark.benchmark(group="fisher")
DEVICE = bench_device()
CASES = {c.label: c for c in cases(suite.OP, size_set(DEVICE, pytest=True))}
PEERS = ("backpack", "opacus")  # other libraries' per-sample machinery, which may not support every layer


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    try:
        return (request.param, *suite.make_inputs(CASES[request.param], DEVICE))
    except Unavailable as why:
        pytest.skip(str(why))


@pytest.mark.parametrize("name", list(suite.BASELINES))
def test_baseline(benchmark, case, name):
    kind, model, batches = case
    benchmark.group = f"fisher {kind}"
    try:
        fn = suite.baseline_fn(name, model, batches, suite.loss_of(kind))
    except Unavailable as why:
        pytest.skip(str(why))
    if name in PEERS:
        try:
            fn()  # a peer that cannot handle this model (BackPACK has no LayerNorm extension) is a skipped row, as in run.py
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"{name} cannot run {kind}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    if suite.BASELINES[name].slow:
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    else:
        benchmark(fn)


@pytest.mark.parametrize("backend", available_backends(DEVICE, suite.FASTCL_OP))
def test_fastcl(benchmark, case, backend):
    kind, model, batches = case
    benchmark.group = f"fisher {kind}"

    def run():
        with use_backend(backend):
            return suite.fastcl_fisher(model, batches, suite.loss_of(kind))

    benchmark(run)
