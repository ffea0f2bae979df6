"""Replayed provenance (:mod:`fastcl.importance.recording`): batches that repeat a traced forward skip the tracer.

Every case runs several batches of one shape (replayed) mixed with batches of other shapes
(traced, recorded separately), including a ragged last batch whose size collides with the
sequence length, and is checked against the float64 per-sample loop. Forwards whose tags
depend on values, or whose Python code branches on the data, must not replay a wrong record.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastcl.importance import diagonal_fisher, engine, mas_importance, recording

from . import models
from .reference import assert_matches, cross_entropy_loss, float64_copy, in_batches, mas_loss, per_sample_importance, split

STEPS = 6


@pytest.fixture
def spy(monkeypatch):
    """Counts replays, divergences and recorded scripts (``None``: not replayable) of the passes in a test."""
    stats = {"replays": 0, "diverged": 0, "scripts": []}

    class Player(recording.Player):
        def __init__(self, *args):
            super().__init__(*args)
            stats["replays"] += 1

        def _diverge(self):
            if not self.diverged:
                stats["diverged"] += 1
            super()._diverge()

    record = recording.Recorder.script

    def script(self):
        out = record(self)
        stats["scripts"].append(out)
        return out

    monkeypatch.setattr(engine, "Player", Player)
    monkeypatch.setattr(recording.Recorder, "script", script)
    return stats



def _case(name, gen):
    if name == "mlp_in_place_relu":
        return models.mlp(), torch.randn(36, 7, generator=gen, dtype=torch.float64), 4
    if name == "cnn":
        return models.randomise_norm_stats(models.CNN(), gen), torch.randn(36, 3, 8, 8, generator=gen, dtype=torch.float64), 5
    if name == "embedding_positions":
        return models.PositionTable(steps=STEPS), torch.randint(0, 11, (36, STEPS), generator=gen), 3
    if name == "parameter_positions":
        return models.PositionTable(steps=STEPS, parameter=True), torch.randint(0, 11, (36, STEPS), generator=gen), 3
    if name == "shared_table_into_linear":
        return models.SharedTable(steps=STEPS), torch.randn(36, STEPS, 5, generator=gen, dtype=torch.float64), 3
    if name == "sequence_first":
        return models.SequenceFirst(), torch.randn(36, STEPS, 5, generator=gen, dtype=torch.float64), 3
    raise AssertionError(name)


CASES = ["mlp_in_place_relu", "cnn", "embedding_positions", "parameter_positions", "shared_table_into_linear",
         "sequence_first"]
# 36 samples. Mixed: two batches of 8 (the second replays the first), a collision batch of 6 (= STEPS,
# traced), another 8 (replayed) and a ragged last batch of 6 that collides (replays the batch of 6).
# Ragged: three batches of 10 (two replayed), the collision only in the ragged last batch (traced).
SIZES = {"mixed": ([8, 8, STEPS, 8, STEPS], 3), "ragged_last": ([10, 10, 10, STEPS], 2)}


@pytest.mark.parametrize("sizes", list(SIZES))
@pytest.mark.parametrize("case", CASES)
def test_replayed_batches_match_the_per_sample_loop(case, sizes, spy):
    gen = torch.Generator().manual_seed(CASES.index(case))
    torch.manual_seed(CASES.index(case))
    model, x, classes = _case(case, gen)
    model = float64_copy(model)
    y = torch.randint(0, classes, (x.shape[0],), generator=gen)
    sizes, replays = SIZES[sizes]
    got = diagonal_fisher(model, in_batches(x, y, sizes))
    assert_matches(got, per_sample_importance(model, split(x, y), cross_entropy_loss), rtol=1e-8, atol=1e-13)
    # two shapes recorded, every other batch replayed, nothing diverged
    assert len(spy["scripts"]) == 2 and all(s is not None for s in spy["scripts"])
    assert spy["replays"] == replays and spy["diverged"] == 0


def test_replayed_mas_matches_the_per_sample_loop(spy):
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    model = float64_copy(models.PositionTable(steps=STEPS))
    x = torch.randint(0, 11, (36, STEPS), generator=gen)
    got = mas_importance(model, [b for b, _ in in_batches(x, x, SIZES["mixed"][0])])
    assert_matches(got, per_sample_importance(model, split(x), mas_loss, power=1), rtol=1e-8, atol=1e-13)
    assert spy["replays"] == 3


class _Branching(nn.Module):
    """Python control flow on the data: batches with a positive first entry take another layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x) if bool(x[0, 0] > 0) else torch.tanh(self.b(x))
        return self.head(h)


