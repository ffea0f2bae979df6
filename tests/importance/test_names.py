"""canonical_name and named_trainable_parameters."""
from __future__ import annotations

import pytest
from torch import nn

from fastcl.importance import canonical_name, named_trainable_parameters


@pytest.mark.parametrize("raw,expected", [
    ("fc.weight", "fc.weight"),
    ("module.fc.weight", "fc.weight"),
    ("_orig_mod.module.fc.weight", "fc.weight"),
    ("module._orig_mod.layers.0._fsdp_wrapped_module.attn._checkpoint_wrapped_module.bias", "layers.0.attn.bias"),
    ("encoder.module.weight", "encoder.weight"),
    ("module", "module"),  # the parameter's own name is kept
])
def test_canonical_name(raw, expected):
    assert canonical_name(raw) == expected


def test_named_trainable_parameters_dedups_tied_and_skips_frozen():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5)
            self.head.weight = self.emb.weight
            self.frozen = nn.Linear(2, 2)
            self.frozen.requires_grad_(False)

    model = Tied()
    names = [n for n, _ in named_trainable_parameters(model)]
    assert names == ["emb.weight", "head.bias"]

    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    assert [n for n, _ in named_trainable_parameters(Wrap(model))] == names


def test_colliding_canonical_names_raise():
    class Collide(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.module = nn.Module()
            self.module.a = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="canonical name"):
        named_trainable_parameters(Collide())
