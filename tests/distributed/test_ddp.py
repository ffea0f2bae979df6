"""EWC and MAS under DistributedDataParallel: 2 gloo processes on CPU, each with its own share of the data.

Every rank must end up with the importance of ALL the data (sums and sample counts
all-reduced), the same penalty and gradients, equal to a single process on all the data.
"""
import pytest
import torch.distributed as dist

from ._checks import check_importance
from ._suite import DistributedSuite
from ._workers import ddp_worker, make_model

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is unavailable")


class TestDDP(DistributedSuite):
    worker = staticmethod(ddp_worker)

    def test_matches_single_process_ewc(self, results, ref):
        check_importance([{"fisher_sum": r["fisher_sum"]} for r in results], {"fisher_sum": ref["single_process_fisher"]}, "fisher_sum")

    def test_consolidation_does_not_trigger_ddp_gradient_sync(self, results):
        for res in results:
            assert res["comm_calls_during_consolidate"] == 0
            assert res["comm_calls_after_training"] > 0  # the counting hook works

    def test_memory_estimate_is_replicated(self, results):
        numel = sum(p.numel() for p in make_model().parameters())
        assert all(res["memory"] == 2 * 8 * numel for res in results)  # float64 anchors + importance on every rank

    def test_a_failing_rank_makes_every_rank_raise(self, results):
        assert results[1]["failure"].startswith("ValueError: non-finite per-sample loss")
        assert results[0]["failure"].startswith("RuntimeError: the importance pass failed on 1 other rank")
        assert all(res["failure_left_unconsolidated"] for res in results)
