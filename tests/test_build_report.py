"""A failed C++ build says why (pybind11 / compiler / compile error), records it, and `fastcl info` repeats it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastcl.cli import main

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / "setup.py"

pytestmark = pytest.mark.skipif(not SETUP.is_file(), reason="setup.py not in this tree (installed package)")


def _build(tmp_path, *, env=None, prelude=""):
    """``setup.py build_ext`` into ``tmp_path`` (no CUDA); returns (process, recorded status)."""
    out = tmp_path / "lib"
    argv = ["setup.py", "build_ext", "--build-lib", str(out), "--build-temp", str(tmp_path / "tmp")]
    code = (
        f"import sys\n{prelude}\nsys.argv = {argv!r}\n"
        f"exec(compile(open({str(SETUP)!r}).read(), 'setup.py', 'exec'), {{'__file__': {str(SETUP)!r}, '__name__': '__main__'}})"
    )
    full_env = {k: v for k, v in os.environ.items() if k != "FASTCL_REQUIRE_CPP"}  # CI sets it; each test chooses
    full_env.update({"FASTCL_BUILD_CUDA": "0", **(env or {})})
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)
    status_file = out / "fastcl" / "_build_status.json"
    return proc, (json.loads(status_file.read_text()) if status_file.is_file() else None)


def test_missing_pybind11_is_named(tmp_path):
    proc, status = _build(tmp_path, prelude="sys.modules['pybind11'] = None")
    assert proc.returncode == 0, proc.stderr  # the install goes on without the extension
    assert status["fastcl._C"]["outcome"] == "no-pybind11" and not status["fastcl._C"]["built"]
    assert "pip install pybind11" in status["fastcl._C"]["reason"]
    assert "could not build fastcl._C (no-pybind11)" in proc.stderr
    assert status["fastcl._cuda"] == {"built": False, "outcome": "skipped", "reason": "not built: FASTCL_BUILD_CUDA=0 at install time"}


def test_missing_compiler_is_named(tmp_path):
    proc, status = _build(tmp_path, env={"CXX": "/nonexistent/g++", "CC": "/nonexistent/gcc"})
    assert proc.returncode == 0, proc.stderr
    assert status["fastcl._C"]["outcome"] == "no-compiler"
    assert "/nonexistent/g++" in status["fastcl._C"]["reason"] and "(no-compiler)" in proc.stderr


def test_compile_error_quotes_the_compiler(tmp_path):
    proc, status = _build(tmp_path, env={"CXXFLAGS": "-include /nonexistent_fastcl_header.h"})
    assert proc.returncode == 0, proc.stderr
    entry = status["fastcl._C"]
    assert entry["outcome"] == "compile-error"
    assert "nonexistent_fastcl_header.h" in entry["reason"] and "csrc/cpu/" in entry["reason"]


def test_require_cpp_fails_the_build(tmp_path):
    proc, status = _build(tmp_path, env={"CXX": "/nonexistent/g++", "CC": "/nonexistent/gcc", "FASTCL_REQUIRE_CPP": "1"})
    assert proc.returncode != 0
    assert "FASTCL_REQUIRE_CPP=1 but fastcl._C was not built: no C++ compiler" in proc.stderr
    assert status["fastcl._C"]["outcome"] == "no-compiler"  # recorded before failing


def test_info_reports_the_recorded_reason(tmp_path, monkeypatch, capsys):
    import fastcl._build_report as report
    from fastcl.kernels import cpp

    record = tmp_path / "_build_status.json"
    record.write_text(json.dumps({
        "fastcl._C": {"built": False, "outcome": "no-compiler", "reason": "no C++ compiler: 'g++' is not on PATH."},
        "fastcl._cuda": {"built": False, "outcome": "skipped", "reason": "not built: FASTCL_BUILD_CUDA=0 at install time"},
    }))
    monkeypatch.setattr(report, "status_path", lambda: record)
    monkeypatch.setattr(cpp, "BUILD_ERROR", "fastcl._C is not available (ImportError)")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fastcl._C: not built (no-compiler): no C++ compiler: 'g++' is not on PATH." in out
    assert "fastcl._cuda:" in out
