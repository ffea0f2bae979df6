r"""Exact per-sample fallback for parameters no rule covers (RNNs, direct parameter use...).

For each sample ``b`` of a batch, the per-sample loss ``ℓ_b`` is recomputed on a batch of
one and ``Σ_b |∇_θ ℓ_b|^p`` is accumulated, only for the fallback parameters ``θ``:

* first choice: ``torch.func.vmap(torch.func.grad(ℓ))`` over chunks of samples
  (``functional_call`` substitutes the fallback parameters; memory bounded by the chunk);
* when ``vmap`` cannot run the model (ops without batching rules, data-dependent
  control flow, ``.item()``...): a loop over samples with ``torch.autograd.grad``.

Samples are found by splitting every tensor of the batch whose dim 0 has ``B`` rows.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .contributions import power_of

__all__ = ["Runner", "per_sample_accumulate"]

_BUDGET_BYTES = 64 * 2**20


class Runner(nn.Module):
    """``forward(batch) = fwd(model, batch)``: makes a batch-level forward functional-callable."""

    def __init__(self, model: nn.Module, fwd, output_fn=None):
        super().__init__()
        self.model = model
        self._fwd = fwd
        self._output_fn = output_fn

    def forward(self, batch):
        outputs, targets = self._fwd(self.model, batch)
        return (outputs if self._output_fn is None else self._output_fn(outputs)), targets


def _split(batch, size):
    leaves, spec = tree_flatten(batch)
    mask = [isinstance(l, torch.Tensor) and l.dim() >= 1 and l.shape[0] == size for l in leaves]
    if not any(mask):
        raise ValueError(
            f"cannot split the batch into its {size} samples for the per-sample fallback: "
            f"no tensor in it has {size} rows along dim 0"
        )
    return leaves, spec, mask


def _assemble(leaves, spec, mask, sample_leaves):
    it = iter(sample_leaves)
    return tree_unflatten([next(it) if m else l for l, m in zip(leaves, mask)], spec)


def per_sample_accumulate(
    runner: Runner,
    params: dict[str, nn.Parameter],
    batch,
    size: int,
    variants: list,
    acc: dict[str, torch.Tensor],
    power: int,
    state: dict,
    output_fn=None,
) -> None:
    """Add ``Σ_b Σ_variants |∇ℓ_b|^power`` into ``acc[name]`` for ``name in params``.

    ``params``: ``{runner parameter path: parameter}``; ``acc`` is keyed by the same paths.
    ``variants``: ``[(loss, extra)]`` with ``loss(outputs, targets, extra) -> [n]`` and
    ``extra`` a tensor pytree with ``size`` rows (or ``None``). ``state["use_loop"]`` is set
    when ``vmap`` failed, so later batches go straight to the loop.
    """
    leaves, spec, mask = _split(batch, size)
    if output_fn is not None:
        runner = Runner(runner.model, runner._fwd, output_fn)
    if not state.get("use_loop"):
        try:
            _vmap_accumulate(runner, params, leaves, spec, mask, size, variants, acc, power)
            return
        except Exception as exc:  # vmap limitation: the loop below is the exact last resort
            state["use_loop"] = True
            state["vmap_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    _loop_accumulate(runner, params, leaves, spec, mask, size, variants, acc, power)


def _vmap_accumulate(runner, params, leaves, spec, mask, size, variants, acc, power):
    detached = {n: p.detach() for n, p in params.items()}
    numel = sum(p.numel() for p in params.values())
    chunk = max(1, min(size, _BUDGET_BYTES // max(numel * 4 * 2, 1)))
    batched = [l for l, m in zip(leaves, mask) if m]

    def one_sample(p, sample_leaves, loss, extra):
        batch1 = _assemble(leaves, spec, mask, [t.unsqueeze(0) for t in sample_leaves])
        outputs, targets = functional_call(runner, p, (batch1,))
        extra1 = None if extra is None else tree_map(lambda t: t.unsqueeze(0), extra)
        return loss(outputs, targets, extra1).sum()

    per_sample_grad = grad(one_sample)
    with torch.no_grad():  # the non-substituted parameters need no graph
        for loss, extra in variants:
            fn = vmap(
                lambda p, s, e, _loss=loss: per_sample_grad(p, s, _loss, e),
                in_dims=(None, 0, None if extra is None else 0),
            )
            for start in range(0, size, chunk):
                stop = min(size, start + chunk)
                sample_leaves = [t[start:stop] for t in batched]
                e = None if extra is None else tree_map(lambda t: t[start:stop], extra)
                grads = fn(detached, sample_leaves, e)
                for name, g in grads.items():
                    acc[name] += power_of(g.to(acc[name].dtype), power).sum(0)


def _loop_accumulate(runner, params, leaves, spec, mask, size, variants, acc, power):
    names = list(params)
    tensors = [params[n] for n in names]
    for b in range(size):
        batch1 = _assemble(leaves, spec, mask, [l[b:b + 1] for l, m in zip(leaves, mask) if m])
        for loss, extra in variants:
            extra1 = None if extra is None else tree_map(lambda t: t[b:b + 1], extra)
            with torch.enable_grad():
                outputs, targets = runner(batch1)
                value = loss(outputs, targets, extra1).sum()
                grads = torch.autograd.grad(value, tensors, allow_unused=True)
            for name, g in zip(names, grads):
                if g is not None:
                    acc[name] += power_of(g.to(acc[name].dtype), power)
