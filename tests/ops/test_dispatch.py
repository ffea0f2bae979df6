"""Backend choice: automatic order, forcing, and clear errors (never a silent fallback)."""
import pytest
import torch

from fastcl.ops import BackendUnavailableError, backend_info, penalty, resolve, use_backend


def test_backend_info_names_every_op():
    info = backend_info("cpu")
    assert set(info) == {"penalty", "sqgrad", "distill"}
    assert all(name in ("cpp", "torch") for name in info.values())


def test_forced_torch_everywhere(monkeypatch):
    monkeypatch.setenv("FASTCL_BACKEND", "torch")
    assert backend_info("cpu") == {"penalty": "torch", "sqgrad": "torch", "distill": "torch"}


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("FASTCL_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="FASTCL_BACKEND=cuda cannot run penalty on cpu"):
        penalty([torch.ones(3)], [torch.zeros(3)])
    assert backend_info("cpu")["penalty"].startswith("unavailable")


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("FASTCL_BACKEND", "fortran")
    with pytest.raises(ValueError, match="fortran"):
        resolve("penalty", "cpu")
    with pytest.raises(ValueError):
        with use_backend("fortran"):
            pass


def test_use_backend_overrides_env(monkeypatch):
    monkeypatch.setenv("FASTCL_BACKEND", "cuda")
    with use_backend("torch"):
        assert resolve("distill", "cpu")[0] == "torch"
