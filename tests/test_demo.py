"""The digits demo: JSON structure, metrics consistent with the matrix, EWC beats fine-tuning."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from fastcl.cli import main  # noqa: E402
from fastcl.demo import SCENARIOS, STRATEGIES, DemoConfig, build_tasks, run_demo, train_strategy  # noqa: E402

KEYS = {"average_accuracy", "forgetting", "backward_transfer", "seconds", "accuracy_matrix"}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check_entry(entry):
    assert set(entry) == KEYS
    r = np.array(entry["accuracy_matrix"], dtype=np.float64)
    assert r.shape == (5, 5) and np.isfinite(r).all() and (0 <= r).all() and (r <= 1).all()
    # the reported metrics are those of the matrix (Chaudhry et al. / Lopez-Paz & Ranzato)
    assert entry["average_accuracy"] == pytest.approx(r[-1].mean())
    forgetting = np.mean([r[j:4, j].max() - r[4, j] for j in range(4)])
    assert entry["forgetting"] == pytest.approx(forgetting)
    assert entry["backward_transfer"] == pytest.approx(np.mean([r[4, j] - r[j, j] for j in range(4)]))
    assert entry["seconds"] > 0


def test_cli_demo_reduced_writes_json_and_table(tmp_path, capsys):
    path = tmp_path / "demo.json"
    code = main(["demo", "--scenario", "split-digits", "--strategies", "finetune,ewc,lwf", "--epochs", "1", "--json", str(path), "--quiet"])
    assert code == 0
    results = json.loads(path.read_text())
    assert list(results) == ["split-digits"]
    assert list(results["split-digits"]) == ["finetune", "ewc", "lwf"]
    for entry in results["split-digits"].values():
        _check_entry(entry)
    out = capsys.readouterr().out
    assert "split-digits" in out and "avg acc" in out and "forget" in out and "BWT" in out
    for name in ("finetune", "ewc", "lwf"):
        assert name in out


def test_every_strategy_runs_on_both_scenarios():
    cfg = DemoConfig(epochs=1, hidden=32)
    results = run_demo(SCENARIOS, STRATEGIES, cfg)
    assert list(results) == list(SCENARIOS)
    for scenario in SCENARIOS:
        assert list(results[scenario]) == list(STRATEGIES)
        for entry in results[scenario].values():
            _check_entry(entry)


def test_split_digits_is_task_incremental():
    tasks = build_tasks("split-digits")
    assert [t.columns.tolist() for t in tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    for t in tasks:
        assert set(t.y.unique().tolist()) == set(t.columns.tolist())
    # with a 2-way head per task an untrained model is near chance (50 %), not 10 %
    m = train_strategy("finetune", tasks, DemoConfig(epochs=1))
    assert m[0, 0] > 0.9 and min(m[0, 1:]) > 0.2


def test_same_seed_same_result_and_freeze_keeps_body():
    tasks = build_tasks("split-digits", seed=3)
    cfg = DemoConfig(epochs=1, seed=3)
    a = train_strategy("finetune", tasks, cfg).as_array()
    b = train_strategy("finetune", tasks, cfg).as_array()
    np.testing.assert_array_equal(a, b)
    frozen = train_strategy("freeze", tasks, cfg).as_array()
    np.testing.assert_array_equal(frozen[0], a[0])  # same init, same data: identical until freezing starts


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "demo.png"
    assert main(["demo", "--scenario", "split-digits", "--strategies", "finetune,freeze", "--epochs", "1", "--plot", str(path), "--quiet"]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_ewc_beats_finetune_on_permuted_digits(tmp_path):
    path = tmp_path / "demo.json"
    assert main(["demo", "--scenario", "permuted-digits", "--strategies", "finetune,ewc", "--json", str(path), "--quiet"]) == 0
    results = json.loads(path.read_text())["permuted-digits"]
    fine, ewc = results["finetune"]["average_accuracy"], results["ewc"]["average_accuracy"]
    assert ewc >= fine + 0.08, (fine, ewc)
    assert results["ewc"]["forgetting"] < results["finetune"]["forgetting"]
