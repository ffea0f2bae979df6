"""Split / permuted scenarios and the bundled digits."""
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from fastcl.scenarios import Task, load_digits, permuted, split


def _data(n=97, d=13, classes=6, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if shape is not None:
        x = x.reshape(n, *shape)
    y = torch.randint(0, classes, (n,), generator=g)
    y[:classes] = torch.arange(classes)  # every class present
    return x, y


class _PairDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("classes_per_task", [1, 2, 3, 6])
def test_split_partitions_classes_and_samples(classes_per_task):
    x, y = _data()
    xt, yt = _data(n=41, seed=1)
    tasks = split((x, y), classes_per_task, test=(xt, yt))
    assert len(tasks) == 6 // classes_per_task
    seen = []
    for t, task in enumerate(tasks):
        assert isinstance(task, Task) and task.task_id == t
        assert len(task.classes) == classes_per_task
        assert task.classes == tuple(range(t * classes_per_task, (t + 1) * classes_per_task))
        seen += task.classes
        for (xs, ys), (x_all, y_all) in ((task.train.tensors, (x, y)), (task.test.tensors, (xt, yt))):
            keep = [i for i in range(len(y_all)) if int(y_all[i]) in task.classes]
            torch.testing.assert_close(xs, x_all[keep], rtol=0, atol=0)
            torch.testing.assert_close(ys, y_all[keep], rtol=0, atol=0)
    assert sorted(seen) == list(range(6))
    assert sum(len(t.train) for t in tasks) == len(y)


def test_split_class_order_and_seed():
    x, y = _data()
    tasks = split((x, y), 2, class_order=[5, 0, 3, 1, 4, 2])
    assert [t.classes for t in tasks] == [(5, 0), (3, 1), (4, 2)]
    a = [t.classes for t in split((x, y), 2, seed=3)]
    b = [t.classes for t in split((x, y), 2, seed=3)]
    assert a == b and sorted(c for pair in a for c in pair) == list(range(6))


def test_split_accepts_a_dataset_like_tensors():
    x, y = _data()
    from_tensors = split((x, y), 3)
    from_dataset = split(_PairDataset(x, y), 3)
    for a, b in zip(from_tensors, from_dataset):
        torch.testing.assert_close(a.train.tensors[0], b.train.tensors[0])
        assert torch.equal(a.train.tensors[1], b.train.tensors[1])
    assert split(TensorDataset(x, y), 3)[1].classes == (3, 4, 5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"classes_per_task": 4}, "does not divide"),
        ({"classes_per_task": 0}, "classes_per_task"),
        ({"classes_per_task": 2, "class_order": [0, 1, 2]}, "class_order"),
    ],
)
def test_split_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        split(_data(), **kwargs)


def test_bad_inputs():
    x, y = _data()
    with pytest.raises(TypeError, match="train"):
        split([1, 2, 3], 2)
    with pytest.raises(TypeError, match="integers"):
        split((x, y.float()), 2)
    with pytest.raises(ValueError, match="one label per sample"):
        split((x, y[:-1]), 2)


@pytest.mark.parametrize("shape", [None, (1, 13)])
def test_permuted_tasks(shape):
    x, y = _data(shape=shape)
    xt, yt = _data(n=29, seed=4, shape=shape)
    tasks = permuted((x, y), 4, test=(xt, yt), seed=7)
    assert len(tasks) == 4
    assert torch.equal(tasks[0].permutation, torch.arange(13))
    for task in tasks:
        perm = task.permutation
        assert sorted(perm.tolist()) == list(range(13))
        for (xs, ys), (x_all, y_all) in ((task.train.tensors, (x, y)), (task.test.tensors, (xt, yt))):
            assert xs.shape == x_all.shape
            expected = torch.stack([x_all.reshape(len(x_all), -1)[n, perm] for n in range(len(x_all))])
            torch.testing.assert_close(xs.reshape(len(xs), -1), expected, rtol=0, atol=0)
            assert torch.equal(ys, y_all)
    assert not torch.equal(tasks[1].permutation, tasks[2].permutation)
    again = permuted((x, y), 4, seed=7)
    other = permuted((x, y), 4, seed=8)
    assert all(torch.equal(a.permutation, b.permutation) for a, b in zip(tasks, again))
    assert not torch.equal(tasks[1].permutation, other[1].permutation)
    assert again[0].test is None


def test_permuted_errors():
    with pytest.raises(ValueError, match="num_tasks"):
        permuted(_data(), 0)
    with pytest.raises(ValueError, match="differ in size"):
        permuted(_data(), 2, test=_data(d=5))


