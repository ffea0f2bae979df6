"""Distillation loss (forward + backward) and LM-head fused distillation.

    pytest benchmarks/test_distill.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import math

import baselines as bl
import pytest
import torch
from _cases import fastcl_backends
from conftest import bench_device

import fastcl

T = 2.0
# Tests set ``benchmark.group`` to "distill <case>" so each case is its own comparison table.
pytestmark = pytest.mark.benchmark(group="distill")
DEVICE = bench_device()
GPU = DEVICE.type == "cuda"
LOGIT_CASES = {"4096x32000 bf16": (4096, 32000, torch.bfloat16)} if GPU else {"512x8192 fp32": (512, 8192, torch.float32)}
FUSED_CASES = {"4096r V32000 H2048 bf16": (4096, 32000, 2048, torch.bfloat16)} if GPU else {"256r V8192 H256 fp32": (256, 8192, 256, torch.float32)}


@pytest.fixture(scope="module", params=list(LOGIT_CASES))
def logits(request):
    R, V, dtype = LOGIT_CASES[request.param]
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(R, V, generator=g)).to(DEVICE, dtype).requires_grad_(True)
    t = (3 * torch.randn(R, V, generator=g)).to(DEVICE, dtype)
    return request.param, s, t


def _step(loss_fn, s):
    def run():
        s.grad = None
        loss_fn().backward()
    return run


def test_torch_kl_div(benchmark, logits):
    label, s, t = logits
    benchmark.group = f"distill {label}"
    benchmark(_step(lambda: bl.kl_div_distill(s, t, T), s))


def test_torch_chunked(benchmark, logits):
    label, s, t = logits
    benchmark.group = f"distill {label}"

    def run():
        s.grad = None
        bl.chunked_kl_div_distill_backward(s, t, T, max(1, s.shape[0] // 8))

    benchmark(run)


def test_liger_kl_div(benchmark, logits):
    label, s, t = logits
    benchmark.group = f"distill {label}"
    fn = bl.liger_kl_div_factory() if GPU else None
    if fn is None:
        pytest.skip("Liger-Kernel needs CUDA and liger_kernel installed")
    benchmark(_step(lambda: fn(s, t, T), s))


@pytest.mark.parametrize("backend", fastcl_backends(DEVICE, "distill"))
def test_fastcl_distill(benchmark, logits, backend):
    label, s, t = logits
    benchmark.group = f"distill {label}"
    if backend not in fastcl_backends(DEVICE, "distill", s.dtype):
        pytest.skip(f"fastcl[{backend}] cannot run distill in {s.dtype}")

    def run():
        with fastcl.ops.use_backend(backend):
            s.grad = None
            fastcl.ops.distillation_loss(s, t, T).backward()

    benchmark(run)


@pytest.fixture(scope="module", params=list(FUSED_CASES))
def head(request):
    R, V, H, dtype = FUSED_CASES[request.param]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(R, H, generator=g).to(DEVICE, dtype).requires_grad_(True)
    W = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(DEVICE, dtype).requires_grad_(True)
    ht = torch.randn(R, H, generator=g).to(DEVICE, dtype)
    Wt = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(DEVICE, dtype)
    return request.param, h, W, ht, Wt


def test_torch_unfused_linear(benchmark, head):
    label, h, W, ht, Wt = head
    benchmark.group = f"fused linear distill {label}"

    def run():
        h.grad = W.grad = None
        bl.unfused_linear_distill(h, W, ht, Wt, T).backward()

    benchmark(run)


@pytest.mark.parametrize("backend", fastcl_backends(DEVICE, "distill"))
def test_fastcl_fused_linear(benchmark, head, backend):
    label, h, W, ht, Wt = head
    benchmark.group = f"fused linear distill {label}"
    if backend not in fastcl_backends(DEVICE, "distill", h.dtype):
        pytest.skip(f"fastcl[{backend}] cannot run distill in {h.dtype}")

    def run():
        with fastcl.ops.use_backend(backend):
            h.grad = W.grad = None
            fastcl.ops.fused_linear_distillation(h, W, teacher_hidden=ht, teacher_weight=Wt, temperature=T).backward()

    benchmark(run)
