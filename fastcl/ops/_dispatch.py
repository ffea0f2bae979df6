"""The one place where a backend is chosen for an op.

Backends, in order of preference per device type:

============  ==========================================
device        order
============  ==========================================
``cuda``      ``cuda`` (fastcl._cuda) > ``triton`` > ``torch``
``cpu``       ``cpp`` (fastcl._C) > ``torch``
============  ==========================================

Triton runs on CPU tensors only under ``TRITON_INTERPRET=1`` and only when forced
(``FASTCL_BACKEND=triton``): the interpreter is a test vehicle, never a default.

``FASTCL_BACKEND=torch|triton|cpp|cuda`` (or :func:`use_backend`) forces one backend
for every op; when the forced backend cannot run an op on the given device and dtype,
:class:`BackendUnavailableError` says why. There is never a silent fallback.

Every backend module exposes

* ``OPS``: ``{op_name: kernel_fn}`` for the ops it implements (signatures in
  ``fastcl/ops/<op>.py``, functions ``<op>_reference``),
* ``unavailable_reason(device) -> str | None``,
* ``unsupported_reason(op, dtype) -> str | None``.

What the dispatcher would do is readable as :class:`BackendStatus` records:
:func:`op_backends` (per op: the backend chosen, or why none can run it) and
:func:`backend_status` (per backend: can it run on the device at all).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "BACKENDS",
    "OPS",
    "BackendStatus",
    "BackendUnavailableError",
    "backend_info",
    "backend_status",
    "choose_backend",
    "op_backends",
    "use_backend",
]

BACKENDS = ("cuda", "triton", "cpp", "torch")
OPS = ("penalty", "sqgrad", "distill")

_MODULES = {
    "torch": "fastcl.ops._torch_backend",
    "triton": "fastcl.kernels.triton",
    "cpp": "fastcl.kernels.cpp",
    "cuda": "fastcl.kernels.cuda",
}

_PREFERENCE = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpp", "torch"),
}

_local = threading.local()


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op (the message says why)."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run: ``name`` is the backend (``None`` when no backend
    can run an op), ``reason`` says why not when ``available`` is false."""

    name: str | None
    available: bool
    reason: str | None = None

    def __str__(self) -> str:
        return str(self.name) if self.available else f"unavailable: {self.reason}"


def _forced() -> str | None:
    name = getattr(_local, "override", None) or os.environ.get("FASTCL_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"FASTCL_BACKEND={name!r} is not a backend; expected one of {', '.join(BACKENDS)} or 'auto'")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` for every op inside the ``with`` block (``None``/"auto": automatic choice).

    Takes precedence over ``FASTCL_BACKEND``; thread-local.
    """
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    previous = getattr(_local, "override", None)
    _local.override = None if name in (None, "auto") else name
    try:
        yield
    finally:
        _local.override = previous


_module_cache: dict[str, object] = {}


def _load(backend: str):
    """Import a backend module; return (module, None) or (None, reason)."""
    if backend in _module_cache:
        mod = _module_cache[backend]
        return (mod, None) if not isinstance(mod, str) else (None, mod)
    try:
        mod = importlib.import_module(_MODULES[backend])
    except Exception as exc:  # any import failure means "not available", with the reason kept
        reason = f"cannot import {_MODULES[backend]}: {type(exc).__name__}: {exc}"
        _module_cache[backend] = reason
        return None, reason
    _module_cache[backend] = mod
    return mod, None


def _why_not(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` when ``backend`` can run ``op`` on ``device``/``dtype``, else the reason."""
    mod, reason = _load(backend)
    if mod is None:
        return reason
    if op not in mod.OPS:
        return f"the {backend} backend has no {op} kernel"
    reason = mod.unavailable_reason(device)
    if reason:
        return reason
    return mod.unsupported_reason(op, dtype)


def choose_backend(op: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> tuple[str, Callable]:
    """Choose the backend for ``op`` on ``device`` with primary ``dtype``: ``(backend_name, kernel_fn)``.

    The forced backend (:func:`use_backend`, ``FASTCL_BACKEND``) or else the first in the
    device's preference order that can run it; :class:`BackendUnavailableError` when none can.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    device = torch.device(device)
    forced = _forced()
    if forced is not None:
        reason = _why_not(forced, op, device, dtype)
        if reason:
            raise BackendUnavailableError(
                f"FASTCL_BACKEND={forced} cannot run {op} on {device.type} ({dtype}): {reason}"
            )
        return forced, _load(forced)[0].OPS[op]
    for backend in _PREFERENCE.get(device.type, ("torch",)):
        if _why_not(backend, op, device, dtype) is None:
            return backend, _load(backend)[0].OPS[op]
    raise BackendUnavailableError(f"no backend can run {op} on {device} ({dtype})")


def _checked_device(device) -> torch.device:
    """``device`` (a ``torch.device``, a device string or an ordinal) as a ``torch.device``; errors name ``device``."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(f"device must be a torch.device or a device string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"device={device!r} is not a device (expected e.g. 'cpu', 'cuda', 'cuda:0'): {error}") from error


def _checked_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {type(dtype).__name__} {dtype!r}")
    return dtype


def op_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, BackendStatus]:
    """For each op, the :class:`BackendStatus` of the backend :func:`choose_backend` picks on
    ``device``/``dtype``; when it cannot run the op, ``available`` is false with the reason
    (``name``: the forced backend, or ``None`` when no backend can). A ``device`` that is
    no device raises ``ValueError``, a ``dtype`` that is no ``torch.dtype`` ``TypeError``."""
    device, dtype = _checked_device(device), _checked_dtype(dtype)
    statuses = {}
    for op in OPS:
        try:
            statuses[op] = BackendStatus(choose_backend(op, device, dtype)[0], True)
        except (BackendUnavailableError, ValueError) as exc:
            try:
                forced = _forced()
            except ValueError:
                forced = None
            statuses[op] = BackendStatus(forced, False, str(exc))
    return statuses


def backend_info(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Name the backend each op would use on ``device``: ``{"penalty": ..., "sqgrad": ..., "distill": ...}``.

    An op that cannot run (e.g. a forced backend lacking it) maps to ``"unavailable: <reason>"``;
    to test for that, read the records of :func:`op_backends` rather than the text.
    """
    return {op: str(status) for op, status in op_backends(device, dtype).items()}


def backend_status(device: torch.device | str = "cpu") -> dict[str, BackendStatus]:
    """For each backend, whether it can run on ``device`` at all, with the reason when not (for ``fastcl info``)."""
    device = _checked_device(device)
    status = {}
    for backend in BACKENDS:
        mod, reason = _load(backend)
        if mod is not None:
            reason = mod.unavailable_reason(device)
        status[backend] = BackendStatus(backend, reason is None, reason)
    return status