def test_load_digits():
    (x, y), (xt, yt) = load_digits(test_fraction=0.25, seed=0)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape[1] == 64 and len(x) + len(xt) == 1797
    assert 0.0 <= float(torch.cat([x, xt]).min()) and float(torch.cat([x, xt]).max()) <= 1.0
    assert len(xt) == pytest.approx(0.25 * 1797, abs=10)
    # stratified: every class has ~25% of its samples in test
    for c in range(10):
        n_test, n_all = int((yt == c).sum()), int((yt == c).sum() + (y == c).sum())
        assert abs(n_test - 0.25 * n_all) <= 1
    (x2, y2), _ = load_digits(seed=0)
    (x3, _), _ = load_digits(seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    # train and test are disjoint sample sets of the original data (rows are exact multiples of 1/16)
    rows = {tuple((r * 16).round().int().tolist()) for r in x}
    assert sum(tuple((r * 16).round().int().tolist()) in rows for r in xt) < 10  # only exact duplicate images


@pytest.mark.parametrize("fraction,error", [(0, ValueError), (1, ValueError), (-0.5, ValueError), (float("nan"), ValueError),
                                            ("0.2", TypeError), (True, TypeError), (None, TypeError)])
def test_load_digits_fraction_validated(fraction, error):
    with pytest.raises(error, match="test_fraction"):
        load_digits(test_fraction=fraction)


def test_load_digits_numpy_and_tensor_scalars():
    (x, y), (xt, yt) = load_digits(test_fraction=0.25, seed=1)
    for fraction, seed in ((np.float32(0.25), np.int64(1)), (torch.tensor(0.25), torch.tensor(1))):
        (x2, y2), (xt2, yt2) = load_digits(test_fraction=fraction, seed=seed)
        assert torch.equal(x, x2) and torch.equal(yt, yt2)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"classes_per_task": 2.0}, TypeError, "classes_per_task"),
    ({"classes_per_task": True}, TypeError, "classes_per_task"),
    ({"classes_per_task": 2, "seed": -1}, ValueError, "seed"),
    ({"classes_per_task": 2, "seed": 1.5}, TypeError, "seed"),
    ({"classes_per_task": 2, "seed": "0"}, TypeError, "seed"),
    ({"classes_per_task": 2, "class_order": [0.5, 1, 2, 3, 4, 5]}, TypeError, "class_order"),
    ({"classes_per_task": 2, "class_order": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]}, TypeError, "class_order"),
    ({"classes_per_task": 2, "class_order": [True, False, 2, 3, 4, 5]}, TypeError, "class_order"),
    ({"classes_per_task": 2, "class_order": "012345"}, TypeError, "class_order"),
    ({"classes_per_task": 2, "class_order": 5}, TypeError, "class_order"),
])
def test_split_argument_types(kwargs, error, match):
    """Bools, floats and strings are not silently truncated to ints (a seed of 1.5 used to mean 1)."""
    with pytest.raises(error, match=match):
        split(_data(), **kwargs)


def test_split_numpy_and_tensor_arguments():
    x, y = _data()
    want = split((x, y), 2, seed=3)
    for cpt, seed in ((np.int64(2), np.int64(3)), (torch.tensor(2), torch.tensor(3))):
        got = split((x, y), cpt, seed=seed)
        assert [t.classes for t in got] == [t.classes for t in want]
    order = [5, 4, 3, 2, 1, 0]
    for given in (np.array(order), torch.tensor(order)):
        assert [t.classes for t in split((x, y), 2, class_order=given)] == [(5, 4), (3, 2), (1, 0)]


def test_split_test_set_checked():
    x, y = _data()
    with pytest.raises(ValueError, match="differ in size"):
        split((x, y), 2, test=(torch.randn(4, 5), y[:4]))
    with pytest.raises(ValueError, match=r"test holds classes \[9\]"):
        split((x, y), 2, test=(x[:3], torch.tensor([0, 1, 9])))


@pytest.mark.parametrize("n,error", [(2.0, TypeError), (True, TypeError), (10**9, ValueError), (np.int64(0), ValueError)])
def test_permuted_num_tasks_checked(n, error):
    with pytest.raises(error, match="num_tasks"):
        permuted(_data(), n)


def test_permuted_seed_checked_and_scalars_accepted():
    x, y = _data()
    with pytest.raises(TypeError, match="seed"):
        permuted((x, y), 2, seed=0.5)
    with pytest.raises(ValueError, match="seed"):
        permuted((x, y), 2, seed=-3)
    want = permuted((x, y), 2, seed=4)[1].permutation
    assert torch.equal(permuted((x, y), np.int64(2), seed=np.int64(4))[1].permutation, want)
    assert torch.equal(permuted((x, y), torch.tensor(2), seed=torch.tensor(4))[1].permutation, want)
