"""Triton sqgrad kernel against float64: out[o,i] += Σ_b |Σ_t g[b,t,o]·x[b,t,i]|^p."""
import os

import pytest
import torch

pytestmark = pytest.mark.triton

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

import fastcl  # noqa: E402
import fastcl.ops as ops  # noqa: E402
from fastcl.kernels import triton as kt  # noqa: E402
from fastcl.kernels.triton import sqgrad as ksq  # noqa: E402

DEVICE = torch.device("cpu" if kt.INTERPRETED else "cuda")


def make(B, T, I, O, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, I, generator=gen).to(dtype).to(DEVICE)
    g = torch.randn(B, T, O, generator=gen).to(dtype).to(DEVICE)
    return x, g


def expected(x, g, power):
    """Σ_b |Σ_t g[b,t,o] x[b,t,i]|^p in float64, from the (already rounded) inputs."""
    per_sample = torch.einsum("bto,bti->boi", g.double(), x.double())
    return (per_sample.abs() ** power).sum(0)


def assert_close(got, want):
    # Products of fp32/bf16/fp16 inputs are accumulated in fp32: relative error ~1e-6 per term.
    scale = want.abs().max().item() + 1.0
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 2, 5, 17])
@pytest.mark.parametrize("power", [2, 1])
def test_kernel_matches_formula(dtype, T, power):
    x, g = make(3, T, 7, 9, dtype, seed=T)
    start = torch.rand(9, 7, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = start.clone()
    result = kt.OPS["sqgrad"](x, g, out, power)
    assert result is None or result is out
    assert_close(out, start.double() + expected(x, g, power))


@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("power", [2, 1])
def test_several_tiles_slices_and_sample_groups(monkeypatch, splits, power):
    """16-wide tiles: O=33, I=17 give 3×2 tiles with ragged edges; T=37 spans 3 slices; B=5 split in groups."""
    monkeypatch.setattr(ksq, "BLOCK_O", 16)
    monkeypatch.setattr(ksq, "BLOCK_I", 16)
    monkeypatch.setattr(ksq, "BLOCK_T", 16)
    x, g = make(5, 37, 17, 33, torch.float32, seed=splits)
    out = torch.full((33, 17), 0.5, device=DEVICE)
    ksq.sqgrad(x, g, out, power, batch_splits=splits)
    assert_close(out, 0.5 + expected(x, g, power))


def test_single_feature_and_output():
    x, g = make(4, 3, 1, 1, torch.float32, seed=9)
    out = torch.zeros(1, 1, device=DEVICE)
    kt.OPS["sqgrad"](x, g, out, 2)
    assert_close(out, expected(x, g, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [2, 5, 17])
def test_public_op_with_strided_inputs(dtype, T):
    """fastcl.ops.sqgrad with non-contiguous x and g (transposed storage) forced onto Triton."""
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(3, 11, T, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)
    g = torch.randn(3, 13, T, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)
    assert not x.is_contiguous()
    out = torch.ones(13, 11, device=DEVICE)
    with fastcl.use_backend("triton"):
        assert ops.resolve("sqgrad", DEVICE, dtype)[0] == "triton"
        ops.sqgrad(x, g, out, power=2)
    assert_close(out, 1.0 + expected(x, g, 2))


def test_deterministic():
    x, g = make(6, 5, 20, 18, torch.float32, seed=4)
    first = kt.OPS["sqgrad"](x, g, torch.zeros(18, 20, device=DEVICE), 2)
    second = kt.OPS["sqgrad"](x, g, torch.zeros(18, 20, device=DEVICE), 2)
    assert torch.equal(first, second)


def test_float64_is_refused():
    assert "float64" in kt.unsupported_reason("sqgrad", torch.float64)
    x = torch.randn(2, 3, 4, dtype=torch.float64, device=DEVICE)
    g = torch.randn(2, 3, 5, dtype=torch.float64, device=DEVICE)
    with fastcl.use_backend("triton"), pytest.raises(fastcl.BackendUnavailableError, match="float64"):
        ops.sqgrad(x, g)
