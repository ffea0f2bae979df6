"""The cpp sqgrad kernel (fastcl._C) against float64: out[o,i] += Σ_b |Σ_t g[b,t,o]·x[b,t,i]|^p.

Every ISA variant this CPU runs, float32/bfloat16/float16 inputs, contiguous and strided
(transposed, sliced) inputs, ragged register tiles, and bitwise equality across thread
counts. Skipped when fastcl._C is not built.
"""
import pytest
import torch

from fastcl.kernels import cpp
from fastcl.ops import sqgrad, use_backend
from fastcl.testing import KERNEL_TOLERANCES, at_thread_counts, param_id, sqgrad_oracle

needs_ext = pytest.mark.skipif(cpp._C is None, reason=f"fastcl._C not built: {cpp.BUILD_ERROR}")
ISA_NAMES = ("baseline", "avx2", "avx512")


def _inputs(shape, dtype, layout, seed):
    B, T, I, O = shape
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        x, g = torch.randn(B, T, I, generator=gen), torch.randn(B, T, O, generator=gen)
    elif layout == "transposed":  # [B, I, T] storage, as an im2col
        x, g = torch.randn(B, I, T, generator=gen).transpose(1, 2), torch.randn(B, O, T, generator=gen).transpose(1, 2)
    else:  # every other column, every other position
        x = torch.randn(B, 2 * T, 2 * I, generator=gen)[:, ::2, ::2]
        g = torch.randn(B, T, O + 3, generator=gen)[..., 1:O + 1]
    return x.to(dtype), g.to(dtype)


SHAPES = [(1, 1, 1, 1), (3, 5, 7, 4), (2, 9, 33, 13), (4, 32, 64, 96), (5, 3, 17, 260), (2, 70, 5, 3)]


@needs_ext
@pytest.mark.parametrize("isa", range(len(ISA_NAMES)))
@pytest.mark.parametrize("dtype, tol", KERNEL_TOLERANCES, ids=param_id)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_every_variant_matches_float64(isa, dtype, tol, layout):
    """Inputs are rounded to ``dtype`` first; the kernel accumulates in float32 (tolerance: float32 sums)."""
    if isa > ISA_NAMES.index(cpp._C.distill_isa()):
        pytest.skip(f"this CPU cannot run the {ISA_NAMES[isa]} variant")
    for k, shape in enumerate(SHAPES):
        x, g = _inputs(shape, dtype, layout, seed=10 * k + isa)
        for power in (1, 2):
            out = torch.full((shape[3], shape[2]), 0.5)
            cpp.sqgrad(x, g, out, power, isa=isa)
            expected = 0.5 + sqgrad_oracle(x, g, power)
            torch.testing.assert_close(out.double(), expected, rtol=tol.sum.rtol, atol=tol.sum.atol, msg=lambda m: f"{shape} p={power}: {m}")


@needs_ext
def test_result_is_bitwise_identical_for_any_thread_count():
    x, g = _inputs((9, 40, 70, 50), torch.float32, "contiguous", seed=3)

    def run():
        out = torch.zeros(50, 70)
        cpp.sqgrad(x, g, out, 2)
        return out

    outs = at_thread_counts(run, (1, 2, 3))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_ext
def test_op_dispatches_to_the_kernel_and_keeps_float64_on_torch():
    x, g = _inputs((3, 4, 5, 6), torch.float32, "transposed", seed=4)
    with use_backend("cpp"):
        got = sqgrad(x, g)
    torch.testing.assert_close(got.double(), sqgrad_oracle(x, g, 2), rtol=1e-5, atol=1e-6)
    assert cpp.unsupported_reason("sqgrad", torch.float64) is not None


@needs_ext
def test_bad_arguments_are_refused():
    x, g = torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="contiguous float32"):
        cpp.sqgrad(x, g, torch.zeros(5, 4, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="contiguous float32"):
        cpp.sqgrad(x, g, torch.zeros(4, 5).t(), 2)
    with pytest.raises(TypeError, match="share a dtype"):
        cpp.sqgrad(x, g.half(), torch.zeros(5, 4), 2)
    with pytest.raises(ValueError, match="power"):
        cpp.sqgrad(x, g, torch.zeros(5, 4), 3)
    with pytest.raises(ValueError, match=r"\[B, T, I\]"):
        cpp.sqgrad(x, torch.zeros(2, 4, 5), torch.zeros(5, 4), 2)
    if cpp._C.distill_isa() != "avx512":
        with pytest.raises(ValueError, match="ISA"):
            cpp.sqgrad(x, g, torch.zeros(5, 4), 2, isa=2)
