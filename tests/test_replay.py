"""ReplayBuffer: budget, reservoir uniformity (chi-square), class quotas, state round trip, mixing ratio."""
import itertools
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastcl
from fastcl.replay import MixedBatchSampler, ReplayBuffer

scipy_stats = pytest.importorskip("scipy.stats")

ALPHA = 1e-3  # significance level of the statistical tests (fixed seeds: each outcome is deterministic)


def _stream(n, classes=None):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(n) if classes is None else classes
    return x, y


def _feed(buffer, x, y, batch):
    for s in range(0, len(y), batch):
        buffer.add(x[s : s + batch], y[s : s + batch])


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_budget_is_respected(policy, batch):
    cap = 13
    buffer = ReplayBuffer(cap, policy=policy, seed=0)
    x, y = _stream(200, torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(1)))
    for s in range(0, 200, batch):
        buffer.add(x[s : s + batch], y[s : s + batch])
        seen = min(s + batch, 200)
        assert buffer.num_seen == seen
        assert len(buffer) == min(cap, seen) and buffer.inputs.shape == (min(cap, seen), 1)
    stored = buffer.inputs.flatten().long()
    assert stored.unique().numel() == cap  # every stored sample is a distinct one of the stream
    assert torch.equal(y[stored], buffer.targets)  # inputs and targets stay paired
    assert buffer.inputs.device.type == "cpu"


def test_reservoir_is_uniform_over_the_stream():
    # N samples in batches of 7, capacity C, many independently seeded buffers: each sample's
    # inclusion count is Binomial(R, C/N); with the sum fixed at R·C the scaled sum of squares
    # Σ (o − e)² / (R p (1 − p) N / (N − 1)) is χ²(N − 1).
    n, cap, trials = 60, 6, 800
    counts = np.zeros(n)
    x, y = _stream(n)
    for t in range(trials):
        buffer = ReplayBuffer(cap, seed=t)
        _feed(buffer, x, y, 7)
        counts[buffer.targets.numpy()] += 1
    p = cap / n
    stat = ((counts - trials * p) ** 2).sum() / (trials * p * (1 - p) * n / (n - 1))
    assert scipy_stats.chi2.sf(stat, n - 1) > ALPHA, stat
    # early and late halves of the stream are kept equally often
    assert abs(counts[: n // 2].sum() - counts[n // 2 :].sum()) < 4 * math.sqrt(trials * cap)


@pytest.mark.parametrize("batch", [1, 3])
def test_reservoir_draws_every_subset_equally(batch):
    # 5 samples, capacity 2: each of the 10 pairs must come out with probability 1/10
    trials = 1500
    subsets = {s: i for i, s in enumerate(itertools.combinations(range(5), 2))}
    counts = np.zeros(len(subsets))
    x, y = _stream(5)
    for t in range(trials):
        buffer = ReplayBuffer(2, seed=t)
        _feed(buffer, x, y, batch)
        counts[subsets[tuple(sorted(buffer.targets.tolist()))]] += 1
    assert scipy_stats.chisquare(counts).pvalue > ALPHA, counts


def test_class_balanced_quotas():
    # an imbalanced stream: 600 / 60 / 8 / 3 samples of classes 7, 2, 9, 4, interleaved at random
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in ((7, 600), (2, 60), (9, 8), (4, 3))])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    cap = 40
    buffer = ReplayBuffer(cap, policy="class_balanced", seed=0)
    _feed(buffer, torch.arange(labels.numel(), dtype=torch.float32).unsqueeze(1), labels, 16)
    counts = buffer.class_counts()
    assert sum(counts.values()) == cap
    assert counts[4] == 3 and counts[9] == 8  # rare classes keep every sample
    assert abs(counts[7] - counts[2]) <= 1 and counts[7] + counts[2] == cap - 11  # the rest is shared equally
    # the same stream through a plain reservoir leaves the rare classes about 1 % of the memory
    plain = ReplayBuffer(cap, seed=0)
    _feed(plain, torch.zeros(labels.numel(), 1), labels, 16)
    assert plain.class_counts().get(4, 0) + plain.class_counts().get(9, 0) < 11


