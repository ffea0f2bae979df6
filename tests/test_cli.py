"""The ``fastcl`` command line: one-line errors with exit code 2, ``info``, ``bench``."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastcl.cli import main

REPO = Path(__file__).resolve().parent.parent


def _run(*args, timeout=120):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("FASTCL_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "fastcl", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


BAD_DEMO_ARGS = [
    (["--strategies", "finetune,nope"], "unknown strategy 'nope'"),
    (["--strategies", ","], "--strategies is empty"),
    (["--scenario", "mnist"], "invalid choice"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "two"], "--epochs"),
    (["--seed", "-3"], "--seed"),
    (["--lr", "nan"], "--lr"),
    (["--hidden", "-1"], "--hidden"),
    (["--device", "tpu:0"], "--device"),
    (["--json", "/no/such/dir/out.json"], "does not exist"),
    (["--json", "/tmp"], "is a directory"),
    (["--plot", "/tmp"], "is a directory"),
    (["--plot", "/tmp/plot"], "expected a file name ending in .png"),
    (["--json", "/tmp/out.txt"], "ending in .json"),
    (["--strength", "ewc"], "expected STRATEGY=VALUE"),
    (["--strength", "finetune=3"], "has no strength"),
    (["--strength", "ewc=nan"], "--strength"),
    (["--sweep-strength", "--sweep-factors", "1,-2"], "--sweep-factors: expected a positive"),
    (["--sweep-factors", "1,2"], "--sweep-factors applies to --sweep-strength only"),
    (["--strategies", "ewc,,si"], "--strategies 'ewc,,si' has an empty entry"),
    (["--strategies", "ewc,"], "has an empty entry"),
    (["--strength", "ewc=1e39"], "--strength 'ewc=1e39': expected a finite number >= 0 that fits in float32"),
    (["--sweep-strength", "--strategies", "finetune,freeze"], "needs regularizers"),
    (["--bogus"], "unrecognized arguments"),
]


@pytest.mark.parametrize("args,message", BAD_DEMO_ARGS)
def test_bad_demo_input_is_one_line_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastcl demo: error:"), err
    assert message in err


def test_missing_and_unknown_command(capsys):
    for argv in ([], ["train"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fastcl: error:")


@pytest.mark.parametrize("args", [["demo", "--strategies", "ewc,unknown"], ["demo", "--epochs", "-1"]])
def test_subprocess_bad_input(args):
    proc = _run(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "error:" in proc.stderr


def test_info_runs():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("fastcl", "torch", "triton", "python", "cpu:", "penalty ->", "sqgrad ->", "distill ->"):
        assert needle in out
    # every backend gets a line on the cpu device: available or the reason it is not
    cpu_section = out.split("cpu:", 1)[1]
    for backend in ("cuda", "triton", "cpp", "torch"):
        assert f"    {backend}: " in cpu_section


def test_bench_without_script_is_a_clear_message(monkeypatch, capsys, tmp_path):
    import fastcl.cli as cli

    monkeypatch.setattr(cli, "__file__", str(tmp_path / "fastcl" / "cli.py"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTCL_BENCHMARKS", raising=False)
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert 'pip install -e ".[bench]" && fastcl bench --quick' in err and "FASTCL_BENCHMARKS=" in err


@pytest.mark.skipif(not (REPO / "benchmarks" / "run.py").is_file(), reason="benchmarks/run.py not in this tree")
def test_bench_writes_where_asked_not_into_the_source_tree(monkeypatch, tmp_path, capsys):
    import fastcl.cli as cli

    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick"]) == 0
    assert calls[-1][-2:] == ["--out", str(tmp_path / "fastcl-bench")]
    assert "writing results to" in capsys.readouterr().err
    assert main(["bench", "--quick", "--out", "mine"]) == 0
    assert calls[-1][-2:] == ["--out", "mine"] and calls[-1].count("--out") == 1
    # an installed package finds the benchmarks through FASTCL_BENCHMARKS
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site" / "fastcl" / "cli.py"))
    monkeypatch.setenv("FASTCL_BENCHMARKS", str(REPO / "benchmarks"))
    assert main(["bench", "--quick"]) == 0
    assert calls[-1][1] == str(REPO / "benchmarks" / "run.py")


@pytest.mark.skipif(not (REPO / "benchmarks" / "run.py").is_file(), reason="benchmarks/run.py not in this tree")
def test_bench_passes_arguments_through():
    proc = _run("bench", "--help")  # --help reaches run.py's own parser: no benchmark runs
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout


def test_plot_without_matplotlib_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main(["demo", "--strategies", "finetune", "--plot", str(tmp_path / "p.png"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib" in err
    assert not (tmp_path / "p.png").exists()


def test_diverged_run_is_one_line_exit_1(capsys):
    pytest.importorskip("sklearn")
    import torch

    threads = torch.get_num_threads()
    try:
        code = main(["demo", "--scenario", "split-digits", "--strategies", "finetune", "--epochs", "1", "--lr", "1e30", "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diverged" in err


def test_paths_are_checked_before_the_run(tmp_path, monkeypatch):
    import fastcl.demo as demo

    def never(*args, **kwargs):
        raise AssertionError("the demo ran before its output paths were checked")

    monkeypatch.setattr(demo, "run_demo", never)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: nothing to check there
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(SystemExit) as info:
            main(["demo", "--json", str(locked / "out.json")])
        assert info.value.code == 2
    finally:
        locked.chmod(0o700)
