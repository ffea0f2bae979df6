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
from fastcl.testing import sqgrad_oracle  # noqa: E402

DEVICE = torch.device("cpu" if kt.INTERPRETED else "cuda")


def make(B, T, I, O, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, I, generator=gen).to(dtype).to(DEVICE)
    g = torch.randn(B, T, O, generator=gen).to(dtype).to(DEVICE)
    return x, g


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
    assert_close(out, start.double() + sqgrad_oracle(x, g, power))


@pytest.mark.parametrize("splits, power", [(1, 2), (2, 1), (3, 2)])
def test_several_tiles_slices_and_sample_groups(monkeypatch, splits, power):
    """16-wide tiles: O=33, I=17 give 3×2 tiles with ragged edges; T=37 spans 3 slices; B=5 split in groups."""
    monkeypatch.setattr(ksq, "BLOCK_O", 16)
    monkeypatch.setattr(ksq, "BLOCK_I", 16)
    monkeypatch.setattr(ksq, "BLOCK_T", 16)
    x, g = make(5, 37, 17, 33, torch.float32, seed=splits)
    out = torch.full((33, 17), 0.5, device=DEVICE)
    ksq.sqgrad(x, g, out, power, batch_splits=splits)
    assert_close(out, 0.5 + sqgrad_oracle(x, g, power))


@pytest.mark.parametrize("shape, tiles", [
    ((16, 9, 784), (16, 16, 32, 2)),        # conv1 (O, I, T): a 16×16 tile, not 64×64
    ((10, 100, 1), (16, 64, 16, 4)),        # classifier head, no sequence
    ((33, 17, 37), (64, 32, 32, 4)),
    ((768, 3072, 128), (64, 64, 32, 4)),
])
def test_tiles_follow_layer_shape(shape, tiles):
    assert ksq.tiles_for(*shape) == tiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_tiles_over_several_slices_and_samples(dtype):
    """conv1-like O=16, I=9 on its 16×16 tile; T=40 is two 32-long slices per sample, so the
    flat (sample, slice) loop squares and resets the per-sample tile mid-loop."""
    x, g = make(3, 40, 9, 16, dtype, seed=21)
    assert ksq.plan(x, g, torch.zeros(16, 9, device=DEVICE), 2)[0].options["BLOCK_O"] == 16
    out = torch.full((16, 9), 0.25, device=DEVICE)
    kt.OPS["sqgrad"](x, g, out, 2)
    assert_close(out, 0.25 + sqgrad_oracle(x, g, 2))


# fp32 inputs multiply on tensor cores as tf32x3: a = a_hi + a_lo (both TF32, 10-bit
# mantissas), a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi. Per product the relative error is
# ~2⁻²¹, about fp32's own rounding, so the documented bound on every entry is
#     |out − out₆₄| ≤ FP32_TC_TOL · Σ_b (Σ_t |g[b,t,o]|·|x[b,t,i]|)²
# Measured on the emulation below: tf32x3 3e-8, plain fp32 3e-8, plain TF32 (which the
# kernels never use) 3e-5, so the bound has a 30× margin on both sides.
FP32_TC_TOL = 1e-6


def _tf32(a: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32 (10 mantissa bits, nearest, ties away: PTX cvt.rna.tf32.f32)."""
    bits = a.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _sqgrad_emulated(x, g, split: bool):
    """Σ_b (g[b]ᵀ x[b])² with tf32x3 (split) or plain TF32 products, float32 accumulation."""
    def parts(a):
        hi = _tf32(a)
        return hi, _tf32(a - hi)

    (g_hi, g_lo), (x_hi, x_lo) = parts(g.transpose(1, 2)), parts(x)
    per_sample = g_hi @ x_hi
    if split:
        per_sample = per_sample + (g_hi @ x_lo + g_lo @ x_hi)
    return (per_sample * per_sample).sum(0)


def _tc_error(got, x, g):
    bound = (torch.einsum("bto,bti->boi", g.double().abs(), x.double().abs()) ** 2).sum(0)
    return ((got.double() - sqgrad_oracle(x, g, 2)).abs() / bound).max().item()


def test_tf32x3_error_bound_is_documented_correctly():
    """The bound above holds for emulated tf32x3 and fails for plain TF32 (so it means something)."""
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(6, 96, 40, generator=gen)
    g = torch.randn(6, 96, 24, generator=gen)
    assert _tc_error(_sqgrad_emulated(x, g, split=True), x, g) < FP32_TC_TOL
    assert _tc_error(_sqgrad_emulated(x, g, split=False), x, g) > 10 * FP32_TC_TOL


@pytest.mark.skipif(kt.INTERPRETED, reason="the interpreter multiplies in numpy fp32; tensor cores need a GPU")
@pytest.mark.parametrize("shape", [(8, 300, 9, 16), (4, 77, 200, 96)])
def test_fp32_on_tensor_cores_within_documented_bound(shape):
    B, T, I, O = shape
    x, g = make(B, T, I, O, torch.float32, seed=23)
    assert ksq.plan(x, g, torch.zeros(O, I, device=DEVICE), 2)[0].options["PRECISION"] == "tf32x3"
    out = kt.OPS["sqgrad"](x, g, torch.zeros(O, I, device=DEVICE), 2)
    assert _tc_error(out, x, g) < FP32_TC_TOL


def test_single_feature_and_output():
    x, g = make(4, 3, 1, 1, torch.float32, seed=9)
    out = torch.zeros(1, 1, device=DEVICE)
    kt.OPS["sqgrad"](x, g, out, 2)
    assert_close(out, sqgrad_oracle(x, g, 2))


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
        assert ops.choose_backend("sqgrad", DEVICE, dtype)[0] == "triton"
        ops.sqgrad(x, g, out, norm="squared")
    assert_close(out, 1.0 + sqgrad_oracle(x, g, 2))


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
