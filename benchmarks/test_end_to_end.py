"""One EWC training epoch: plain training, the autograd-loop EWC baseline and fastcl's EWC.

    pytest benchmarks/test_end_to_end.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import copy

import baselines as bl
import pytest
import torch
import torch.nn.functional as F
from _cases import fastcl_backends, make_batches, make_model
from conftest import bench_device

import fastcl

LAMBDA = 100.0
# Tests set ``benchmark.group`` to "ewc epoch <case>" so each case is its own comparison table.
pytestmark = pytest.mark.benchmark(group="ewc epoch")
DEVICE = bench_device()
CASES = {"mlp": (1024, 128), "cnn": (256, 64), "transformer": (256, 64)}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    n, batch = CASES[request.param]
    model = make_model(request.param, DEVICE).train()
    batches = make_batches(request.param, n, batch, DEVICE, seed=1)
    g = torch.Generator().manual_seed(5)
    fisher = {k: torch.rand(p.shape, generator=g).to(DEVICE) for k, p in model.named_parameters()}
    anchors = {k: p.detach().clone() for k, p in model.named_parameters()}
    return request.param, model, batches, fisher, anchors


def _fresh(model):
    m = copy.deepcopy(model)
    return m, torch.optim.SGD(m.parameters(), lr=1e-3)


def test_plain(benchmark, case):
    kind, model, batches, _, _ = case
    benchmark.group = f"ewc epoch {kind}"
    m, opt = _fresh(model)
    benchmark(bl.plain_epoch, m, batches, opt)


def test_autograd_loop_ewc(benchmark, case):
    kind, model, batches, fisher, anchors = case
    benchmark.group = f"ewc epoch {kind}"
    m, opt = _fresh(model)
    benchmark(bl.ewc_autograd_loop_epoch, m, batches, opt, anchors, fisher, LAMBDA)


@pytest.mark.parametrize("mode", ["add_penalty_grad_", "penalty"])
@pytest.mark.parametrize("backend", fastcl_backends(DEVICE, "penalty"))
def test_fastcl_ewc(benchmark, case, backend, mode):
    kind, model, batches, _, _ = case
    benchmark.group = f"ewc epoch {kind}"
    if not hasattr(fastcl, "EWC"):
        pytest.skip("fastcl.EWC not available yet")
    m, opt = _fresh(model)
    try:
        ewc = fastcl.EWC(m, LAMBDA)
        ewc.consolidate(batches)  # default backends; the epoch below forces the penalty's
    except Exception as exc:  # noqa: BLE001 - e.g. the Fisher engine has not landed
        pytest.skip(f"EWC.consolidate failed: {type(exc).__name__}: {exc}")

    def epoch():
        with fastcl.ops.use_backend(backend):
            for x, y in batches:
                opt.zero_grad(set_to_none=True)
                if mode == "add_penalty_grad_":
                    F.cross_entropy(m(x), y).backward()
                    ewc.add_penalty_grad_()
                else:
                    (F.cross_entropy(m(x), y) + ewc.penalty()).backward()
                opt.step()

    benchmark(epoch)
