"""What the install-time build of the compiled extensions recorded (written by setup.py).

``setup.py`` writes ``fastcl/_build_status.json`` next to the extensions:
``{"fastcl._C": {"built": bool, "outcome": str, "reason": str | None}, "fastcl._cuda": {...}}``
with ``outcome`` one of built, skipped, no-pybind11, no-compiler, compile-error, link-error,
no-nvcc, nvcc-error, error. ``fastcl info`` prints it, so a failed build has a visible
cause after pip reported "Successfully built".
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["build_status", "describe", "status_path"]


def status_path() -> Path:
    return Path(__file__).resolve().parent / "_build_status.json"


def build_status() -> dict[str, dict] | None:
    """The recorded outcome per extension, or ``None`` when there is no (readable) record."""
    try:
        data = json.loads(status_path().read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(name: str, load_error: str | None) -> str:
    """One line on extension ``name``: its build outcome and, if built but not loadable, why."""
    status = build_status()
    entry = None if status is None else status.get(name)
    if not isinstance(entry, dict):
        if load_error is None:
            return "available"
        return "no build record (fastcl was installed without building its extensions, or from an older build)"
    if entry.get("built"):
        return "built and loaded" if load_error is None else f"built at install time but does not load: {load_error}"
    reason = " ".join(str(entry.get("reason") or "unknown").split())
    if load_error is None:  # an extension file from an earlier build is still there
        return f"loaded (an earlier build; the last build did not build it: {reason})"
    return f"not built ({entry.get('outcome', 'error')}): {reason}"
