"""One suite per op. Each module has its rows' tables (``BASELINES``: the place to add a
baseline), input builders, ``bench(cfg, rec)`` for ``run.py``, the step functions the
pytest-benchmark files time, and (penalty, fisher, distill) the correctness checks that
``gpu_check.py`` runs at real sizes against ``oracles``.

``NAMES``: the ``run.py --ops`` names, in run order; ``load(name)`` imports one.
"""
from __future__ import annotations

from importlib import import_module

__all__ = ["NAMES", "load"]

NAMES = ("penalty", "fisher", "distill", "e2e")


def load(name: str):
    """The suite module ``suites.<name>`` (imported on demand: each pulls in its baselines' libraries)."""
    if name not in NAMES:
        raise ValueError(f"suite must be one of {NAMES}, got {name!r}")
    return import_module(f"{__name__}.{name}")
