"""All-or-nothing updates of several strategies (one home for the Trainer and the Lightning callback)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

__all__ = ["all_or_nothing"]


@contextlib.contextmanager
def all_or_nothing(objects: Iterable) -> Iterator[None]:
    """Restore every object's attributes if the block raises.

    Enough for fastcl strategies: their state-changing calls (consolidation, loading)
    replace attributes, never mutate them in place, so the saved references are the old state.
    """
    saved = [(obj, dict(vars(obj))) for obj in objects]
    try:
        yield
    except BaseException:
        for obj, attributes in saved:
            vars(obj).clear()
            vars(obj).update(attributes)
        raise
