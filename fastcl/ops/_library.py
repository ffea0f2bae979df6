"""Registration of fastcl's ops with ``torch.library`` so they compose with ``torch.compile``.

Inside a compiled region the ops are opaque custom ops with fake (meta) implementations;
in eager mode the public functions call the kernels directly, because the custom-op
dispatcher costs a few microseconds per tensor in a tensor list — about a millisecond
for a 200-tensor penalty, which is the hot path this package exists to make fast.

Rules for an op registered here (each is tested with ``torch.library.opcheck`` in
``tests/ops/test_library.py``, which takes the ops from :data:`REGISTERED`):

* a mutable ``Tensor[]`` argument is never empty: inductor cannot functionalise an empty
  mutable list, so an op that may have nothing to write is registered twice, once
  without the list (see the penalty's value-only op);
* ``None`` for an optional list of tensors is passed as ``[]`` (custom ops have no
  ``Tensor[]?`` type);
* an op that returns fresh tensors (rather than writing the caller's) is functional:
  ``mutates_args=()``, which inductor handles best.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["REGISTERED", "compiling", "register"]

#: ``{qualname: op}`` of every op registered by :func:`register`.
REGISTERED: dict[str, Callable] = {}


def compiling() -> bool:
    """True while ``torch.compile`` (dynamo) is tracing."""
    return torch.compiler.is_compiling()


def register(qualname: str, impl: Callable, fake: Callable, mutates_args: tuple[str, ...] = ()) -> Callable:
    """``torch.library.custom_op(qualname)(impl)`` with ``fake`` registered."""
    op = torch.library.custom_op(qualname, impl, mutates_args=mutates_args)
    op.register_fake(fake)
    REGISTERED[qualname] = op
    return op
