"""EWC and MAS under DistributedDataParallel: 2 gloo processes on CPU, each with its own share of the data.

Every rank must end up with the importance of ALL the data (sums and sample counts
all-reduced), the same penalty and gradients, equal to a single process on all the data.
"""
import pytest
import torch.distributed as dist

from . import _launch
from ._checks import check_gradients, check_importance, check_penalty
from ._reference import reference
from ._workers import ddp_worker, make_model

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is unavailable")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _launch.run_and_load(ddp_worker, tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.mark.parametrize("key", ["fisher1", "fisher_sum", "anchor_mean", "mas"])
def test_importance_of_all_the_data_on_every_rank(results, ref, key):
    check_importance(results, ref, key)


def test_matches_single_process_ewc(results, ref):
    check_importance([{"fisher_sum": r["fisher_sum"]} for r in results], {"fisher_sum": ref["single_process_fisher"]}, "fisher_sum")


def test_penalty_value(results, ref):
    check_penalty(results, ref)


@pytest.mark.parametrize("key", ["grad_autograd", "grad_fast", "grad_attach"])
def test_gradients(results, ref, key):
    check_gradients(results, ref, key)


def test_consolidation_does_not_trigger_ddp_gradient_sync(results):
    for res in results:
        assert res["comm_calls_during_consolidate"] == 0
        assert res["comm_calls_after_training"] > 0  # the counting hook works


def test_state_dict_round_trip(results):
    assert all(res["restored_equal"] for res in results)


def test_memory_estimate_is_replicated(results):
    numel = sum(p.numel() for p in make_model().parameters())
    assert all(res["memory"] == 2 * 8 * numel for res in results)  # float64 anchors + importance on every rank


def test_a_failing_rank_makes_every_rank_raise(results):
    assert results[1]["failure"].startswith("ValueError: non-finite per-sample loss")
    assert results[0]["failure"].startswith("RuntimeError: the importance pass failed on 1 other rank")
    assert all(res["failure_left_unconsolidated"] for res in results)
