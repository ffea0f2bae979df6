"""Backend choice: automatic order, forcing, and clear errors (never a silent fallback)."""
import pytest
import torch

from fastcl.ops import BackendUnavailableError, backend_info, backend_status, choose_backend, op_backends, penalty, use_backend


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
    status = op_backends("cpu")["penalty"]
    assert (status.name, status.available) == ("cuda", False)
    assert "FASTCL_BACKEND=cuda cannot run penalty on cpu" in status.reason
    assert backend_info("cpu")["penalty"] == f"unavailable: {status.reason}"


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("FASTCL_BACKEND", "fortran")
    with pytest.raises(ValueError, match="fortran"):
        choose_backend("penalty", "cpu")
    with pytest.raises(ValueError):
        with use_backend("fortran"):
            pass


def test_use_backend_overrides_env(monkeypatch):
    monkeypatch.setenv("FASTCL_BACKEND", "cuda")
    with use_backend("torch"):
        assert choose_backend("distill", "cpu")[0] == "torch"


def test_op_backends_agree_with_the_choice():
    for op, status in op_backends("cpu").items():
        assert status.available and status.reason is None
        assert status.name == choose_backend(op, "cpu")[0] == backend_info("cpu")[op]


def test_backend_status_names_every_backend():
    status = backend_status("cpu")
    assert set(status) == {"cuda", "triton", "cpp", "torch"}
    assert status["torch"].available and status["torch"].reason is None
    assert not status["cuda"].available and status["cuda"].reason
    for name, s in status.items():
        assert s.name == name


@pytest.mark.parametrize("fn", [backend_info, op_backends, backend_status])
@pytest.mark.parametrize("device, error", [("nodevice", ValueError), ("cuda:x", ValueError), (None, TypeError), (1.5, TypeError)])
def test_a_device_that_is_no_device_names_device(fn, device, error):
    with pytest.raises(error, match="device"):
        fn(device)


@pytest.mark.parametrize("fn", [backend_info, op_backends])
@pytest.mark.parametrize("dtype", ["float32", None, float])
def test_a_dtype_that_is_no_torch_dtype_is_a_type_error(fn, dtype):
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        fn("cpu", dtype)
    assert fn(torch.device("cpu"), torch.float64).keys() == fn("cpu").keys()
