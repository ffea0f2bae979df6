"""Fine-tuning helpers: freezing, layer-wise learning rates, gradual unfreezing.

Parameters are addressed by their qualified names from ``model.named_parameters()``
(e.g. ``"encoder.layer.0.weight"``).

Blocks
------
:func:`layerwise_lr_groups` and :class:`GradualUnfreezer` work on *blocks*, ordered from
the input to the output (the last block is the head). A block is a name prefix: it owns
the parameters whose name equals the prefix or starts with ``prefix + "."``; when several
prefixes match, the longest wins. With ``blocks=None`` the blocks are the first
components of the parameter names in ``named_parameters()`` order, i.e. the model's
direct children that own parameters, in registration order, preceded by any parameter
registered on the model itself (each its own block; ``named_parameters()`` lists them
first, and such parameters, e.g. a position embedding, usually sit at the input): for
``nn.Sequential(Linear, ReLU, Linear)`` that is ``["0", "2"]``. Pass ``blocks``
explicitly whenever this order is not the input-to-output order of your model.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from ._validate import check_real

__all__ = ["freeze", "unfreeze", "trainable_parameters", "layerwise_lr_groups", "GradualUnfreezer", "default_blocks"]


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _strings(value, name: str, what: str) -> list[str]:
    """``value`` (a string or an iterable of strings) as a non-empty list of strings."""
    items = [value] if isinstance(value, str) else None
    if items is None and not isinstance(value, (bytes, nn.Module)):
        try:
            items = list(value)
        except TypeError:
            items = None
    if not items or not all(isinstance(p, str) for p in items):
        raise TypeError(f"{name} must be a string or a non-empty list of {what} (strings), got {value!r}")
    return items


def _patterns(patterns) -> list[str] | None:
    return None if patterns is None else _strings(patterns, "patterns", "name patterns")


def _set_requires_grad(model: nn.Module, patterns, flag: bool) -> list[str]:
    _check_model(model)
    pats = _patterns(patterns)
    named = list(model.named_parameters())
    if pats is None:
        selected = named
    else:
        unmatched = [p for p in pats if not any(fnmatch.fnmatchcase(n, p) for n, _ in named)]
        if unmatched:
            raise ValueError(f"pattern(s) {unmatched} match no parameter of the model")
        selected = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in pats)]
    changed = []
    for name, param in selected:
        if param.requires_grad != flag:
            param.requires_grad_(flag)
            changed.append(name)
    return changed


def freeze(model: nn.Module, patterns: str | Sequence[str] | None = None) -> list[str]:
    """Set ``requires_grad=False`` on every parameter (``patterns=None``) or on those whose
    qualified name matches any of the shell-style ``patterns`` (:func:`fnmatch.fnmatchcase`;
    ``*`` also matches dots, so ``"encoder.*"`` covers the whole encoder).

    Returns the names whose flag actually changed. A pattern that matches no parameter
    raises :class:`ValueError` naming it (a typo would otherwise silently train everything).
    """
    return _set_requires_grad(model, patterns, False)


def unfreeze(model: nn.Module, patterns: str | Sequence[str] | None = None) -> list[str]:
    """Set ``requires_grad=True``; same selection, return value and errors as :func:`freeze`."""
    return _set_requires_grad(model, patterns, True)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad=True``, in registration order."""
    _check_model(model)
    return [p for p in model.parameters() if p.requires_grad]


def default_blocks(model: nn.Module) -> list[str]:
    """First components of the parameter names, in registration order (see module docstring)."""
    _check_model(model)
    seen: dict[str, None] = {}
    for name, _ in model.named_parameters():
        seen.setdefault(name.split(".", 1)[0], None)
    return list(seen)


