r"""Anchored penalty over a list of tensors, value and gradient in one pass.

Math (``t`` indexes tensors, ``k`` elements, ``s`` = ``scale``)::

    value   = s · Σ_t Σ_k w_tk · φ(θ_tk − a_tk)
    grad_t += s · w_t · φ'(θ_t − a_t)

with ``kind="quadratic"``: φ(d) = d²/2, φ'(d) = d, and ``kind="l1"``: φ(d) = |d|,
φ'(d) = sign(d) (0 at d = 0). ``w`` is the importance (Fisher, MAS, SI); ``weights=None``
means w = 1 (L2-SP / L1-SP). So EWC's ``(λ/2)·Σ F(θ−θ*)²`` is ``scale=λ, w=F``, L2-SP's
``(λ/2)·Σ(θ−θ*)²`` is ``scale=λ, weights=None`` and L1-SP's ``λ·Σ|θ−θ*|`` is
``scale=λ, kind="l1"``.

Dtypes: θ and grad in float32, bfloat16 or float16 (grad has θ's dtype); a and w in
float32 or bfloat16; every product and the sum accumulate in float32 (float64 when θ is
float64, which only the torch backend runs). The value is a 0-dim float32 tensor on θ's
device.

Backend kernels (``OPS["penalty"]`` of a backend module) are called as
``kernel(params, anchors, weights, scale, kind, grads)`` with these guarantees from
:func:`penalty`: non-empty lists of equal length; every tensor non-empty, contiguous,
on one device; per list one dtype; shapes equal position-wise; ``weights`` a list or
``None``; ``grads`` a list or ``None``; ``scale`` a Python float. Non-contiguous
tensors never reach a kernel: they take the reference path on their strided views (no
hidden copies of the inputs), and the two partial values are added.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from ._dispatch import resolve
from ._library import compiling, register

__all__ = ["penalty", "anchored_penalty", "penalty_reference", "KINDS"]

KINDS = ("quadratic", "l1")
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def penalty_reference(
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor] | None,
    scale: float,
    kind: str,
    grads: Sequence[torch.Tensor] | None,
) -> torch.Tensor:
    """Plain-PyTorch penalty (the oracle and CPU fallback). Works on strided tensors."""
    acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    total = torch.zeros((), dtype=acc, device=params[0].device)
    for i, p in enumerate(params):
        d = p.detach().to(acc) - anchors[i].to(acc)
        w = None if weights is None else weights[i].to(acc)
        if kind == "quadratic":
            term = d * d
            total += 0.5 * (term if w is None else w * term).sum()
            slope = d
        else:
            term = d.abs()
            total += (term if w is None else w * term).sum()
            slope = d.sign()
        if grads is not None:
            step = scale * slope if w is None else (scale * w) * slope
            grads[i].add_(step.to(grads[i].dtype))
    return total * scale


def _validate(params, anchors, weights, grads, kind, scale) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(scale, (int, float)) or scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    n = len(params)
    for label, seq in (("anchors", anchors), ("weights", weights), ("grads", grads)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{label} has {len(seq)} tensors but params has {n}")
    for i, p in enumerate(params):
        if p.dtype not in _PARAM_DTYPES:
            raise TypeError(f"params[{i}] has dtype {p.dtype}; expected one of {_PARAM_DTYPES}")
        for label, seq, dtypes in (("anchors", anchors, _STORAGE_DTYPES), ("weights", weights, _STORAGE_DTYPES), ("grads", grads, (p.dtype,))):
            if seq is None:
                continue
            t = seq[i]
            if t.shape != p.shape:
                raise ValueError(f"{label}[{i}] has shape {tuple(t.shape)} but params[{i}] has {tuple(p.shape)}")
            if t.device != p.device:
                raise ValueError(f"{label}[{i}] is on {t.device} but params[{i}] is on {p.device}")
            if t.dtype not in dtypes:
                raise TypeError(f"{label}[{i}] has dtype {t.dtype}; expected one of {dtypes}")


def penalty(
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor] | None = None,
    *,
    scale: float = 1.0,
    kind: str = "quadratic",
    grads: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``s·Σ w·φ(θ−a)``; with ``grads``, also ``grads[t] += s·w·φ'(θ−a)`` in place.

    Not differentiable (use :func:`anchored_penalty` inside a loss). Returns a 0-dim
    float32 tensor on the device of ``params[0]`` (float64 when θ is float64).
    Tensors on several devices are grouped per device, one kernel launch per group.
    """
    params = list(params)
    anchors = list(anchors)
    weights = None if weights is None else list(weights)
    grads = None if grads is None else list(grads)
    _validate(params, anchors, weights, grads, kind, scale)
    if not params:
        return torch.zeros((), dtype=torch.float32)
    impl = _penalty_op if (_penalty_op is not None and compiling()) else _penalty_impl
    with torch.no_grad():
        return impl(params, anchors, weights or [], float(scale), kind, grads or [])


