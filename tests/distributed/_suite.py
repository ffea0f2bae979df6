"""The tests every distributed mode passes (DDP, FSDP2): subclass :class:`DistributedSuite`
with ``worker`` (a function of :mod:`._workers`); each subclass runs its worker once."""
from __future__ import annotations

import pytest

from . import _launch
from ._checks import check_gradients, check_importance, check_penalty
from ._reference import reference


class DistributedSuite:
    worker = None  # set by each subclass: staticmethod(<a worker of _workers>)

    @pytest.fixture(scope="class")
    def results(self, tmp_path_factory):
        return _launch.run_and_load(type(self).worker, tmp_path_factory.mktemp(type(self).__name__))

    @pytest.fixture(scope="class")
    def ref(self):
        return reference()

    @pytest.mark.parametrize("key", ["fisher1", "fisher_sum", "anchor_mean", "mas"])
    def test_importance_of_all_the_data_on_every_rank(self, results, ref, key):
        check_importance(results, ref, key)

    def test_penalty_value(self, results, ref):
        check_penalty(results, ref)

    @pytest.mark.parametrize("key", ["grad_autograd", "grad_fast", "grad_attach"])
    def test_gradients(self, results, ref, key):
        check_gradients(results, ref, key)

    def test_state_dict_round_trip(self, results):
        assert all(res["restored_equal"] for res in results)
