"""Where a benchmark ran: device name and file-name slug, git commit, library versions, threads."""
from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import torch

__all__ = ["device_name", "slug", "git_commit", "triton_version", "environment"]

_REPO = Path(__file__).resolve().parents[2]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from ``/proc/cpuinfo``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    """``text`` lower-cased with every run of other characters than ``[a-z0-9]`` turned into ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def git_commit() -> str | None:
    """HEAD, with ``-dirty`` for tracked changes; ``FASTCL_GIT_COMMIT`` where there is no git checkout
    (e.g. the copy of the tree on a lent GPU machine)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            # tracked changes only (git describe --dirty semantics)
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                                   capture_output=True, text=True, timeout=10)
            return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("FASTCL_GIT_COMMIT") or None


def triton_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:  # noqa: BLE001 - not installed, or broken metadata: no version to report
        return None


def environment(device: torch.device) -> dict:
    """The header of a results JSON: machine, commit, versions, thread count."""
    import fastcl

    return {
        ("gpu" if device.type == "cuda" else "cpu"): device_name(device),
        "device": device.type,
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "fastcl": fastcl.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }

