"""EWC and MAS under FSDP2 (``fully_shard``, DTensor parameters): 2 gloo processes on CPU.

Anchors and importance are stored sharded like the parameters; importance, penalty and
gradients must equal a single process on all the data, with the same value on every rank.
"""
import math

import pytest
import torch.distributed as dist

from ._suite import DistributedSuite
from ._workers import fsdp2_worker, make_model


def _fsdp2_available() -> str | None:
    if not (dist.is_available() and dist.is_gloo_available()):
        return "torch.distributed with gloo is unavailable"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # noqa: F401
        except ImportError:
            return "this torch has no FSDP2 fully_shard"
    return None


pytestmark = pytest.mark.skipif(_fsdp2_available() is not None, reason=str(_fsdp2_available()))


class TestFSDP2(DistributedSuite):
    worker = staticmethod(fsdp2_worker)

    def test_separate_mode_constant_is_global(self, results):
        assert results[0]["constant"] == results[1]["constant"] > 0

    def test_state_is_sharded_like_the_parameters(self, results):
        shapes = [tuple(p.shape) for p in make_model().parameters()]
        # dim 0 split as torch.chunk does: ceil(d0/2) rows on rank 0, the rest on rank 1
        local = [[math.ceil(s[0] / 2) * math.prod(s[1:]), (s[0] - math.ceil(s[0] / 2)) * math.prod(s[1:])] for s in shapes]
        for rank, res in enumerate(results):
            assert res["placements_match"]
            assert res["stored_elements"] == 2 * sum(n[rank] for n in local)  # anchors + importance, this rank's rows only

    def test_memory_estimate_counts_local_shards(self, results):
        for res in results:
            assert res["memory"] == 8 * res["stored_elements"]  # float64 parameters are stored in float64
            assert res["memory_bf16"] == res["memory"]  # ... whatever the storage dtype
        from fastcl.distributed import memory_estimate

        assert memory_estimate(make_model(), world_size=2) == results[0]["memory"]  # rank 0 holds the larger shards
