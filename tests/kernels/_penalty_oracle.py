"""The float64 penalty oracle, input builder and tolerances shared by the penalty tests
(tests/ops/test_penalty.py, tests/kernels/test_cpp_penalty.py, tests/kernels/test_cuda_build.py).

value = s·Σ w·φ(θ−a); gradient step s·w·φ'(θ−a), φ = d²/2 (quadratic) or |d| (l1).
"""
import zlib

import torch

# (rtol, atol) of a gradient element in the gradient's dtype: one rounding of a float32 result
GRAD_TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2**-8, 1e-6),
    torch.float16: (2**-10, 1e-6),
}
VALUE_RTOL = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def seed_of(*parts) -> int:
    """A seed that depends on the test case only (Python's ``hash`` is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def expected(params, anchors, weights, scale, form, grads, *, store=False):
    """float64: (value, new grads): ``grads + s·w·φ'(θ−a)``, or ``s·w·φ'(θ−a)`` with ``store``."""
    value, new_grads = 0.0, []
    for i, p in enumerate(params):
        d = p.double() - anchors[i].double()
        w = torch.ones_like(d) if weights is None else weights[i].double()
        phi, slope = (d * d / 2, d) if form == "quadratic" else (d.abs(), d.sign())
        value += (w * phi).sum().item()
        step = scale * w * slope
        new_grads.append(None if grads is None else step if store else grads[i].double() + step)
    return scale * value, new_grads


def make_inputs(shapes, dtype, storage, weighted, seed, device="cpu"):
    """θ, a (θ + noise, every fifth element of the first tensor equal to θ: d = 0), w ≥ 0, grads."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    anchors = []
    for p, s in zip(params, shapes):
        a = p.double().cpu() + 0.5 * torch.randn(s, generator=g, dtype=torch.float64)
        anchors.append(a.to(device=device, dtype=storage))
    if params and params[0].numel():
        anchors[0].view(-1)[::5] = params[0].view(-1)[::5].to(storage)
    weights = [torch.rand(s, generator=g).to(device=device, dtype=storage) for s in shapes] if weighted else None
    grads = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    return params, anchors, weights, grads


def assert_grads_close(got, want, dtype):
    rtol, atol = GRAD_TOL[dtype]
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double().cpu(), w.cpu(), rtol=rtol, atol=atol)
