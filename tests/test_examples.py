"""The seed's three examples, rewritten with fastcl, run and show what they claim."""
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def numbers(pattern: str, text: str) -> list[float]:
    return [float(v) for v in re.findall(pattern, text)]


def test_finetune_head_keeps_old_task():
    out = run("finetune_head.py")
    assert "trainable now: ['2.weight', '2.bias']" in out
    before, after = numbers(r"accuracy on A ([0-9.]+)", out)
    assert after >= before - 0.02  # frozen features and a task-incremental head: A is kept


def test_ewc_with_real_fisher_forgets_less_than_finetuning():
    out = run("ewc_real_fisher.py")
    finetune_a = numbers(r"fine-tuning: after B, accuracy on A ([0-9.]+)", out)[0]
    ewc_a = numbers(r"EWC: after B, accuracy on A ([0-9.]+)", out)[0]
    assert ewc_a > finetune_a + 0.2
    assert numbers(r"max ([0-9.e+-]+), zeros", out)[0] > numbers(r"mean ([0-9.e+-]+), max", out)[0]  # not all ones


def test_balanced_sampling_lifts_rare_classes():
    out = run("balanced_sampling.py")
    shuffled = numbers(r"shuffled: worst per-class recall ([0-9.]+)", out)[0]
    balanced = numbers(r"balanced sampler: worst per-class recall ([0-9.]+)", out)[0]
    assert balanced > shuffled


def test_avalanche_strength_conversion_reproduces_its_accuracy():
    # strength = 2·ewc_lambda/B: fastcl lands on the Avalanche-style loop's accuracy (quick: 2 tasks, 1 epoch)
    proc = subprocess.run([sys.executable, str(EXAMPLES / "port_from_avalanche.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ratios = numbers(r"batch +\d+: ratio +([0-9.]+)", proc.stdout)
    assert len(ratios) == 4 and ratios == sorted(ratios) and ratios[0] > 4  # F/I grows with B
    diffs = numbers(r"  ([+-][0-9.]+)\n", proc.stdout)
    assert len(diffs) == 2 and all(abs(d) < 0.03 for d in diffs), proc.stdout
