"""pytest configuration for the benchmark suites (never collected by ``pytest tests``).

    pytest benchmarks --benchmark-only --benchmark-group-by=group

Runs on CUDA when available, else CPU; ``FASTCL_BENCH_DEVICE=cpu|cuda`` overrides.
Sizes are moderate so a CPU run takes minutes, not hours; ``benchmarks/run.py`` runs
the full comparison matrix and writes the results JSON.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # keep collection working without the plugin; every benchmark skips
    @pytest.fixture
    def benchmark():
        pytest.skip("pytest-benchmark is not installed (pip install pytest-benchmark)")


def bench_device():
    import torch

    name = os.environ.get("FASTCL_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.fixture(scope="session")
def device():
    return bench_device()
