"""Parameter names that survive model wrappers (DDP, FSDP, torch.compile, checkpointing)."""
from __future__ import annotations

import torch

__all__ = ["canonical_name", "named_trainable_parameters", "named_parameters", "unwrap_model"]

_WRAPPER_TOKENS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def canonical_name(name: str) -> str:
    """Drop wrapper tokens: ``module.`` (DDP), ``_orig_mod.`` (torch.compile), FSDP and checkpoint wrappers.

    ``"module._orig_mod.fc.weight" -> "fc.weight"``. A user submodule literally named
    ``module`` is dropped too; the mapping stays one-to-one for a given model because
    :func:`named_parameters` refuses collisions.
    """
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_TOKENS)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def named_parameters(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.nn.Parameter]:
    """``{canonical_name: parameter}``; a shared (tied) parameter appears once, under its first name."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out: dict[str, torch.nn.Parameter] = {}
    for name, p in model.named_parameters():  # named_parameters already de-duplicates shared parameters
        if trainable_only and not p.requires_grad:
            continue
        key = canonical_name(name)
        if key in out and out[key] is not p:
            raise ValueError(f"two parameters map to the canonical name {key!r}; rename the submodule called 'module'")
        out[key] = p
    return out


def named_trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``[(canonical_name, parameter)]`` for parameters with ``requires_grad=True``, de-duplicated."""
    return list(named_parameters(model, trainable_only=True).items())