def _assign_blocks(model: nn.Module, blocks: Sequence[str] | None) -> tuple[list[str], list[list[tuple[str, nn.Parameter]]], list[str]]:
    """Return ``(blocks, members per block, names of parameters in no block)``."""
    _check_model(model)
    if blocks is None:
        blocks = default_blocks(model)
    else:
        if isinstance(blocks, str):
            raise TypeError(f"blocks must be a list of name prefixes (strings), got the string {blocks!r}; write [{blocks!r}]")
        if not isinstance(blocks, nn.Module) and hasattr(blocks, "__len__") and len(blocks) == 0:
            raise ValueError("blocks must list at least one name prefix, got an empty list")
        blocks = _strings(blocks, "blocks", "name prefixes")
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"blocks has duplicate prefixes: {blocks}")
    if not blocks:
        raise ValueError("the model has no parameters (no blocks)")
    members: list[list[tuple[str, nn.Parameter]]] = [[] for _ in blocks]
    outside = []
    for name, param in model.named_parameters():
        best, best_len = -1, -1
        for k, prefix in enumerate(blocks):
            if (name == prefix or name.startswith(prefix + ".") or prefix == "") and len(prefix) > best_len:
                best, best_len = k, len(prefix)
        if best < 0:
            outside.append(name)
        else:
            members[best].append((name, param))
    empty = [b for b, m in zip(blocks, members) if not m]
    if empty:
        raise ValueError(f"block prefix(es) {empty} own no parameter of the model")
    return blocks, members, outside


def layerwise_lr_groups(
    model: nn.Module,
    base_lr: float,
    decay: float = 0.8,
    blocks: Sequence[str] | None = None,
    trainable_only: bool = True,
    **group_options,
) -> list[dict]:
    """Optimizer parameter groups with discriminative (layer-wise decayed) learning rates.

    With blocks ``b_0 .. b_{L-1}`` (input to output, see the module docstring), block
    ``b_k`` gets ``lr = base_lr · decay^(L-1-k)``: the head gets ``base_lr``, each earlier
    block ``decay`` times the next one's. Every group is
    ``{"params": [...], "lr": ..., "name": prefix, **group_options}`` (e.g. pass
    ``weight_decay=0.01``). With ``trainable_only`` frozen parameters are left out and a
    block with none left gives no group. Parameters in no listed block raise ValueError.
    """
    base_lr = check_real(base_lr, "base_lr", low=0.0, low_inclusive=False)
    decay = check_real(decay, "decay", low=0.0, high=1.0, low_inclusive=False)
    if not isinstance(trainable_only, bool):
        raise TypeError(f"trainable_only must be a bool, got {type(trainable_only).__name__}")
    taken = sorted({"params", "lr", "name"} & set(group_options))
    if taken:
        raise TypeError(f"layerwise_lr_groups() sets {', '.join(taken)} of every group itself; pass the learning rate as base_lr")
    names, members, outside = _assign_blocks(model, blocks)
    if outside:
        raise ValueError(f"parameters {outside} are in none of the blocks {names}")
    groups = []
    depth = len(names)
    for k, (prefix, params) in enumerate(zip(names, members)):
        params = [p for _, p in params if p.requires_grad or not trainable_only]
        if params:
            groups.append({"params": params, "lr": base_lr * decay ** (depth - 1 - k), "name": prefix, **group_options})
    return groups


class GradualUnfreezer:
    """ULMFiT-style gradual unfreezing (Howard & Ruder, 2018).

    On construction every parameter of ``model`` is frozen except those of the last
    block (the head). Each :meth:`step` (call it once per epoch) unfreezes the next
    earlier block; after ``len(blocks) - 1`` steps all blocks are trainable and further
    steps do nothing. Parameters that belong to no listed block stay frozen.

    Build the optimizer over all parameters: frozen ones get no gradient, so the
    optimizer skips them until they are unfrozen.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[str] | None = None):
        self.model = model
        self.blocks, self._members, self.outside = _assign_blocks(model, blocks)
        freeze(model)
        for _, param in self._members[-1]:
            param.requires_grad_(True)
        self.num_unfrozen = 1

    @property
    def done(self) -> bool:
        """True once every block is trainable."""
        return self.num_unfrozen >= len(self.blocks)

    @property
    def trainable_blocks(self) -> list[str]:
        """The prefixes of the blocks unfrozen so far (input to output order)."""
        return self.blocks[len(self.blocks) - self.num_unfrozen :]

    def step(self) -> list[str]:
        """Unfreeze the next earlier block; return its parameter names (``[]`` when done)."""
        if self.done:
            return []
        self.num_unfrozen += 1
        members = self._members[len(self.blocks) - self.num_unfrozen]
        for _, param in members:
            param.requires_grad_(True)
        return [name for name, _ in members]

    def __repr__(self) -> str:
        return f"GradualUnfreezer(blocks={self.blocks}, trainable={self.trainable_blocks})"
