"""The tracer's tags: where the samples are, proven from provenance; everything unproven is Unknown."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastcl.importance.provenance import Batched, Shared, Tracer, Unknown, per_sample


def _trace(fn, x, n=None, params=()):
    """``(tracer, result)`` of ``fn(x)`` with ``x`` seeded as batched along dim 0 (``n`` samples)."""
    tracer = Tracer({id(p): f"p{i}" for i, p in enumerate(params)}, set())
    tracer.seed(x, Batched(0, n or x.shape[0], 1))
    with tracer:
        out = fn(x)
    return tracer, out


def _owners(shape, tag):
    """Sample index of every element of a tensor of ``shape`` tagged ``tag``."""
    d, n, inner = tag
    idx = (torch.arange(shape[d]) // inner) % n
    view = [1] * len(shape)
    view[d] = shape[d]
    return idx.view(view).expand(shape)


def _factorisations(numel, draw):
    sizes = []
    rest = numel
    while rest > 1:
        divisors = [k for k in range(2, rest + 1) if rest % k == 0]
        k = draw(st.sampled_from(divisors))
        sizes.append(k)
        rest //= k
    if draw(st.booleans()):
        sizes.insert(draw(st.integers(0, len(sizes))), 1)
    return sizes or [1]


@st.composite
def _reshapes(draw):
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    d = draw(st.integers(0, len(shape) - 1))
    n = shape[d]
    new = _factorisations(math.prod(shape), draw)
    perm = draw(st.permutations(range(len(new))))
    return shape, d, n, new, perm


@settings(max_examples=150, deadline=None)
@given(_reshapes())
def test_reshape_and_permute_tags_match_the_samples_of_every_element(case):
    """Property: a tag claims an owner for every element; reshapes and permutes keep that claim true.

    When no dim of the result holds the samples in the ``(i // inner) % n`` form, the tag
    must be ``Unknown`` (checked by brute force over every dim and ``inner``).
    """
    shape, d, n, new, perm = case
    x = torch.randn(*shape)
    x_owner = _owners(x.shape, Batched(d, n, 1)).clone()
    tracer = Tracer({}, set())
    tracer.seed(x, Batched(d, n, 1))
    with tracer:
        y = x.reshape(new).permute(perm)
    owner = x_owner.reshape(new).permute(perm)
    tag = tracer.tag(y)
    if isinstance(tag, Batched):
        assert torch.equal(_owners(y.shape, tag), owner), (shape, d, new, perm, tag)
        assert torch.equal(per_sample(owner, tag), torch.arange(n).view(-1, *[1] * y.dim()).expand(n, *per_sample(owner, tag).shape[1:]))
    else:
        assert isinstance(tag, Unknown)
        if n > 1:
            for e in range(y.dim()):
                for inner in range(1, y.shape[e] + 1):
                    if y.shape[e] % (n * inner) == 0:
                        assert not torch.equal(_owners(y.shape, Batched(e, n, inner)), owner)


def test_merged_sample_dims_round_trip():
    x = torch.randn(4, 3, 5)
    tracer, out = _trace(lambda t: t.reshape(12, 5), x)
    assert tracer.tag(out) == Batched(0, 4, 3)
    tracer, out = _trace(lambda t: t.transpose(0, 1).reshape(12, 5), x)  # [T·B] rows, as in attention
    assert tracer.tag(out) == Batched(0, 4, 1)
    tracer, out = _trace(lambda t: t.reshape(12, 5).view(4, 3, 5).sum(1), x)
    assert tracer.tag(out) == Batched(0, 4, 1)


@pytest.mark.parametrize("fn, why", [
    (lambda t: t.sum(), "every dim"),
    (lambda t: t.mean(0), "sample dim"),
    (lambda t: t[1:], "slice"),
    (lambda t: t.softmax(0), "along the sample dim"),
    (lambda t: t.reshape(2, -1), "splits the samples"),
    (lambda t: torch.cat([t, t], 0), "along the sample dim"),
    (lambda t: t.T @ t, "contracts over the sample dim"),
])
def test_ops_that_mix_samples_are_unknown(fn, why):
    tracer, out = _trace(fn, torch.randn(4, 4))
    tag = tracer.tag(out)
    assert isinstance(tag, Unknown) and why in tag.why, tag


def test_tensors_from_python_or_numpy_data_are_unknown_never_shared():
    x = torch.randn(3, 4)
    tracer, out = _trace(lambda t: torch.tensor(t.tolist()) + 0, x)
    assert isinstance(tracer.tag(out), Unknown)
    tracer, out = _trace(lambda t: torch.from_numpy(np.asarray(t.tolist())) * 2, x)
    assert isinstance(tracer.tag(out), Unknown)
    tracer, out = _trace(lambda t: torch.arange(t.shape[1]) * 2.0, x)  # a factory: shared
    assert tracer.tag(out) == Shared()


def test_shared_tables_keep_their_parameters_and_meet_the_batch():
    x = torch.randn(4, 4, 5)  # B == T == 4
    table = torch.nn.Parameter(torch.randn(4, 5))
    tracer, out = _trace(lambda t: F.embedding(torch.arange(4), table), x, params=[table])
    assert tracer.tag(out) == Shared(frozenset({"p0"}))
    tracer, out = _trace(lambda t: t + F.embedding(torch.arange(4), table), x, params=[table])
    assert tracer.tag(out) == Batched(0, 4, 1)


def test_a_shared_tensor_varying_along_the_samples_makes_the_result_position_dependent():
    x = torch.randn(4, 5)
    varying = torch.nn.Parameter(torch.randn(4, 5))  # 4 rows, like the batch
    tracer, out = _trace(lambda t: t * varying, x)
    assert "position in the batch" in tracer.tag(out).why
    tracer, out = _trace(lambda t: t * torch.zeros(1, 5).expand(4, 5), x)  # constant along the samples
    assert tracer.tag(out) == Batched(0, 4, 1)


def test_index_by_arange_of_the_batch_is_proven_by_value():
    mask = torch.ones(4, 6, dtype=torch.bool)  # as Hugging Face builds attention masks

    def index(t, flip=False):
        b, k = torch.arange(4)[:, None, None, None], torch.arange(6)[None, None, None, :]
        return t[b.flip(0) if flip else b, k]

    tracer, out = _trace(index, mask)
    assert tracer.tag(out) == Batched(0, 4, 1)
    tracer, out = _trace(lambda t: index(t, flip=True), mask)  # a permutation is not the identity
    assert isinstance(tracer.tag(out), Unknown)


def test_in_place_writes_make_only_overlapping_older_views_unknown():
    x = torch.randn(4, 6)

    def fn(t):
        buf = torch.zeros(4, 12)
        left, right = buf[:, :6], buf[:, 6:]
        left.add_(t)  # batch data into a shared buffer
        return buf, left, right

    tracer, (buf, left, right) = _trace(fn, x)
    assert isinstance(tracer.tag(buf), Unknown)  # an older view that overlaps the write
    assert tracer.tag(left) == Batched(0, 4, 1)  # the written view itself
    assert tracer.tag(right) == Shared()  # untouched by the write


def test_sequence_first_layout_with_T_equal_to_B():
    x = torch.randn(4, 4, 5)  # [B, T, F] with B == T
    tracer, out = _trace(lambda t: t.transpose(0, 1), x)
    assert tracer.tag(out) == Batched(1, 4, 1)
    tracer, out = _trace(lambda t: t.transpose(0, 1).mean(0), x)
    assert tracer.tag(out) == Batched(0, 4, 1)
