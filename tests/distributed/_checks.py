"""Assertions shared by the DDP and FSDP2 tests: every rank equals the single-process oracle."""
from __future__ import annotations

import pytest
import torch

TOL = dict(rtol=1e-9, atol=1e-12)  # float64 throughout
SAME = dict(rtol=0.0, atol=1e-14)  # across ranks: results of the same all-reduce


def assert_dicts_close(got: dict, expected: dict, **tol) -> None:
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name].to(got[name].dtype), msg=lambda m: f"{name}: {m}", **tol)


def check_importance(results, ref, key):
    for res in results:
        assert res.get("grads_untouched", True)  # the importance pass leaves .grad and requires_grad as found
        assert_dicts_close(res[key], ref[key], **TOL)
    assert_dicts_close(results[1][key], results[0][key], **SAME)


def check_penalty(results, ref):
    for res in results:
        for key in ("penalty", "penalty_fast", "penalty_attach", "penalty_restored", "penalty_from_full"):
            assert res[key] == pytest.approx(ref["penalty"], rel=1e-9), key
        assert res["penalty"] == pytest.approx(ref["single_process_penalty"], rel=1e-9)
        assert res["l2sp"] == pytest.approx(ref["l2sp"], rel=1e-9)
    assert results[0]["penalty"] == results[1]["penalty"]


def check_gradients(results, ref, key):
    for res in results:
        assert_dicts_close(res[key], ref["grad"], **TOL)
    assert_dicts_close(results[1][key], results[0][key], **SAME)
