"""The digits demo: JSON structure, metrics consistent with the matrix, EWC beats fine-tuning."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from fastcl.cli import main  # noqa: E402
from fastcl.demo import (  # noqa: E402
    REGULARIZERS,
    SCENARIOS,
    STRATEGIES,
    DemoConfig,
    build_tasks,
    format_sweep,
    run_demo,
    run_sweep,
    save_sweep_plot,
    train_strategy,
)

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
    t = r.shape[0]
    assert r.shape == (t, t) and np.isfinite(r).all() and (0 <= r).all() and (r <= 1).all()
    # the reported metrics are those of the matrix (Chaudhry et al. / Lopez-Paz & Ranzato)
    assert entry["average_accuracy"] == pytest.approx(r[-1].mean())
    forgetting = np.mean([r[j : t - 1, j].max() - r[t - 1, j] for j in range(t - 1)])
    assert entry["forgetting"] == pytest.approx(forgetting)
    assert entry["backward_transfer"] == pytest.approx(np.mean([r[t - 1, j] - r[j, j] for j in range(t - 1)]))
    assert entry["seconds"] > 0


def test_cli_demo_reduced_writes_json_and_table(tmp_path, capsys):
    path = tmp_path / "demo.json"
    code = main(["demo", "--scenario", "split-digits", "--strategies", "finetune,ewc,lwf", "--epochs", "1", "--json", str(path),
                 "--quiet", "--strength", "ewc=12.5"])
    assert code == 0
    record = json.loads(path.read_text())
    # the record says what produced it: configuration, versions, backends
    config, env = record["config"], record["environment"]
    assert config["strategies"] == ["finetune", "ewc", "lwf"] and config["scenarios"] == ["split-digits"]
    assert config["epochs"] == 1 and config["seed"] == 0 and config["strengths"]["ewc"] == 12.5
    assert config["strengths"]["lwf"] == DemoConfig().strengths["lwf"]
    assert env["torch"] == torch.__version__ and env["fastcl"] and set(env["backends"]) == {"penalty", "sqgrad", "distill"}
    results = record["results"]
    assert list(results) == ["split-digits"]
    assert list(results["split-digits"]) == ["finetune", "ewc", "lwf"]
    for entry in results["split-digits"].values():
        _check_entry(entry)
    captured = capsys.readouterr()
    out = captured.out
    assert f"wrote {path}" in captured.err
    assert "split-digits" in out and "avg acc" in out and "forget" in out and "BWT" in out
    for name in ("finetune", "ewc", "lwf"):
        assert name in out


def test_every_strategy_runs_on_both_scenarios():
    cfg = DemoConfig(epochs=1, hidden=16, num_tasks=3, replay_capacity=30)
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
    results = json.loads(path.read_text())["results"]["permuted-digits"]
    fine, ewc = results["finetune"]["average_accuracy"], results["ewc"]["average_accuracy"]
    assert ewc >= fine + 0.08, (fine, ewc)
    assert results["ewc"]["forgetting"] < results["finetune"]["forgetting"]


def test_replay_remembers():
    # a small memory (60 samples, 1 % of the stream) mixed into every batch keeps old tasks far better than
    # fine-tuning (seed 0, 1 epoch: 51 % vs 32 % average accuracy)
    cfg = DemoConfig(epochs=1, hidden=32, replay_capacity=60)
    perm = run_demo(["permuted-digits"], ["finetune", "replay"], cfg)["permuted-digits"]
    assert perm["replay"]["average_accuracy"] >= perm["finetune"]["average_accuracy"] + 0.12, perm
    assert perm["replay"]["forgetting"] < perm["finetune"]["forgetting"]


def test_replayed_samples_are_scored_on_their_own_head():
    from fastcl.demo import _label_heads, _restrict, _restrict_per_sample

    tasks = build_tasks("split-digits")
    heads = _label_heads(tasks)
    logits = torch.randn(6, 10)
    targets = torch.tensor([0, 3, 5, 8, 9, 2])
    got_logits, got_targets = _restrict_per_sample(logits, targets, heads)
    for i, y in enumerate(targets.tolist()):
        cols = tasks[y // 2].columns
        want_logits, want_target = _restrict(logits[i : i + 1], targets[i : i + 1], cols)
        assert torch.equal(got_logits[i], want_logits[0]) and got_targets[i] == want_target[0]


def test_sweep_records_divergence_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = DemoConfig(epochs=1, hidden=16, num_tasks=2)
    # EWC at 1e5 x its default strength diverges with this learning rate: recorded, not raised
    sweep = run_sweep(["split-digits"], ["ewc"], cfg, factors=[0.1, 1e5])
    rows = sweep["split-digits"]["ewc"]
    assert [r["strength"] for r in rows] == pytest.approx([3.0, 3e6])
    assert rows[0]["diverged"] is False and 0 <= rows[0]["average_accuracy"] <= 1
    assert rows[1]["diverged"] is True and rows[1]["average_accuracy"] is None
    assert "diverged" in format_sweep(sweep) and "finetune" in format_sweep(sweep)
    save_sweep_plot(sweep, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert set(REGULARIZERS) <= set(STRATEGIES)


def test_cli_sweep_writes_json(tmp_path, capsys):
    path = tmp_path / "sweep.json"
    assert main(["demo", "--sweep-strength", "--scenario", "split-digits", "--strategies", "mas", "--sweep-factors", "1,10",
                 "--epochs", "1", "--hidden", "16", "--json", str(path), "--quiet"]) == 0
    record = json.loads(path.read_text())
    assert record["config"]["sweep_factors"] == [1.0, 10.0] and record["config"]["strategies"] == ["mas"]
    assert [r["strength"] for r in record["results"]["split-digits"]["mas"]] == pytest.approx([0.03, 0.3])
    assert "strength" in capsys.readouterr().out


@pytest.mark.parametrize("field,value,error", [
    ("epochs", 0, ValueError), ("epochs", 1.5, TypeError), ("epochs", True, TypeError), ("seed", -1, ValueError),
    ("seed", 10**30, ValueError), ("lr", True, TypeError), ("lr", 1e39, ValueError), ("lr", float("nan"), ValueError),
    ("momentum", 1.5, ValueError), ("momentum", "0.9", TypeError), ("momentum", None, TypeError), ("momentum", -1, ValueError),
    ("online_decay", 2.0, ValueError), ("online_decay", float("nan"), ValueError), ("lwf_temperature", 0, ValueError),
    ("lwf_temperature", -1.0, ValueError), ("replay_fraction", 1.0, ValueError), ("fisher", "bogus", ValueError),
    ("device", 5, TypeError), ("device", "nodevice", ValueError), ("strengths", [1.0], TypeError),
    ("strengths", {"ewc": True}, TypeError), ("strengths", {"ewc": 1e39}, ValueError), ("strengths", {"ewc": -1.0}, ValueError),
])
def test_config_rejects_bad_values_naming_the_field(field, value, error):
    cfg = DemoConfig(**{field: value})
    with pytest.raises(error, match=field):
        cfg.validate()


def test_config_accepts_numpy_and_tensor_scalars_as_plain_numbers():
    cfg = DemoConfig(epochs=np.int64(2), seed=torch.tensor(3), lr=np.float32(0.05), momentum=torch.tensor(0.5),
                     replay_fraction=np.float64(0.25), strengths={"ewc": np.float32(3.0)})
    cfg.validate()
    assert (cfg.epochs, cfg.seed, cfg.momentum, cfg.replay_fraction, cfg.strengths["ewc"]) == (2, 3, 0.5, 0.25, 3.0)
    assert type(cfg.epochs) is int and type(cfg.seed) is int and type(cfg.lr) is float and type(cfg.strengths["ewc"]) is float
    assert cfg.lr == pytest.approx(0.05)


@pytest.mark.parametrize("call,error,match", [
    (lambda: build_tasks("split-digits", num_tasks=0), ValueError, "num_tasks"),
    (lambda: build_tasks("split-digits", num_tasks=6), ValueError, "num_tasks"),
    (lambda: run_demo("split-digits", ["finetune"]), TypeError, "scenarios"),  # not split into letters
    (lambda: run_demo(["split-digits"], []), ValueError, "strategies"),
    (lambda: run_demo(["split-digits"], ["bogus"]), ValueError, "bogus"),
    (lambda: run_demo(["split-digits"], ["finetune"], "cfg"), TypeError, "config"),
    (lambda: run_sweep(["split-digits"], ["ewc"], factors=[True]), TypeError, "factors"),
    (lambda: run_sweep(["split-digits"], ["ewc"], factors=[0.0]), ValueError, "factors"),
    (lambda: run_sweep(["split-digits"], ["ewc"], factors=[]), TypeError, "factors"),
    (lambda: run_sweep(["split-digits"], ["finetune"], factors=[1.0]), ValueError, "finetune"),
])
def test_entry_points_reject_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_save_plot_rejects_empty_results(tmp_path):
    from fastcl.demo import save_plot

    with pytest.raises(ValueError, match="results"):
        save_plot({}, str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()
