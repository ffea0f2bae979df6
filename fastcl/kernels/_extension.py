"""Importing a compiled extension (``fastcl._C``, ``fastcl._cuda``) without ever failing."""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["load_extension"]


def load_extension(name: str, hint: str) -> tuple[ModuleType | None, str | None]:
    """``(fastcl.<name>, None)``, or ``(None, why not)`` when it does not import: the
    ``ImportError`` followed by ``hint`` (how to get it built)."""
    try:
        return importlib.import_module(f"fastcl.{name}"), None
    except ImportError as exc:
        return None, f"fastcl.{name} is not available ({type(exc).__name__}: {exc}); {hint}"
