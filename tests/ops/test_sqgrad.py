"""fastcl.ops.sqgrad against per-sample gradients materialised in float64.

``norm="squared"``: ``out[o, i] += Σ_b (Σ_t g[b,t,o] x[b,t,i])²``; ``norm="abs"``: ``Σ_b |…|``.
Property tests (hypothesis) draw shapes, strides, dtypes and norms for every CPU backend.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastcl.kernels import cpp
from fastcl.ops import sqgrad, use_backend
from fastcl.testing import TOL, sqgrad_oracle

CPU_BACKENDS = ["torch"] + (["cpp"] if cpp._C is not None else [])
POWER = {"squared": 2, "abs": 1}


def oracle(x, g, norm):
    return sqgrad_oracle(x, g, POWER[norm])


@st.composite
def _cases(draw):
    B, T, I, O = (draw(st.integers(1, n)) for n in (5, 9, 40, 40))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]))
    two_dim = T == 1 and draw(st.booleans())
    x_layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    g_layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    norm = draw(st.sampled_from(["squared", "abs"]))
    seed = draw(st.integers(0, 2**16))
    return B, T, I, O, dtype, two_dim, x_layout, g_layout, norm, seed


def _tensor(B, T, C, layout, gen):
    if layout == "contiguous":
        return torch.randn(B, T, C, generator=gen)
    if layout == "transposed":
        return torch.randn(B, C, T, generator=gen).transpose(1, 2)
    return torch.randn(B, 2 * T, C + 2, generator=gen)[:, ::2, 1:C + 1]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=60, deadline=None)
@given(case=_cases())
def test_property_matches_float64_over_shapes_strides_and_dtypes(backend, case):
    B, T, I, O, dtype, two_dim, x_layout, g_layout, norm, seed = case
    gen = torch.Generator().manual_seed(seed)
    x = _tensor(B, T, I, x_layout, gen).to(dtype)
    g = _tensor(B, T, O, g_layout, gen).to(dtype)
    if two_dim:
        x, g = x[:, 0], g[:, 0]
    start = torch.rand(O, I, generator=gen, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    out = start.clone()
    with use_backend(backend if dtype != torch.float64 else "torch"):
        got = sqgrad(x, g, out, norm=norm)
    assert got is out and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = TOL[dtype].sum  # inputs rounded to the dtype first, float32 sums
    torch.testing.assert_close(out.double(), start.double() + oracle(x, g, norm), rtol=tol.rtol, atol=tol.atol)


def test_non_contiguous_out_accumulates():
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 4, 6, generator=gen)
    out = torch.ones(5, 6).t()
    sqgrad(x, g, out)
    torch.testing.assert_close(out.double(), 1.0 + oracle(x, g, "squared"), rtol=2e-5, atol=2e-5)


def test_bad_input():
    with pytest.raises(ValueError):
        sqgrad(torch.zeros(2, 3), torch.zeros(3, 4))
    with pytest.raises(ValueError):
        sqgrad(torch.zeros(2, 3, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="norm must be 'squared' or 'abs'"):
        sqgrad(torch.zeros(2, 3), torch.zeros(2, 4), norm="cubed")
    with pytest.raises(ValueError):
        sqgrad(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(TypeError):
        sqgrad(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64))
