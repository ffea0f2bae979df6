"""Class weights and the class-balanced sampler."""
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from fastcl.data import balanced_sampler, class_counts, class_weights


def _labels(seed, n=257, k=7):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(k))  # imbalanced
    y = rng.choice(k, size=n, p=p)
    y[:k] = np.arange(k)  # every class present
    return y


def _as(kind, y):
    return {"list": [int(v) for v in y], "numpy": y.astype(np.int32), "tensor": torch.from_numpy(y)}[kind]


@pytest.mark.parametrize("kind", ["list", "numpy", "tensor"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inverse_weights(kind, seed):
    y = _labels(seed)
    w = class_weights(_as(kind, y))
    counts = np.bincount(y).astype(np.float64)
    expected = len(y) / (len(counts) * counts)
    assert w.dtype == torch.float32 and w.shape == (7,)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.9, 0.99, 0.9999])
@pytest.mark.parametrize("seed", [0, 3])
def test_effective_number_weights(beta, seed):
    y = _labels(seed)
    w = class_weights(torch.from_numpy(y), scheme="effective", beta=beta)
    counts = np.bincount(y).astype(np.float64)
    raw = np.array([(1 - beta) / (1 - beta**n) for n in counts])
    np.testing.assert_allclose(w.numpy(), raw / raw.sum() * len(counts), rtol=1e-5)
    assert float(w.sum()) == pytest.approx(7.0, rel=1e-6)


def test_balanced_labels_give_unit_weights():
    y = np.repeat(np.arange(5), 9)
    for scheme in ("inverse", "effective"):
        torch.testing.assert_close(class_weights(y, scheme=scheme), torch.ones(5))


@pytest.mark.parametrize("scheme", ["inverse", "effective"])
def test_empty_class_gets_max_weight_with_warning(scheme):
    y = [0, 0, 0, 1, 3, 3]
    with pytest.warns(UserWarning, match=r"\[2, 4\]"):
        w = class_weights(y, num_classes=5, scheme=scheme, beta=0.5)
    assert torch.isfinite(w).all()
    assert float(w[2]) == float(w[4]) == pytest.approx(float(w[[0, 1, 3]].max()))
    if scheme == "effective":
        assert float(w.sum()) == pytest.approx(5.0, rel=1e-6)


def test_no_warning_when_all_present():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        class_weights([0, 1, 1, 2], num_classes=3)


@pytest.mark.parametrize(
    "labels,kwargs,exc,match",
    [
        ([0.0, 1.0], {}, TypeError, "ints"),
        (np.array([0.5, 1.0]), {}, TypeError, "integers"),
        (torch.tensor([0.0, 1.0]), {}, TypeError, "integers"),
        (torch.tensor([[0, 1]]), {}, ValueError, "1-D"),
        ([0, -1], {}, ValueError, "non-negative"),
        ([], {}, ValueError, "empty"),
        ([0, 4], {"num_classes": 3}, ValueError, "num_classes"),
        ([0, 1], {"scheme": "sqrt"}, ValueError, "scheme"),
        ([0, 1], {"scheme": "effective", "beta": 1.0}, ValueError, "beta"),
        ("01", {}, TypeError, "labels"),
        ([True, False], {}, TypeError, "ints"),
    ],
)
def test_validation(labels, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        class_weights(labels, **kwargs)


def test_class_counts():
    assert class_counts([2, 2, 0], num_classes=4).tolist() == [1, 0, 2, 0]


def test_balanced_sampler_weights_and_uniform_classes():
    y = np.array([0] * 90 + [1] * 9 + [2] * 1)
    sampler = balanced_sampler(y, num_samples=30000, generator=torch.Generator().manual_seed(0))
    assert isinstance(sampler, WeightedRandomSampler)
    expected = np.concatenate([np.full(90, 1 / 90), np.full(9, 1 / 9), [1.0]])
    np.testing.assert_allclose(sampler.weights.numpy(), expected, rtol=1e-12)
    drawn = y[np.fromiter(iter(sampler), dtype=np.int64)]
    freq = np.bincount(drawn, minlength=3) / len(drawn)
    # 30000 draws: the standard error of each frequency is < 0.003
    np.testing.assert_allclose(freq, [1 / 3] * 3, atol=0.015)


def test_balanced_sampler_options():
    y = torch.tensor([0, 0, 0, 1])
    assert len(balanced_sampler(y)) == 4
    s = balanced_sampler(y, num_samples=3, replacement=False, generator=torch.Generator().manual_seed(1))
    idx = list(s)
    assert len(set(idx)) == 3
    with pytest.raises(ValueError, match="replacement"):
        balanced_sampler(y, num_samples=5, replacement=False)
    with pytest.raises(ValueError, match="num_samples"):
        balanced_sampler(y, num_samples=0)


def test_sparse_class_ids_are_refused_without_allocating_by_the_largest_label():
    """Issue 14.11: label 10⁹ used to allocate 10⁹ counts (the process was killed)."""
    for call in (lambda: class_weights([0, 10**9]), lambda: class_counts(np.array([3, 10**9]))):
        with pytest.raises(ValueError, match="remap"):
            call()
    with pytest.raises(ValueError, match="num_classes"):
        class_weights([0, 1], num_classes=10**9)


def test_balanced_sampler_takes_any_class_ids():
    y = torch.tensor([10**9, 7, 10**9, 10**12])
    np.testing.assert_allclose(balanced_sampler(y).weights.numpy(), [0.5, 1.0, 0.5, 1.0], rtol=1e-12)


def test_numpy_and_tensor_scalars_as_options():
    y = [0, 0, 1, 2, 2, 3]
    expected = class_weights(y, num_classes=4, scheme="effective", beta=0.9)
    got = class_weights(y, num_classes=np.int64(4), scheme="effective", beta=np.float32(0.9))
    torch.testing.assert_close(got, expected)
    assert len(balanced_sampler(y, num_samples=torch.tensor(3))) == 3
    for kwargs, error in [({"num_classes": 4.0}, TypeError), ({"num_classes": True}, TypeError),
                          ({"scheme": "effective", "beta": float("nan")}, ValueError), ({"scheme": "effective", "beta": "0.9"}, TypeError)]:
        with pytest.raises(error):
            class_weights(y, **kwargs)


def test_many_empty_classes_give_a_short_warning():
    with pytest.warns(UserWarning, match=r"\[1, 2, 3, 4, 5, 6, 7, 8, 9, 10\] and 989 more"):
        class_weights([0, 1000])


@pytest.mark.parametrize("kwargs,error,match", [
    ({"generator": 5}, TypeError, "generator"), ({"generator": "seed"}, TypeError, "generator"),
    ({"num_samples": 10**30}, ValueError, "num_samples"), ({"num_samples": np.float64(3)}, TypeError, "num_samples"),
])
def test_balanced_sampler_arguments_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        balanced_sampler([0, 1, 1], **kwargs)


def test_balanced_sampler_numpy_and_tensor_counts():
    for n in (np.int64(5), torch.tensor(5)):
        assert len(balanced_sampler([0, 1, 1], n)) == 5


@pytest.mark.parametrize("beta,error", [("x", TypeError), (1.5, ValueError), (True, TypeError)])
def test_class_weights_checks_beta_for_every_scheme(beta, error):
    with pytest.raises(error, match="beta"):
        class_weights([0, 1, 1], scheme="inverse", beta=beta)
