"""fastcl.ops.sqgrad against per-sample gradients materialised in float64."""
import pytest
import torch

from fastcl.ops import sqgrad, use_backend


def oracle(x, g, power):
    x, g = x.double(), g.double()
    if x.dim() == 2:
        x, g = x[:, None], g[:, None]
    per_sample = torch.einsum("bto,bti->boi", g, x)
    return per_sample.square().sum(0) if power == 2 else per_sample.abs().sum(0)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 1, 7, 3), (4, 3, 9, 5), (3, 17, 33, 6), (2, 2, 1, 65)])
@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_matches_per_sample_oracle(shape, power, dtype, tol):
    B, T, I, O = shape
    gen = torch.Generator().manual_seed(B * 1000 + T * 10 + I)
    x = torch.randn(B, T, I, generator=gen).to(dtype)
    g = torch.randn(B, T, O, generator=gen).to(dtype)
    with use_backend("torch"):
        out = sqgrad(x, g, power=power)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), oracle(x, g, power), rtol=tol, atol=tol)


def test_two_dim_inputs_accumulate_and_non_contiguous():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 10, generator=gen, dtype=torch.float64)[:, ::2]
    g = torch.randn(3, 6, generator=gen, dtype=torch.float64).t()
    out = torch.ones(3, 5, dtype=torch.float64)
    sqgrad(x, g, out)
    torch.testing.assert_close(out, 1.0 + oracle(x, g, 2))
    x3 = torch.randn(4, 5, 8, generator=gen, dtype=torch.float64).transpose(1, 2)  # [4, 8, 5] strided
    g3 = torch.randn(4, 8, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(sqgrad(x3, g3), oracle(x3, g3, 2))


def test_bad_input():
    with pytest.raises(ValueError):
        sqgrad(torch.zeros(2, 3), torch.zeros(3, 4))
    with pytest.raises(ValueError):
        sqgrad(torch.zeros(2, 3, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError):
        sqgrad(torch.zeros(2, 3), torch.zeros(2, 4), power=3)
    with pytest.raises(ValueError):
        sqgrad(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(TypeError):
        sqgrad(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64))
