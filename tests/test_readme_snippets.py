"""The README's strategy, LwF and Hugging Face snippets, run as written.

Every fenced ``python`` block right after a ``<!-- snippet: CHAIN -->`` marker is executed,
the blocks of one chain in README order in one namespace (later snippets use the model,
optimizer and batch of earlier ones). The test provides only the inputs a reader brings:
``task_loaders`` / ``classes_per_task`` for the quickstart, ``model`` / ``args`` /
``task_a`` / ``task_b`` for Hugging Face (tiny models and data), then checks what the
snippets were meant to do.
"""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = re.compile(r"<!-- snippet: (\w+) -->\n```python\n(.*?)\n```", re.S)


def chains() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, code in MARKER.findall(README.read_text(encoding="utf-8")):
        out.setdefault(name, []).append(code)
    return out


def run(chain: str, namespace: dict) -> dict:
    for i, code in enumerate(chains()[chain]):
        exec(compile(code, f"README.md:{chain}[{i}]", "exec"), namespace)
    return namespace


def test_the_marked_snippets_are_the_ones_that_matter():
    found = chains()
    assert set(found) == {"quickstart", "hf"}
    quickstart = "\n".join(found["quickstart"])
    for call in ("fastcl.EWC(", ".add_penalty_grad_()", ".attach(opt)", "fastcl.SI(", "fastcl.MAS(", "fastcl.L2SP(", "fastcl.LwF("):
        assert call in quickstart, call
    assert "CausalLMLwF(" in found["hf"][0] and "ContinualTrainer(" in found["hf"][0]


def class_incremental_loaders(classes_per_task, batches=2, size=8, seed=0):
    """Task t holds only its own classes: task 0 classes 0..4, task 1 classes 5..9."""
    g = torch.Generator().manual_seed(seed)
    loaders, first = [], 0
    for k in classes_per_task:
        loaders.append([(torch.randn(size, 64, generator=g), first + torch.randint(0, k, (size,), generator=g)) for _ in range(batches)])
        first += k
    return loaders


def test_quickstart_snippets():
    torch.manual_seed(0)
    ns = run("quickstart", {"task_loaders": class_incremental_loaders([5, 5]), "classes_per_task": [5, 5]})
    ewc, si, mas, lwf, model = ns["ewc"], ns["si"], ns["mas"], ns["lwf"], ns["model"]
    assert ewc.num_consolidations == 2 and ewc.penalty().item() > 0
    assert ewc.last_penalty is not None and not ewc.attached  # the attached step ran, then detach()
    assert si.num_consolidations == 2 and any(w.sum() > 0 for w in si.importance.values())
    assert mas.num_consolidations == 2
    assert ns["l2sp"].penalty().item() > 0 and ns["l1sp"].penalty().item() > 0  # the LwF tasks moved the weights since
    assert lwf.num_consolidations == 2 and ns["seen"] == 10
    x = ns["task_loaders"][1][0][0]
    with torch.no_grad():
        model[2].bias.add_(0.5 * torch.randn(10))  # move the student away from the last teacher
    assert lwf.penalty(x, model(x), old_classes=ns["seen"]).item() > 0


@pytest.mark.filterwarnings("ignore::fastcl.PerSampleFallbackWarning")
def test_hugging_face_snippet(tmp_path):
    pytest.importorskip("transformers")
    from .integrations.test_hf import TokenDataset, tiny_llama, training_args

    model = tiny_llama(seed=50)
    args = training_args(tmp_path, max_steps=2, logging_steps=1, per_device_eval_batch_size=4)
    ns = run("hf", {"model": model, "args": args, "task_a": TokenDataset(8, 6, seed=51), "task_b": TokenDataset(8, 6, seed=52)})
    ewc, lwf, trainer = ns["ewc"], ns["lwf"], ns["trainer"]
    assert ewc.consolidated and lwf.consolidated and trainer.lwf is lwf and trainer.regularizers == [ewc]
    with torch.no_grad():  # task B was trained with distillation toward the model after task A
        batch = {k: torch.stack([ns["task_b"][i][k] for i in range(2)]) for k in ("input_ids", "attention_mask")}
        with lwf.capture_student() as captured:
            model(**batch)
        assert lwf.penalty(batch, captured.hidden).item() > 0
    logged = [h["cl_penalty"] for h in trainer.state.log_history if "cl_penalty" in h]
    assert len(logged) == 2 and logged[-1] > 0  # 0 at task B's first step: the weights are still the anchors