def _penalty_impl(
    params: list[torch.Tensor],
    anchors: list[torch.Tensor],
    weights: list[torch.Tensor],
    scale: float,
    kind: str,
    grads: list[torch.Tensor],
) -> torch.Tensor:
    """The validated op; empty ``weights``/``grads`` lists mean "unweighted"/"value only"."""
    weights = weights or None
    grads = grads or None
    out_device = params[0].device

    groups: dict[tuple, list[int]] = defaultdict(list)
    strided: list[int] = []
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        tensors = [p, anchors[i]]
        if weights is not None:
            tensors.append(weights[i])
        if grads is not None:
            tensors.append(grads[i])
        if not all(t.is_contiguous() for t in tensors):
            strided.append(i)
            continue
        key = (p.device, p.dtype, anchors[i].dtype, None if weights is None else weights[i].dtype)
        groups[key].append(i)

    def pick(seq, idx):
        return None if seq is None else [seq[i] for i in idx]

    parts = []
    for (device, dtype, _, _), idx in groups.items():
        _, kernel = resolve("penalty", device, dtype)
        parts.append(kernel(pick(params, idx), pick(anchors, idx), pick(weights, idx), scale, kind, pick(grads, idx)))
    if strided:
        by_device: dict[torch.device, list[int]] = defaultdict(list)
        for i in strided:
            by_device[params[i].device].append(i)
        for idx in by_device.values():
            parts.append(penalty_reference(pick(params, idx), pick(anchors, idx), pick(weights, idx), scale, kind, pick(grads, idx)))
    acc = _value_dtype(params)
    total = torch.zeros((), dtype=acc, device=out_device)
    for part in parts:
        total = total + part.to(device=out_device, dtype=acc)
    return total


def _value_dtype(params) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _penalty_fake(params, anchors, weights, scale, kind, grads):
    return params[0].new_empty((), dtype=_value_dtype(params))


_penalty_op = register("fastcl::penalty", _penalty_impl, _penalty_fake, mutates_args=("grads",))


class _AnchoredPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale, kind, anchors, weights, *params):
        ctx.scale, ctx.kind, ctx.anchors, ctx.weights = scale, kind, anchors, weights
        ctx.save_for_backward(*params)
        return penalty(params, anchors, weights, scale=scale, kind=kind)

    @staticmethod
    def backward(ctx, grad_output):
        params = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        idx = [i for i, n in enumerate(needs) if n]
        grads = [torch.zeros_like(params[i], memory_format=torch.contiguous_format) for i in idx]
        if idx:
            pick = lambda seq: None if seq is None else [seq[i] for i in idx]  # noqa: E731
            penalty([params[i] for i in idx], pick(ctx.anchors), pick(ctx.weights), scale=ctx.scale, kind=ctx.kind, grads=grads)
            torch._foreach_mul_(grads, grad_output.to(grads[0].dtype))
        out = [None] * len(params)
        for j, i in enumerate(idx):
            out[i] = grads[j]
        return (None, None, None, None, *out)


def anchored_penalty(
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor] | None = None,
    *,
    scale: float = 1.0,
    kind: str = "quadratic",
) -> torch.Tensor:
    """Differentiable ``s·Σ w·φ(θ−a)`` (gradient flows to ``params`` only).

    The forward pass reads θ, a, w once; the backward pass computes ``s·w·φ'(θ−a)``
    with the same fused kernel. For the fastest training step, strategies offer
    ``add_penalty_grad_()``, which calls :func:`penalty` with ``grads=[p.grad ...]``
    after ``loss.backward()`` (one memory pass, no autograd graph).
    """
    params = list(params)
    if not params:
        return torch.zeros((), dtype=torch.float32)
    return _AnchoredPenalty.apply(float(scale), kind, list(anchors), None if weights is None else list(weights), *params)