def test_a_forward_that_branches_on_the_data_diverges_and_is_traced(spy):
    gen = torch.Generator().manual_seed(12)
    torch.manual_seed(12)
    model = float64_copy(_Branching())
    x = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    x[0::5, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)  # the branch of each batch of 5
    y = torch.randint(0, 3, (20,), generator=gen)
    got = diagonal_fisher(model, in_batches(x, y, [5, 5, 5, 5]))
    assert_matches(got, per_sample_importance(model, split(x, y), _branch_loss(x, y)), rtol=1e-8, atol=1e-13)
    assert spy["diverged"] >= 1


def _branch_loss(x, y):
    """Per-sample loss of :class:`_Branching` with the branch its *batch* took (the first row decides)."""
    branch = {i: bool(x[(i // 5) * 5, 0] > 0) for i in range(x.shape[0])}
    index = iter(range(x.shape[0]))

    def loss(model, xi, yi):
        i = next(index)
        h = model.a(xi) if branch[i] else torch.tanh(model.b(xi))
        return nn.functional.cross_entropy(model.head(h), yi).sum()

    return loss


class _RandomScale(nn.Module):
    """A shared tensor drawn in the forward, broadcast along the samples: its tag depends on its values."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        scale = torch.ones(x.shape[0], 1, dtype=x.dtype)  # the same row for every sample: no position dependence
        return self.head(torch.tanh(self.lin(x) * scale))


def test_tags_read_from_values_are_not_replayed(spy):
    gen = torch.Generator().manual_seed(13)
    torch.manual_seed(13)
    model = float64_copy(_RandomScale())
    x = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    got = diagonal_fisher(model, in_batches(x, y, [4, 4, 4]))
    assert_matches(got, per_sample_importance(model, split(x, y), cross_entropy_loss), rtol=1e-8, atol=1e-13)
    assert spy["scripts"] == [None] and spy["replays"] == 0  # traced every batch


def test_signature_compares_types_and_refuses_opaque_arguments():
    tracer = engine.Tracer({}, set())
    x = torch.zeros(2, 3)
    one = recording.signature(tracer, torch.Tensor.sum, (x, 1), {})
    assert one == recording.signature(tracer, torch.Tensor.sum, (x, 1), {})
    assert one != recording.signature(tracer, torch.Tensor.sum, (x, True), {})  # 1 == True, but not the same argument
    assert one != recording.signature(tracer, torch.Tensor.sum, (x.t().contiguous().t(), 1), {})  # other strides
    assert recording.signature(tracer, torch.Tensor.sum, (x, object()), {}) is None
    assert recording.signature(tracer, lambda t: t, (x,), {}) is None  # not a torch function


def test_a_later_pass_replays_the_records_of_an_earlier_one(spy):
    """Records stay with the model: a later pass over the same parameters replays from its first batch."""
    gen = torch.Generator().manual_seed(14)
    torch.manual_seed(14)
    model = float64_copy(models.PositionTable(steps=STEPS))
    x = torch.randint(0, 11, (16, STEPS), generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    data = in_batches(x, y, [8, 8])
    ref = per_sample_importance(model, split(x, y), cross_entropy_loss)
    assert_matches(diagonal_fisher(model, data), ref, rtol=1e-8, atol=1e-13)
    assert spy["replays"] == 1 and len(spy["scripts"]) == 1
    assert_matches(diagonal_fisher(model, data), ref, rtol=1e-8, atol=1e-13)
    assert spy["replays"] == 3 and len(spy["scripts"]) == 1  # nothing traced again
    subset = ["pos.weight", "head.bias"]  # other tags (the others are constants now): a record of its own
    for _ in range(2):
        assert_matches(diagonal_fisher(model, data, params=subset), ref, names=subset, rtol=1e-8, atol=1e-13)
    assert spy["replays"] == 6 and len(spy["scripts"]) == 2 and spy["diverged"] == 0
