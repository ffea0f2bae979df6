"""Anchored penalty, value + gradient: fastcl per backend vs the baselines.

    pytest benchmarks/test_penalty.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import baselines as bl
import pytest
import torch
from _cases import fastcl_backends, make_penalty_set, param_shapes, penalty_bytes
from conftest import bench_device

import fastcl

LAMBDA = 100.0
# Tests set ``benchmark.group`` to "penalty <case>" so each case is its own comparison table.
pytestmark = pytest.mark.benchmark(group="penalty")
DEVICE = bench_device()
CASES = {"fp32 50t/2M": (50, 2_000_000, torch.float32), "bf16 50t/2M": (50, 2_000_000, torch.bfloat16)}
if DEVICE.type == "cuda":
    CASES = {"fp32 200t/100M": (200, 100_000_000, torch.float32), "bf16 200t/100M": (200, 100_000_000, torch.bfloat16)}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    n, total, dtype = CASES[request.param]
    return request.param, make_penalty_set(param_shapes(n, total), dtype, DEVICE), dtype


def _group(benchmark, label, s, dtype):
    benchmark.group = f"penalty {label}"
    benchmark.extra_info["bytes"] = penalty_bytes(s.numel, dtype)


def test_autograd_loop(benchmark, case):
    label, s, dtype = case
    _group(benchmark, label, s, dtype)
    benchmark(bl.autograd_loop_step, s.params, s.anchors, s.weights, LAMBDA)


def test_foreach(benchmark, case):
    label, s, dtype = case
    _group(benchmark, label, s, dtype)
    benchmark(bl.foreach_penalty, s.params, s.anchors, s.weights, s.grads, LAMBDA)


def test_copy_same_bytes(benchmark, case):
    label, s, dtype = case
    _group(benchmark, label, s, dtype)
    benchmark(bl.copy_same_bytes(penalty_bytes(s.numel, dtype), DEVICE))


@pytest.mark.parametrize("backend", fastcl_backends(DEVICE, "penalty"))
def test_fastcl(benchmark, case, backend):
    label, s, dtype = case
    _group(benchmark, label, s, dtype)
    if backend not in fastcl_backends(DEVICE, "penalty", dtype):
        pytest.skip(f"fastcl[{backend}] cannot run penalty in {dtype}")
    grads = s.grads

    def run():
        with fastcl.ops.use_backend(backend):
            return fastcl.ops.penalty(s.params, s.anchors, s.weights, scale=LAMBDA, grads=grads)

    benchmark(run)
