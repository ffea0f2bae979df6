"""Parameter names that survive wrapping (DDP, ``torch.compile``, FSDP, activation checkpointing).

Wrappers insert a path component into every parameter name: ``module.`` (DDP /
DataParallel), ``_orig_mod.`` (``torch.compile``), ``_fsdp_wrapped_module.`` (FSDP) and
``_checkpoint_wrapped_module.`` (checkpoint wrapper). Importance dictionaries are keyed by
the name with those components removed, so a Fisher computed on a wrapped model applies
to the bare model and vice versa.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["canonical_name", "named_parameters", "named_trainable_parameters", "unwrap_model"]

_WRAPPER_COMPONENTS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def canonical_name(name: str) -> str:
    """``name`` without wrapper components, e.g. ``"module._orig_mod.fc.weight" -> "fc.weight"``.

    The components ``module``, ``_orig_mod``, ``_fsdp_wrapped_module`` and
    ``_checkpoint_wrapped_module`` are removed wherever they occur in the dotted path,
    except the last component (the parameter's own name is never removed).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    parts = name.split(".")
    kept = [p for p in parts[:-1] if p not in _WRAPPER_COMPONENTS]
    kept.append(parts[-1])
    return ".".join(kept)


def named_trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``[(canonical_name, parameter)]`` for every parameter with ``requires_grad=True``.

    A parameter shared by several modules (tied weights) appears once, under the first
    name ``model.named_parameters()`` gives it. Raises ``ValueError`` when two distinct
    parameters map to the same canonical name.
    """
    return [(n, p) for n, p in _canonical_parameters(model) if p.requires_grad]


def _canonical_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """All parameters (trainable or not), canonical names, tied parameters once."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    seen: dict[str, str] = {}
    out = []
    for raw, p in model.named_parameters():
        name = canonical_name(raw)
        if name in seen:
            raise ValueError(
                f"parameters {seen[name]!r} and {raw!r} both map to the canonical name {name!r}; "
                "rename one of the submodules"
            )
        seen[name] = raw
        out.append((name, p))
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    The importance pass runs the plain module: per-sample gradients are a local
    computation, and compiled graphs or gradient-synchronising wrappers would get in the way.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        parallel = (nn.DataParallel, getattr(getattr(torch.nn, "parallel", None), "DistributedDataParallel", ()))
        if isinstance(model, parallel) and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
            continue
        return model


def named_parameters(model: nn.Module, trainable_only: bool = False) -> dict[str, nn.Parameter]:
    """``{canonical_name: parameter}``, tied parameters once; only ``requires_grad`` ones if ``trainable_only``."""
    return {n: p for n, p in _canonical_parameters(model) if p.requires_grad or not trainable_only}
