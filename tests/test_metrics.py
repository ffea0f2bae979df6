"""AccuracyMatrix against direct float64 evaluations of the published formulas."""
import json
import math

import numpy as np
import pytest
import torch

from fastcl.metrics import AccuracyMatrix


def _filled(r: np.ndarray) -> AccuracyMatrix:
    m = AccuracyMatrix(r.shape[0])
    for i in range(r.shape[0]):
        for j in range(r.shape[1]):
            m.record(i, j, float(r[i, j]))
    return m


def _reference(r: np.ndarray, baseline: np.ndarray):
    """Vectorised float64 formulas (Chaudhry et al. 2018; Lopez-Paz & Ranzato 2017)."""
    t = r.shape[0]
    avg = r[-1].mean()
    old = np.arange(t - 1)
    # max over i in [j, T-2] of R[i, j]: mask the strictly-upper part (i < j) with -inf
    lower = np.where(np.tril(np.ones((t - 1, t - 1), bool)), r[: t - 1, : t - 1], -np.inf)
    forgetting = (lower.max(axis=0) - r[-1, old]).mean()
    bwt = (r[-1, old] - np.diag(r)[old]).mean()
    fwt = (np.diag(r, k=1) - baseline[1:]).mean()
    return avg, forgetting, bwt, fwt


@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_reference(num_tasks, seed):
    rng = np.random.default_rng(seed)
    r = rng.uniform(0, 1, size=(num_tasks, num_tasks))
    baseline = rng.uniform(0, 1, size=num_tasks)
    m = _filled(r)
    avg, fgt, bwt, fwt = _reference(r, baseline)
    assert m.average_accuracy() == pytest.approx(avg, abs=1e-12)
    assert m.forgetting() == pytest.approx(fgt, abs=1e-12)
    assert m.backward_transfer() == pytest.approx(bwt, abs=1e-12)
    assert m.forward_transfer(baseline) == pytest.approx(fwt, abs=1e-12)
    for i in range(num_tasks):
        assert m.average_accuracy(i) == pytest.approx(r[i, : i + 1].mean(), abs=1e-12)
    np.testing.assert_array_equal(m.as_array(), r)


def test_hand_computed_example():
    r = np.array([[0.9, 0.1, 0.0], [0.6, 0.8, 0.2], [0.7, 0.5, 0.95]])
    m = _filled(r)
    assert m.average_accuracy() == pytest.approx((0.7 + 0.5 + 0.95) / 3)
    # task 0: best of R[0,0]=0.9, R[1,0]=0.6 -> 0.9 - 0.7; task 1: R[1,1]=0.8 - 0.5
    assert m.forgetting() == pytest.approx(((0.9 - 0.7) + (0.8 - 0.5)) / 2)
    assert m.backward_transfer() == pytest.approx(((0.7 - 0.9) + (0.5 - 0.8)) / 2)
    assert m.forward_transfer([0.0, 0.1, 0.1]) == pytest.approx(((0.1 - 0.1) + (0.2 - 0.1)) / 2)


def test_partial_matrix_uses_last_recorded_row():
    m = AccuracyMatrix(4)
    for i, row in enumerate([[0.9], [0.5, 0.8]]):
        for j, acc in enumerate(row):
            m.record(i, j, acc)
    assert m.last_task == 1
    assert m.average_accuracy() == pytest.approx(0.65)
    assert m.forgetting() == pytest.approx(0.4)
    assert np.isnan(m.as_array()[2:]).all()


def test_missing_entry_is_named():
    m = AccuracyMatrix(3)
    m.record(0, 0, 0.9)
    m.record(2, 0, 0.5)
    m.record(2, 1, 0.5)
    m.record(2, 2, 0.5)
    with pytest.raises(ValueError, match="after task 1 on task 1"):
        m.backward_transfer()


@pytest.mark.parametrize("metric", ["forgetting", "backward_transfer"])
def test_single_task_metrics_raise(metric):
    m = AccuracyMatrix(3)
    m.record(0, 0, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        getattr(m, metric)()


def test_empty_matrix_raises():
    with pytest.raises(ValueError, match="empty"):
        AccuracyMatrix(2).average_accuracy()


@pytest.mark.parametrize("acc", [-0.01, 1.01, math.nan, math.inf])
def test_record_rejects_bad_accuracy(acc):
    with pytest.raises(ValueError, match="accuracy"):
        AccuracyMatrix(2).record(0, 0, acc)


@pytest.mark.parametrize("i,j", [(-1, 0), (0, 2), (2, 0)])
def test_record_rejects_bad_index(i, j):
    with pytest.raises(ValueError, match=r"(after|on)_task must be an int >= 0 and <= 1"):
        AccuracyMatrix(2).record(i, j, 0.5)


def test_record_rejects_non_int_index():
    with pytest.raises(TypeError, match="after_task"):
        AccuracyMatrix(2).record(0.0, 0, 0.5)


@pytest.mark.parametrize("n,error", [(0, ValueError), (-1, ValueError), (2**40, ValueError), (2.0, TypeError), (True, TypeError),
                                     ("3", TypeError), (torch.tensor(2.0), TypeError)])
def test_num_tasks_validated(n, error):
    with pytest.raises(error, match="num_tasks"):
        AccuracyMatrix(n)


@pytest.mark.parametrize("scalar", [np.int64(2), torch.tensor(2), torch.tensor(2, dtype=torch.int32)])
def test_numpy_and_tensor_integers_accepted(scalar):
    m = AccuracyMatrix(scalar)
    assert m.num_tasks == 2 and type(m.num_tasks) is int
    m.record(scalar - 1, np.int64(0), np.float32(0.5))
    m.record(torch.tensor(1), torch.tensor(1), torch.tensor(0.25))
    np.testing.assert_array_equal(m.as_array()[1], [0.5, 0.25])
    assert m.average_accuracy(torch.tensor(1)) == pytest.approx(0.375)


@pytest.mark.parametrize("acc,error", [(True, TypeError), (np.bool_(False), TypeError), ("0.5", TypeError), (None, TypeError),
                                       (torch.tensor([0.5]), TypeError), (1.0 + 0j, TypeError)])
def test_record_rejects_non_numbers_and_changes_nothing(acc, error):
    m = AccuracyMatrix(2)
    m.record(0, 0, 0.75)
    with pytest.raises(error, match="accuracy"):
        m.record(0, 0, acc)
    assert m[0, 0] == 0.75


@pytest.mark.parametrize("baseline,error", [("abc", TypeError), ([0.1, 2.0, 0.1], ValueError), ([0.1, -0.5, 0.1], ValueError),
                                            ([0.1, math.nan, 0.1], ValueError), ([[0.1, 0.1, 0.1]], ValueError)])
def test_forward_transfer_baseline_values(baseline, error):
    m = _filled(np.full((3, 3), 0.5))
    with pytest.raises(error, match="baseline"):
        m.forward_transfer(baseline)


def test_forward_transfer_baseline_shape():
    m = _filled(np.full((3, 3), 0.5))
    with pytest.raises(ValueError, match="baseline"):
        m.forward_transfer([0.1, 0.1])


def test_to_dict_is_json_ready_and_repr():
    m = AccuracyMatrix(2)
    m.record(0, 0, 0.75)
    d = json.loads(json.dumps(m.to_dict()))
    assert d["accuracy_matrix"] == [[0.75, None], [None, None]]
    assert d["average_accuracy"] == 0.75 and d["forgetting"] is None
    assert "0.750" in repr(m) and "num_tasks=2" in repr(m)
