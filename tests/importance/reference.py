"""Float64 per-sample references: batch size 1, ``torch.autograd.grad``, square (or abs), mean."""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from fastcl.importance import PerSampleFallbackWarning, canonical_name


def float64_copy(model):
    m = copy.deepcopy(model).double().eval()
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def _params(model):
    return [(canonical_name(n), p) for n, p in model.named_parameters()]


def per_sample_importance(model, samples, sample_loss, power=2):
    """``(1/N) Σ_n |∇ sample_loss(model, *sample_n)|^power`` with float64 accumulation.

    ``sample_loss(model, *sample) -> scalar``; ``samples``: tuples of single-sample tensors
    (leading dim 1).
    """
    named = _params(model)
    out = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    count = 0
    for sample in samples:
        loss = sample_loss(model, *sample)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        for (n, _), g in zip(named, grads):
            if g is not None:
                g = g.double()
                out[n] += g.square() if power == 2 else g.abs()
        count += 1
    return {n: v / count for n, v in out.items()}


def split(x, y=None):
    """Single-sample tuples from batched tensors."""
    if y is None:
        return [(x[i:i + 1],) for i in range(x.shape[0])]
    return [(x[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])]


def cross_entropy_loss(model, x, y):
    return F.cross_entropy(model(x.double() if x.is_floating_point() else x), y).sum()


def exact_loss_terms(model, x, top_k=None):
    """``[(p_c, -log p_c)]`` for one sample (p detached), classes all or the top_k most probable."""
    logits = model(x.double() if x.is_floating_point() else x)[0]
    logp = torch.log_softmax(logits, -1)
    p = logp.detach().exp()
    classes = range(p.numel()) if top_k is None else p.topk(top_k).indices.tolist()
    return [(p[c], -logp[c]) for c in classes]


def exact_fisher(model, xs, top_k=None):
    named = _params(model)
    out = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    for (x,) in xs:
        for weight, loss in exact_loss_terms(model, x, top_k):
            grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
            for (n, _), g in zip(named, grads):
                if g is not None:
                    out[n] += weight * g.double().square()
    return {n: v / len(xs) for n, v in out.items()}


def mas_loss(model, x):
    out = model(x.double() if x.is_floating_point() else x)
    return out.square().sum()


def assert_matches(result, reference, rtol=1e-8, atol=1e-12, names=None):
    names = list(reference) if names is None else names
    assert set(result) == set(names), (sorted(result), sorted(names))
    for n in names:
        torch.testing.assert_close(result[n].double(), reference[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def vmap_importance(model, batches, sample_loss, power=2):
    """``(1/N) Σ_n |∇ sample_loss|^power`` with per-sample gradients from ``torch.func.vmap(grad(...))``.

    ``batches``: tuples of batched tensors; ``sample_loss(model, *sample)`` as for
    :func:`per_sample_importance` (each sample tensor gets its leading dim of 1 back).
    """
    named = _params(model)
    raw = {n: p.detach() for n, p in model.named_parameters()}
    canon = {n: canonical_name(n) for n in raw}
    out = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}

    def loss(params, *sample):
        def call(*args, **kwargs):
            return functional_call(model, params, args, kwargs)

        return sample_loss(call, *(t.unsqueeze(0) for t in sample))

    count = 0
    for batch in batches:
        grads = vmap(grad(loss), in_dims=(None, *[0] * len(batch)))(raw, *batch)
        for n, g in grads.items():
            if canon[n] in out:
                out[canon[n]] += (g.square() if power == 2 else g.abs()).sum(0).double()
        count += batch[0].shape[0]
    return {n: v / count for n, v in out.items()}


# --------------------------------------------------------------------------- batching and warnings


def in_batches(x, y, sizes):
    """``[(x, y)]`` in consecutive batches of ``sizes`` rows."""
    out, start = [], 0
    for s in sizes:
        out.append((x[start:start + s], y[start:start + s]))
        start += s
    return out


def no_fallback(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, failing on any :class:`PerSampleFallbackWarning`."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)
        return fn(*args, **kwargs)


def with_fallback_warnings(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), [the messages of its PerSampleFallbackWarnings])``."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in record if issubclass(w.category, PerSampleFallbackWarning)]