def test_class_balanced_equal_shares_and_uniform_within_class():
    # 4 classes of 50 samples each in random order, capacity 20: 5 per class, each sample of a
    # class equally likely (χ² over the 50 samples of class 0, pooled over seeded trials)
    trials, per_class = 250, 50
    counts = np.zeros(per_class)
    for t in range(trials):
        g = torch.Generator().manual_seed(10_000 + t)
        labels = torch.arange(4).repeat_interleave(per_class)[torch.randperm(4 * per_class, generator=g)]
        ids = torch.zeros_like(labels)
        for c in range(4):
            ids[labels == c] = torch.arange(per_class)
        buffer = ReplayBuffer(20, policy="class_balanced", seed=t)
        _feed(buffer, ids.float().unsqueeze(1), labels, 25)
        assert buffer.class_counts() == {0: 5, 1: 5, 2: 5, 3: 5}
        counts[buffer.inputs[buffer.targets == 0].flatten().long().numpy()] += 1
    assert scipy_stats.chisquare(counts).pvalue > ALPHA, counts


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_state_round_trip_resumes_identically(policy):
    x = torch.randn(300, 2, 3)
    y = torch.randint(0, 6, (300,), generator=torch.Generator().manual_seed(2))
    a = ReplayBuffer(25, policy=policy, seed=4)
    _feed(a, x[:140], y[:140], 9)
    state = a.state_dict()
    b = ReplayBuffer(25, policy=policy, seed=999)
    b.load_state_dict(state)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and b.num_seen == 140
    _feed(a, x[140:], y[140:], 9)
    _feed(b, x[140:], y[140:], 9)  # the generator state travelled too: same choices from here on
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    # the state holds copies: later adds do not reach a saved state
    assert state["inputs"].shape[0] == 25 and not torch.equal(state["inputs"], a.inputs)


def test_bad_state_changes_nothing():
    buffer = ReplayBuffer(5, policy="class_balanced", seed=0)
    buffer.add(torch.randn(8, 2), torch.tensor([0, 1, 0, 1, 2, 2, 0, 1]))
    good = buffer.state_dict()
    before = (buffer.inputs.clone(), buffer.targets.clone(), buffer.num_seen)
    bad_states = [
        (None, TypeError),
        ({}, ValueError),
        ({**good, "capacity": 6}, ValueError),
        ({**good, "policy": "reservoir"}, ValueError),
        ({**good, "num_seen": 3}, ValueError),
        ({**good, "inputs": good["inputs"][:3]}, ValueError),
        ({**good, "seen_per_class": {0: 1, 1: 1, 2: 6}}, ValueError),  # stores 2+ of class 0 but saw 1
        ({**good, "generator": torch.zeros(3)}, ValueError),
        ({**good, "targets": good["targets"].float()}, ValueError),
    ]
    for state, error in bad_states:
        with pytest.raises(error):
            buffer.load_state_dict(state)
        assert torch.equal(buffer.inputs, before[0]) and torch.equal(buffer.targets, before[1]) and buffer.num_seen == before[2]


