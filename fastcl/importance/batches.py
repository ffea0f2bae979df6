"""Batches of the importance pass: the default ``(inputs, targets)`` layout, and cutting for ``max_samples``.

The data convention (shared with the exact fallback, which splits a batch into its
samples): the samples of a batch are the rows of every tensor whose dim 0 equals the first
tensor's; other tensors are passed whole to every sample.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = ["default_batch", "default_forward", "truncate"]


def default_batch(batch, device):
    """Normalise a default batch to ``(inputs, targets)`` on ``device``."""
    if isinstance(batch, torch.Tensor):
        inputs, targets = batch, None
    elif isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        inputs, targets = batch[0], (batch[1] if len(batch) == 2 else None)
    else:
        raise TypeError(
            "a batch must be (inputs, targets), (inputs,) or an inputs tensor; got "
            f"{type(batch).__name__}{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}. "
            "Pass forward=lambda model, batch: (outputs, targets) for other batch layouts"
        )
    if isinstance(inputs, torch.Tensor):
        if inputs.device == device and (targets is None or (isinstance(targets, torch.Tensor) and targets.device == device)):
            return (inputs,), targets  # the common case, without walking the structures
        inputs = (inputs,)
    elif isinstance(inputs, list):
        inputs = tuple(inputs)
    elif not isinstance(inputs, (tuple, Mapping)):
        raise TypeError(f"inputs must be a tensor, a tuple of tensors or a dict, got {type(inputs).__name__}")

    def move(t):
        return t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) and t.device != device else t

    return tree_map(move, inputs), tree_map(move, targets)


def default_forward(model, batch):
    inputs, targets = batch
    outputs = model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)
    return outputs, targets


def truncate(batch, keep: int):
    """The first ``keep`` samples: every tensor whose dim 0 equals the batch size is cut."""
    leaves, spec = tree_flatten(batch)
    sizes = [l.shape[0] for l in leaves if isinstance(l, torch.Tensor) and l.dim() >= 1]
    if not sizes or sizes[0] <= keep:
        return batch
    size = sizes[0]
    cut = [l[:keep] if isinstance(l, torch.Tensor) and l.dim() >= 1 and l.shape[0] == size else l for l in leaves]
    return tree_unflatten(cut, spec)
