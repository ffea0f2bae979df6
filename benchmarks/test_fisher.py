"""Diagonal empirical Fisher over a small data set: fastcl's engine vs the baselines.

    pytest benchmarks/test_fisher.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import baselines as bl
import pytest
from _cases import fastcl_backends, make_batches, make_model
from conftest import bench_device

import fastcl

# Tests set ``benchmark.group`` to "fisher <case>" so each case is its own comparison table.
pytestmark = pytest.mark.benchmark(group="fisher")
DEVICE = bench_device()
CASES = {"mlp": (256, 128), "cnn": (128, 64), "transformer": (128, 64)}

try:
    from fastcl.importance import diagonal_fisher
except Exception as exc:  # noqa: BLE001 - the engine may not have landed yet
    diagonal_fisher, MISSING = None, f"fastcl.importance.diagonal_fisher not importable: {exc}"
else:
    MISSING = None


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    n, batch = CASES[request.param]
    return request.param, make_model(request.param, DEVICE), make_batches(request.param, n, batch, DEVICE)


def test_per_sample_loop(benchmark, case):
    kind, model, batches = case
    benchmark.group = f"fisher {kind}"
    benchmark.pedantic(bl.fisher_per_sample_loop, (model, batches), rounds=3, warmup_rounds=1)


def test_vmap(benchmark, case):
    kind, model, batches = case
    benchmark.group = f"fisher {kind}"
    benchmark(bl.fisher_vmap, model, batches)


def test_squared_minibatch_wrong(benchmark, case):
    """Not the Fisher (squares of mini-batch gradients); timed because it is common."""
    kind, model, batches = case
    benchmark.group = f"fisher {kind}"
    benchmark(bl.fisher_squared_minibatch, model, batches)


def test_plain_forward_backward(benchmark, case):
    kind, model, batches = case
    benchmark.group = f"fisher {kind}"
    benchmark(bl.plain_forward_backward, model, batches)


@pytest.mark.parametrize("backend", fastcl_backends(DEVICE, "sqgrad"))
def test_fastcl(benchmark, case, backend):
    kind, model, batches = case
    benchmark.group = f"fisher {kind}"
    if diagonal_fisher is None:
        pytest.skip(MISSING)

    def run():
        with fastcl.ops.use_backend(backend):
            return diagonal_fisher(model, batches, kind="empirical")

    benchmark(run)