def test_bad_inputs_name_the_parameter():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0)
    with pytest.raises(TypeError, match="capacity"):
        ReplayBuffer(2.5)
    with pytest.raises(ValueError, match="policy"):
        ReplayBuffer(3, policy="fifo")
    buffer = ReplayBuffer(3, policy="class_balanced")
    with pytest.raises(ValueError, match="class labels"):
        buffer.add(torch.randn(2, 3), torch.randn(2))
    with pytest.raises(ValueError, match="number of samples"):
        buffer.add(torch.randn(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="inputs"):
        buffer.add([1, 2], torch.tensor([0, 1]))
    buffer.add(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        buffer.add(torch.randn(2, 4), torch.tensor([0, 1]))  # atomic: nothing added
    assert buffer.num_seen == 2 and len(buffer) == 2
    with pytest.raises(ValueError, match="n must be"):
        buffer.sample(3)
    with pytest.raises(ValueError, match="replay_fraction"):
        MixedBatchSampler(10, 5, batch_size=4, replay_fraction=1.0)
    with pytest.raises(ValueError, match="no room"):
        MixedBatchSampler(10, 5, batch_size=1, replay_fraction=0.6)


@pytest.mark.parametrize("fraction,batch_size", [(0.25, 32), (0.5, 10), (0.1, 7)])
def test_mixing_ratio(fraction, batch_size):
    buffer = ReplayBuffer(30, seed=0)
    buffer.add(torch.randn(50, 4), -1 - torch.arange(50))  # replayed samples have negative labels
    new = TensorDataset(torch.randn(101, 4), torch.arange(101))
    loader = buffer.mixed_loader(new, batch_size=batch_size, replay_fraction=fraction,
                                 generator=torch.Generator().manual_seed(0))
    k = round(batch_size * fraction)
    batches = list(loader)
    assert len(batches) == len(loader) == math.ceil(101 / (batch_size - k))
    new_seen, replayed = [], []
    for x, y in batches[:-1]:
        assert x.shape == (batch_size, 4)
        assert (y < 0).sum() == k  # exactly the chosen share of replay in every full batch
        assert (y[: batch_size - k] >= 0).all()  # new samples first
        new_seen += y[y >= 0].tolist()
        replayed += y[y < 0].tolist()
    x, y = batches[-1]
    m = int((y >= 0).sum())
    assert int((y < 0).sum()) == round(m * k / (batch_size - k))
    new_seen += y[y >= 0].tolist()
    assert sorted(new_seen) == list(range(101))  # one epoch = every new sample exactly once
    stored = set((-1 - buffer.targets).tolist())
    assert {-1 - v for v in replayed} <= stored
    # without replacement, cycling: no replayed sample is used twice before all 30 were used once
    first = replayed[:30]
    assert len(set(first)) == len(first)


def test_empty_buffer_gives_plain_batches_and_any_loop_can_use_the_sampler():
    new = TensorDataset(torch.randn(20, 3), torch.arange(20))
    loader = ReplayBuffer(5).mixed_loader(new, batch_size=8, replay_fraction=0.5, shuffle=False)
    assert [y.tolist() for _, y in loader] == [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]
    # the sampler on its own, with a DataLoader the user builds
    sampler = MixedBatchSampler(20, 6, batch_size=5, replay_fraction=0.4, generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.ConcatDataset([new, TensorDataset(torch.randn(6, 3), torch.full((6,), -1))])
    sizes = [int((y < 0).sum()) for _, y in DataLoader(data, batch_sampler=sampler)]
    assert sizes[:-1] == [2] * (len(sizes) - 1)


def test_replay_composes_with_a_regularizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ewc = fastcl.EWC(model, strength=1.0)
    buffer = ReplayBuffer(16, policy="class_balanced", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for task in range(2):
        data = TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
        for x, y in buffer.mixed_loader(data, batch_size=8, replay_fraction=0.25):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            ewc.add_penalty_grad_()
            opt.step()
        ewc.consolidate(DataLoader(data, batch_size=20), verbose=False)
        buffer.add(*data.tensors)
    assert len(buffer) == 16 and ewc.consolidated
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _state_snapshot(buffer):
    return (buffer.inputs.clone(), buffer.targets.clone(), buffer.num_seen, len(buffer), buffer._generator.get_state().clone())


def _same(a, b):
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def test_memory_follows_the_contents_not_the_budget():
    """capacity=10**12 used to allocate capacity x sample size on the first add (an out-of-memory abort)."""
    buffer = ReplayBuffer(10**12, seed=0)
    x = torch.randn(5, 1000)
    buffer.add(x, torch.arange(5))
    buffer.add(x[:3] + 1, torch.arange(3))
    assert len(buffer) == 8 and buffer._inputs.shape[0] < 100
    assert torch.equal(buffer.inputs, torch.cat([x, x[:3] + 1]))
    # growing is invisible to the policy: same contents as a buffer whose storage never grows
    small, big = ReplayBuffer(6, seed=3), ReplayBuffer(6, seed=3)
    big._reserve(6, x, torch.arange(5))
    for b in (small, big):
        for s in range(0, 40, 3):
            b.add(torch.arange(s, s + 3, dtype=torch.float32).unsqueeze(1).expand(3, 1000), torch.arange(3))
    assert torch.equal(small.inputs, big.inputs) and small.num_seen == big.num_seen == 42


@pytest.mark.parametrize("seed,error", [(10**30, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("0", TypeError)])
def test_seed_checked(seed, error):
    with pytest.raises(error, match="seed"):
        ReplayBuffer(3, seed=seed)


def test_numpy_and_tensor_scalars_accepted():
    a, b = ReplayBuffer(np.int64(4), seed=np.int64(7)), ReplayBuffer(torch.tensor(4), seed=torch.tensor(7))
    for buffer in (a, b):
        buffer.add(torch.arange(10, dtype=torch.float32).unsqueeze(1), torch.arange(10))
        assert buffer.capacity == 4 and type(buffer.capacity) is int
    assert torch.equal(a.inputs, b.inputs)
    assert a.sample(np.int64(2))[0].shape == (2, 1) and a.sample(torch.tensor(2))[0].shape == (2, 1)


def test_sample_zero_from_an_empty_buffer_and_generator_checked():
    x, y = ReplayBuffer(3).sample(0)
    assert x.numel() == 0 and y.numel() == 0
    buffer = ReplayBuffer(3, seed=0)
    buffer.add(torch.randn(2, 2), torch.tensor([0, 1]))
    before = _state_snapshot(buffer)
    with pytest.raises(TypeError, match="generator"):
        buffer.sample(1, generator=5)
    assert _same(before, _state_snapshot(buffer))


def test_class_balanced_refuses_negative_labels_and_changes_nothing():
    buffer = ReplayBuffer(4, policy="class_balanced", seed=0)
    buffer.add(torch.randn(3, 2), torch.tensor([0, 1, 1]))
    before = _state_snapshot(buffer)
    with pytest.raises(ValueError, match="class ids >= 0"):
        buffer.add(torch.randn(2, 2), torch.tensor([2, -100]))
    assert _same(before, _state_snapshot(buffer)) and buffer.class_counts() == {0: 1, 1: 2}


@pytest.mark.parametrize("kwargs,error,match", [
    ({"shuffle": "yes"}, TypeError, "shuffle"),
    ({"drop_last": None}, TypeError, "drop_last"),
    ({"generator": 5}, TypeError, "generator"),
    ({"sampler": None}, TypeError, "sampler"),
    ({"batch_sampler": None}, TypeError, "batch_sampler"),
    ({"new_data": TensorDataset(torch.randn(0, 2), torch.zeros(0, dtype=torch.long))}, ValueError, "new_data is empty"),
    ({"batch_size": True}, TypeError, "batch_size"),
    ({"replay_fraction": float("nan")}, ValueError, "replay_fraction"),
])
def test_mixed_loader_checks_every_argument(kwargs, error, match):
    buffer = ReplayBuffer(4, seed=0)
    buffer.add(torch.randn(4, 2), torch.arange(4))
    before = _state_snapshot(buffer)
    call = {"new_data": TensorDataset(torch.randn(10, 2), torch.arange(10)), "batch_size": 4, "replay_fraction": 0.25, **kwargs}
    with pytest.raises(error, match=match):
        buffer.mixed_loader(**call)
    assert _same(before, _state_snapshot(buffer))


def test_mixed_loader_passes_sampler_and_loader_options():
    buffer = ReplayBuffer(4, seed=0)
    buffer.add(torch.full((4, 1), -1.0), torch.zeros(4, dtype=torch.long))
    new = TensorDataset(torch.arange(10, dtype=torch.float32).unsqueeze(1), torch.ones(10, dtype=torch.long))
    loader = buffer.mixed_loader(new, batch_size=4, replay_fraction=0.25, shuffle=False, drop_last=True,
                                 generator=torch.Generator().manual_seed(0), collate_fn=lambda items: len(items))
    assert list(loader) == [4, 4, 4]  # 10 new, 3 per batch, last partial batch dropped; collate_fn reached DataLoader
    first = next(iter(buffer.mixed_loader(new, batch_size=4, replay_fraction=0.25, shuffle=False)))
    assert first[0][:3, 0].tolist() == [0.0, 1.0, 2.0] and first[0][3, 0] == -1.0


@pytest.mark.parametrize("full_classes", [5, "ab", ["a"], {0: 1}])
def test_bad_full_classes_named_and_nothing_changes(full_classes):
    buffer = ReplayBuffer(5, policy="class_balanced", seed=0)
    buffer.add(torch.randn(8, 2), torch.tensor([0, 1, 0, 1, 2, 2, 0, 1]))
    before = _state_snapshot(buffer)
    with pytest.raises(TypeError, match="full_classes"):
        buffer.load_state_dict({**buffer.state_dict(), "full_classes": full_classes})
    assert _same(before, _state_snapshot(buffer))
