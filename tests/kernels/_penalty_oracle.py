"""The float64 penalty oracle shared by the compiled-kernel tests (cpp and cuda)."""
import torch


def expected(params, anchors, weights, scale, kind, grads):
    """float64: (value, grads + s·w·φ'(θ−a)); φ = d²/2 (quadratic) or |d| (l1)."""
    value, new_grads = 0.0, []
    for i, p in enumerate(params):
        d = p.double() - anchors[i].double()
        w = torch.ones_like(d) if weights is None else weights[i].double()
        phi, slope = (d * d / 2, d) if kind == "quadratic" else (d.abs(), d.sign())
        value += (w * phi).sum().item()
        new_grads.append(None if grads is None else grads[i].double() + scale * w * slope)
    return scale * value, new_grads
