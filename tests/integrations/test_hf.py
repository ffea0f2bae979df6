"""fastcl.integrations.hf: Trainer penalties, per-sequence causal-LM Fisher, fused causal-LM LwF.

Tiny Llama models are built from configs (no downloads). References are computed
independently in float64: a per-sequence autograd loop for the Fisher, explicit
log-softmax KL on full logits for LwF, and gradient accumulation is checked against the
same training run without accumulation.
"""
import copy
import inspect
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

import fastcl  # noqa: E402
from fastcl.integrations.hf import (  # noqa: E402
    IGNORE_INDEX,
    CausalLMLwF,
    ContinualTrainer,
    causal_lm_forward,
    causal_lm_per_sequence_loss,
    causal_lm_targets,
)

VOCAB = 61  # odd on purpose
REPO = Path(__file__).resolve().parents[2]


def tiny_llama(seed=0, dtype=torch.float32, vocab=VOCAB):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype)


def perturb_(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))


def padded_batch(lengths, seq_len, seed, vocab=VOCAB):
    """Right-padded batch: pads are token 0 with attention_mask 0 and label IGNORE_INDEX."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), seq_len), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


class TokenDataset(torch.utils.data.Dataset):
    """Fixed-length random token sequences (no padding), as dict samples."""

    def __init__(self, size, seq_len, seed, vocab=VOCAB):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (size, seq_len), generator=g)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def training_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        gradient_accumulation_steps=1, learning_rate=0.05, lr_scheduler_type="constant", weight_decay=0.0,
        warmup_steps=0, max_grad_norm=0.0, optim="sgd", logging_steps=1000, save_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, seed=0,
    )
    params = inspect.signature(TrainingArguments).parameters
    kwargs["use_cpu" if "use_cpu" in params else "no_cuda"] = True
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def params64(model):
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


# --------------------------------------------------------------------------- per-sequence Fisher


def reference_sequence_nll(model, ids):
    """Mean next-token NLL of one unpadded sequence ``ids [L]``, written out token by token."""
    logits = model(input_ids=ids[None], use_cache=False).logits[0]
    logp = torch.log_softmax(logits, dim=-1)
    terms = [-logp[t, ids[t + 1]] for t in range(ids.shape[0] - 1)]
    return torch.stack(terms).mean()


def reference_fisher(model, batches):
    """(1/N) Σ_n (∂ℓ_n/∂θ)² with one autograd.grad per sequence, run on the unpadded sequence."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            seq = ids[: int(mask.sum())]
            grads = torch.autograd.grad(reference_sequence_nll(model, seq), list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    total[n] += g.square()
            count += 1
    return {n: t / count for n, t in total.items()}


def test_per_sequence_loss_matches_token_loop():
    model = tiny_llama(seed=1, dtype=torch.float64).eval()
    batch = padded_batch([9, 5, 2, 7], seq_len=9, seed=2)
    with torch.no_grad():
        logits, targets = causal_lm_forward(model, batch)
        losses = causal_lm_per_sequence_loss(logits, targets)
        expected = torch.stack([
            reference_sequence_nll(model, ids[: int(m.sum())]) for ids, m in zip(batch["input_ids"], batch["attention_mask"])
        ])
    assert losses.dtype == torch.float64 and losses.shape == (4,)
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)


def test_targets_mask_padding_without_labels():
    batch = padded_batch([4, 2], seq_len=5, seed=3)
    del batch["labels"]
    targets = causal_lm_targets(batch)
    assert (targets[batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert torch.equal(targets[batch["attention_mask"] == 1], batch["input_ids"][batch["attention_mask"] == 1])


def test_ewc_consolidate_gives_exact_per_sequence_fisher():
    model = tiny_llama(seed=3, dtype=torch.float64)
    batches = [padded_batch([7, 3, 6], seq_len=7, seed=4), padded_batch([2, 5], seq_len=5, seed=5)]
    expected = reference_fisher(model.eval(), batches)
    model.train()  # consolidation must switch to eval and restore
    ewc = fastcl.EWC(model, strength=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ewc.consolidate(batches, loss_fn=causal_lm_per_sequence_loss, forward=causal_lm_forward, verbose=False)
    fallback = [str(w.message) for w in caught if issubclass(w.category, fastcl.PerSampleFallbackWarning)]
    assert not fallback, fallback  # every Llama parameter has a per-sample rule (RMSNorm via the elementwise rule)
    assert model.training
    assert set(ewc.fisher) == set(expected)
    for name, ref in expected.items():
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(ewc.fisher[name], ref, rtol=1e-8, atol=1e-14, msg=name)


def test_fisher_max_samples_cuts_a_dict_batch():
    model = tiny_llama(seed=4, dtype=torch.float64)
    batch = padded_batch([6, 4, 5, 3], seq_len=6, seed=6)
    first_two = {k: v[:2] for k, v in batch.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastcl.PerSampleFallbackWarning)
        cut = fastcl.diagonal_fisher(model, [batch], causal_lm_per_sequence_loss, max_samples=2, forward=causal_lm_forward)
    expected = reference_fisher(model.eval(), [first_two])
    for name, ref in expected.items():
        torch.testing.assert_close(cut[name], ref, rtol=1e-8, atol=1e-14, msg=name)


# --------------------------------------------------------------------------- fused LwF


def reference_lwf(student_logits, teacher_logits, mask, temperature):
    """T² · mean over unmasked tokens of KL(softmax(t/T) ‖ softmax(s/T)), float64."""
    s = torch.log_softmax(student_logits.double() / temperature, -1)
    t = torch.log_softmax(teacher_logits.double() / temperature, -1)
    kl = (t.exp() * (t - s)).sum(-1)
    return temperature**2 * kl[mask].mean()


# fused_linear_distillation scales its saved gradients in float32 even for float64 inputs,
# so float64 gradients are compared at float32 precision (values at float64 precision)
@pytest.mark.parametrize("dtype, tol, grad_tol", [(torch.float32, 2e-5, 1e-4), (torch.float64, 1e-10, 1e-5)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_causal_lm_lwf_matches_unfused(dtype, tol, grad_tol, temperature):
    model = tiny_llama(seed=5, dtype=dtype)
    lwf = CausalLMLwF(model, strength=0.7, temperature=temperature, chunk_size=5)  # several chunks, last one short
    lwf.consolidate()
    perturb_(model, 0.05, seed=7)
    batch = padded_batch([8, 3, 6], seq_len=8, seed=8)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        teacher_logits = lwf.teacher(**inputs).logits

    with lwf.capture_student() as captured:
        student_logits = model(**inputs).logits
    fused = lwf.penalty(batch, captured.hidden)
    fused_grads = torch.autograd.grad(fused, list(model.parameters()))

    mask = batch["attention_mask"].bool()
    student_logits = model(**inputs).logits
    unfused = 0.7 * fastcl.distillation_loss(student_logits, teacher_logits, temperature, mask=mask)
    unfused_grads = torch.autograd.grad(unfused, list(model.parameters()))
    reference = 0.7 * reference_lwf(student_logits.detach(), teacher_logits, mask, temperature)

    assert fused.item() > 1e-4  # the perturbation made the student differ from the teacher
    assert abs(fused.item() - reference.item()) <= tol * max(1.0, reference.item())
    assert abs(unfused.item() - reference.item()) <= tol * max(1.0, reference.item())
    for (name, _), a, b in zip(model.named_parameters(), fused_grads, unfused_grads):
        torch.testing.assert_close(a, b, rtol=grad_tol, atol=grad_tol * 1e-3, msg=lambda m: f"{name}: {m}")


def test_causal_lm_lwf_ignores_padded_tokens():
    model = tiny_llama(seed=6)
    lwf = CausalLMLwF(model, strength=1.0)
    lwf.consolidate()
    perturb_(model, 0.05, seed=9)
    batch = padded_batch([5, 2], seq_len=6, seed=10)
    changed = copy.deepcopy(batch)
    changed["input_ids"][batch["attention_mask"] == 0] = 7  # different pad tokens, right padding: no effect
    values = []
    for b in (batch, changed):
        with lwf.capture_student() as captured:
            model(**{k: v for k, v in b.items() if k != "labels"})
        values.append(lwf.penalty(b, captured.hidden).item())
    assert values[0] > 0 and values[0] == pytest.approx(values[1], rel=1e-6)


def test_causal_lm_lwf_is_zero_before_consolidation_and_validates():
    model = tiny_llama(seed=7)
    lwf = CausalLMLwF(model)
    assert not lwf.active
    assert lwf.penalty({"input_ids": torch.zeros(1, 3, dtype=torch.long)}, torch.randn(1, 3, 32)).item() == 0.0
    with pytest.raises(ValueError, match="temperature"):
        CausalLMLwF(model, temperature=0.0)
    with pytest.raises(ValueError, match="teacher"):
        CausalLMLwF(model, teacher="ema")
    with pytest.raises(TypeError, match="disable_adapter"):
        CausalLMLwF(model, teacher="disable_adapter")
    with pytest.raises(TypeError, match="regularizer"):
        ContinualTrainer(model=model, args=None, regularizer=fastcl.LwF(model))


def test_peft_lwf_uses_base_model_without_copy():
    peft = pytest.importorskip("peft")
    base = tiny_llama(seed=8)
    reference_base = copy.deepcopy(base)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    lwf = CausalLMLwF(model, strength=1.0, temperature=2.0, teacher="disable_adapter")
    lwf.consolidate()
    assert lwf.teacher is None  # no second copy of the base weights
    with torch.no_grad():  # make the adapters non-zero so student and base differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    batch = padded_batch([6, 4], seq_len=6, seed=11)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.train()
    teacher_hidden, teacher_weight, _ = lwf.teacher_outputs(batch)
    assert model.training  # the teacher pass restores the modes
    with torch.no_grad():
        expected_hidden = reference_base.model(**inputs).last_hidden_state
        teacher_logits = reference_base(**inputs).logits
    torch.testing.assert_close(teacher_hidden, expected_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(teacher_weight, reference_base.lm_head.weight)

    with lwf.capture_student() as captured:
        student_logits = model(**inputs).logits
    value = lwf.penalty(batch, captured.hidden)
    value.backward()
    reference = reference_lwf(student_logits.detach(), teacher_logits, batch["attention_mask"].bool(), 2.0)
    assert value.item() > 1e-4
    assert value.item() == pytest.approx(reference.item(), rel=1e-4)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)


# --------------------------------------------------------------------------- Trainer


def consolidated_ewc_state(model, stiffness):
    """EWC state with a real Fisher at ``model``'s weights; the caller then moves the model away.

    λ is set so that the stiffest coordinate has curvature ``λ·max F = stiffness``, which
    keeps SGD (lr·stiffness < 2) stable while the penalty still dominates those coordinates.
    """
    ewc = fastcl.EWC(model, strength=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastcl.PerSampleFallbackWarning)
        ewc.consolidate([padded_batch([8, 8, 5, 7], seq_len=8, seed=12)], loss_fn=causal_lm_per_sequence_loss, forward=causal_lm_forward)
    ewc.strength = stiffness / max(f.max().item() for f in ewc.fisher.values())
    return ewc.state_dict()


def train_with_accumulation(tmp_path, base, ewc_state, batch_size, accumulation, accepts_loss_kwargs, dataset):
    model = copy.deepcopy(base)
    regularizer = None
    if ewc_state is not None:
        regularizer = fastcl.EWC(model, strength=1.0)
        regularizer.load_state_dict(ewc_state)
    args = training_args(tmp_path / f"ga{accumulation}", per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_steps=2)
    trainer = ContinualTrainer(model=model, args=args, train_dataset=dataset, regularizer=regularizer)
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs  # False: the Trainer divides the loss by the steps itself
    trainer.train()
    return params64(model)


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False], ids=["loss-normalised-by-trainer-tokens", "trainer-divides-loss"])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, accepts_loss_kwargs):
    base = tiny_llama(seed=9)
    state = consolidated_ewc_state(base, stiffness=10.0)
    perturb_(base, 0.05, seed=13)  # away from the anchor: the penalty gradient is large from step 1
    dataset = TokenDataset(16, seq_len=6, seed=14)
    run = lambda ewc_state, bs, ga: train_with_accumulation(tmp_path, base, ewc_state, bs, ga, accepts_loss_kwargs, dataset)  # noqa: E731
    big = run(state, 8, 1)
    accumulated = run(state, 4, 2)
    without_penalty = run(None, 8, 1)
    assert max_diff(big, without_penalty) > 1e-3  # the penalty matters...
    assert max_diff(big, accumulated) < 2e-6  # ...and enters once per optimizer step with accumulation


def test_penalty_is_float32_under_bf16_autocast(tmp_path):
    model = tiny_llama(seed=10)
    state = consolidated_ewc_state(model, stiffness=10.0)
    perturb_(model, 0.05, seed=15)
    ewc = fastcl.EWC(model, strength=1.0)
    ewc.load_state_dict(state)
    trainer = ContinualTrainer(model=model, args=training_args(tmp_path), regularizer=ewc)
    batch = {k: v for k, v in padded_batch([6, 6], seq_len=6, seed=16).items()}
    model.train()
    with torch.no_grad():
        expected_penalty = ewc.penalty().double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            task = model(**batch).loss
            loss = trainer.compute_loss(model, dict(batch))
    assert loss.dtype == torch.float32
    assert (loss.double() - task.double()).item() == pytest.approx(expected_penalty.item(), rel=1e-5)


def test_trainer_ewc_then_retraining_stays_closer_to_task_a(tmp_path):
    task_a, task_b = TokenDataset(16, 6, seed=17), TokenDataset(16, 6, seed=18)
    model = tiny_llama(seed=11)
    ContinualTrainer(model=model, args=training_args(tmp_path / "a"), train_dataset=task_a).train()
    anchor = params64(model)
    ewc = fastcl.EWC(model, strength=1.0)
    trainer = ContinualTrainer(model=model, args=training_args(tmp_path / "b", max_steps=8, logging_steps=4), train_dataset=task_b, regularizer=ewc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastcl.PerSampleFallbackWarning)
        trainer.consolidate(max_samples=8)
    assert ewc.consolidated and all(torch.isfinite(f).all() for f in ewc.fisher.values())
    ewc.strength = 20.0 / max(f.max().item() for f in ewc.fisher.values())  # stiff but stable for SGD at lr 0.05
    fisher = {n: f.double() for n, f in ewc.fisher.items()}
    state_a = copy.deepcopy(model.state_dict())
    trainer.train()
    with_ewc = params64(model)
    model.load_state_dict(state_a)
    ContinualTrainer(model=model, args=training_args(tmp_path / "c", max_steps=8), train_dataset=task_b).train()
    plain = params64(model)
    drift = lambda p: sum((fisher[n] * (p[n] - anchor[n]).square()).sum().item() for n in fisher)  # noqa: E731
    assert drift(with_ewc) < 0.5 * drift(plain)
    logged = [h for h in trainer.state.log_history if "cl_penalty" in h]
    assert logged and all(math.isfinite(h["cl_penalty"]) for h in logged)


@pytest.mark.filterwarnings("ignore::fastcl.PerSampleFallbackWarning")
def test_trainer_runs_si_mas_l2sp_together(tmp_path):
    model = tiny_llama(seed=14)
    si, mas, l2sp = fastcl.SI(model, strength=1.0), fastcl.MAS(model, strength=1.0), fastcl.L2SP(model, strength=1.0)
    trainer = ContinualTrainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset(12, 5, seed=23), regularizer=[si, mas, l2sp])
    trainer.train()  # SI is attached to the trainer's optimizer and integrates the path
    trainer.consolidate(max_samples=6)
    assert si.consolidated and mas.consolidated and l2sp.consolidated
    assert any(w.abs().sum() > 0 for w in si.importance.values())
    assert all(torch.isfinite(w).all() for w in mas.importance.values()) and any(w.sum() > 0 for w in mas.importance.values())
    perturb_(model, 0.01, seed=24)
    model.train()
    batch = padded_batch([5, 5], seq_len=5, seed=25)
    with torch.no_grad():
        expected = sum(r.penalty().double() for r in (si, mas, l2sp))
        difference = trainer.compute_loss(model, dict(batch)).double() - model(**batch).loss.double()
    assert expected.item() > 0 and difference.item() == pytest.approx(expected.item(), rel=1e-5)


def test_trainer_lwf_loss_is_task_loss_plus_distillation(tmp_path):
    model = tiny_llama(seed=12)
    lwf = CausalLMLwF(model, strength=0.5, temperature=2.0)
    lwf.consolidate()
    perturb_(model, 0.05, seed=19)
    trainer = ContinualTrainer(model=model, args=training_args(tmp_path), lwf=lwf)
    batch = padded_batch([6, 4, 5], seq_len=6, seed=20)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        task = model(**batch).loss
        reference = 0.5 * reference_lwf(model(**inputs).logits, lwf.teacher(**inputs).logits, batch["attention_mask"].bool(), 2.0)
        model.eval()
        eval_loss = trainer.compute_loss(model, dict(batch))
    assert reference.item() > 1e-4
    assert (loss - task).item() == pytest.approx(reference.item(), rel=1e-4)
    assert eval_loss.item() == pytest.approx(task.item(), rel=1e-6)  # evaluation reports the task loss only


def test_trainer_lwf_keeps_the_student_near_the_teacher(tmp_path):
    task_b = TokenDataset(16, 6, seed=21)
    probe = padded_batch([6, 6, 6, 6], seq_len=6, seed=22)
    inputs = {k: v for k, v in probe.items() if k != "labels"}
    kls = {}
    for name, strength in (("plain", 0.0), ("lwf", 5.0)):
        model = tiny_llama(seed=13)
        lwf = CausalLMLwF(model, strength=strength)
        trainer = ContinualTrainer(model=model, args=training_args(tmp_path / name, max_steps=8, learning_rate=0.5), train_dataset=task_b, lwf=lwf)
        trainer.consolidate()
        trainer.train()
        with torch.no_grad():
            kls[name] = reference_lwf(model(**inputs).logits, lwf.teacher(**inputs).logits, probe["attention_mask"].bool(), 1.0).item()
    assert kls["plain"] > 1e-2
    assert kls["lwf"] < 0.5 * kls["plain"]


# --------------------------------------------------------------------------- packaging


def test_integrations_package_imports_nothing_heavy():
    code = "import sys, fastcl.integrations; print(sorted(m for m in ('transformers', 'accelerate', 'peft') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- example


def test_retrain_llm_example_runs(tmp_path):
    cmd = [
        sys.executable, str(REPO / "examples" / "retrain_llm.py"), "--vocab", "17", "--hidden", "16", "--layers", "1",
        "--heads", "2", "--seq-len", "6", "--steps", "3", "--batch-size", "8", "--fisher-samples", "8",
        "--output-dir", str(tmp_path),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for method in ("fine-tune", "EWC", "LwF"):
        assert method in result.stdout
    assert "task-A loss" in result.stdout


# --------------------------------------------------------------------------- sequence classification (issue 14.15)


def tiny_classifier(seed=0, num_labels=3, problem_type=None):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, num_labels=num_labels, pad_token_id=0, problem_type=problem_type,
    )
    return LlamaForSequenceClassification(config).double()


class LabelledDataset(torch.utils.data.Dataset):
    """Fixed-length sequences without pad tokens, each with a class label."""

    def __init__(self, size, seq_len, seed, num_labels=3):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (size, seq_len), generator=g)
        self.labels = torch.randint(0, num_labels, (size,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def per_sample_importance(model, dataset, loss, power):
    """(1/N) Σ_n |∂ℓ_n/∂θ|^power, one sequence at a time."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(dataset)):
        item = dataset[i]
        logits = model(input_ids=item["input_ids"][None]).logits
        grads = torch.autograd.grad(loss(logits, item["labels"][None]), list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                total[n] += g.abs() ** power
    return {n: t / len(dataset) for n, t in total.items()}


@pytest.mark.filterwarnings("ignore::fastcl.PerSampleFallbackWarning")
def test_trainer_consolidates_a_sequence_classifier(tmp_path):
    model = tiny_classifier(seed=30)
    dataset = LabelledDataset(6, seq_len=5, seed=31)
    model.eval()
    fisher = per_sample_importance(model, dataset, lambda z, y: torch.nn.functional.cross_entropy(z, y), power=2)
    mas = per_sample_importance(model, dataset, lambda z, y: z.square().sum(), power=1)
    ewc, mas_reg = fastcl.EWC(model, strength=1.0), fastcl.MAS(model, strength=1.0)
    args = training_args(tmp_path, per_device_eval_batch_size=4, max_steps=2, logging_steps=1)
    trainer = ContinualTrainer(model=model, args=args, train_dataset=dataset, regularizer=[ewc, mas_reg])
    trainer.consolidate()
    for name, expected in fisher.items():
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(ewc.fisher[name], expected, rtol=1e-8, atol=1e-14, msg=name)
        torch.testing.assert_close(mas_reg.importance[name], mas[name], rtol=1e-8, atol=1e-14, msg=name)
    perturb_(model, 0.05, seed=32)
    trainer.train()  # the penalties now act on the classifier's training loss
    logged = [h["cl_penalty"] for h in trainer.state.log_history if "cl_penalty" in h]
    assert logged and all(v > 0 for v in logged)


def test_sequence_classification_per_sample_losses():
    from fastcl.integrations.hf import sequence_classification_per_sample_loss as loss

    g = torch.Generator().manual_seed(33)
    z = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    expected = torch.stack([-torch.log_softmax(z[i], 0)[y[i]] for i in range(4)])
    torch.testing.assert_close(loss(z, y), expected, rtol=1e-12, atol=0)
    target = torch.rand(4, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(loss(z, target, problem_type="regression"), ((z - target) ** 2).mean(1), rtol=1e-12, atol=0)
    bits = (target > 0.5).double()
    bce = -(bits * torch.log(torch.sigmoid(z)) + (1 - bits) * torch.log(1 - torch.sigmoid(z))).mean(1)
    torch.testing.assert_close(loss(z, bits), bce, rtol=1e-10, atol=0)  # float labels, C > 1: multi-label
    torch.testing.assert_close(loss(z[:, :1], target[:, 0]), (z[:, 0] - target[:, 0]) ** 2, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        loss(z, torch.tensor([0, 3, 1, 2]))
    with pytest.raises(ValueError, match="labels"):
        loss(z, None)


def test_trainer_refuses_at_construction_a_model_it_cannot_consolidate(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(TypeError, match="causal language models"):
        ContinualTrainer(model=model, args=training_args(tmp_path), regularizer=fastcl.EWC(model, 1.0))
    ContinualTrainer(model=model, args=training_args(tmp_path), regularizer=fastcl.L2SP(model, 1.0))  # needs no data


# --------------------------------------------------------------------------- no silent LwF, atomic consolidate (issue 14.14)


def test_training_with_a_teacherless_lwf_raises_before_any_step(tmp_path):
    model = tiny_llama(seed=34)
    before = params64(model)
    lwf = CausalLMLwF(model, strength=1.0)  # never consolidated: it would add nothing
    trainer = ContinualTrainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset(8, 5, seed=35), lwf=lwf)
    with pytest.raises(RuntimeError, match="no teacher"):
        trainer.train()
    assert max_diff(params64(model), before) == 0.0
    model.train()
    with pytest.raises(RuntimeError, match="no teacher"):
        trainer.compute_loss(model, dict(padded_batch([5, 5], seq_len=5, seed=36)))


def test_trainer_consolidate_is_all_or_nothing(tmp_path):
    model = tiny_llama(seed=37)
    l2sp = fastcl.L2SP(model, strength=1.0)
    anchors = l2sp.anchors
    true_fisher = fastcl.EWC(model, strength=1.0, fisher="true")  # needs [B, C] logits, a causal LM gives [B, S, V]
    lwf = CausalLMLwF(model, strength=1.0)
    trainer = ContinualTrainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset(4, 5, seed=38),
                               regularizer=[l2sp, true_fisher], lwf=lwf)
    perturb_(model, 0.05, seed=39)
    with pytest.raises(ValueError, match="logits"):
        trainer.consolidate()
    assert all(l2sp.anchors[n] is a for n, a in anchors.items()) and l2sp.num_consolidations == 1
    assert not true_fisher.consolidated and not lwf.consolidated


@pytest.mark.filterwarnings("ignore::fastcl.PerSampleFallbackWarning")
def test_trainer_consolidates_any_regularizer_by_what_it_declares(tmp_path):
    """No type branches: a user's regularizer that reads model outputs gets the same data MAS gets."""
    from fastcl.importance import mas_importance
    from fastcl.strategies import ImportanceRegularizer

    class TwiceMAS(ImportanceRegularizer):
        consolidation_input = "outputs"

        def consolidate(self, data, *, max_samples=None, **options):
            self.fold({n: 2 * w for n, w in mas_importance(self.model, data, max_samples=max_samples, **options).items()})

    model = tiny_llama(seed=40)
    custom, mas = TwiceMAS(model, strength=1.0, mode="online"), fastcl.MAS(model, strength=1.0)
    trainer = ContinualTrainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset(4, 5, seed=41),
                               regularizer=[custom, mas])
    trainer.consolidate()
    for n, w in mas.importance.items():
        torch.testing.assert_close(custom.importance[n], 2 * w, rtol=1e-6, atol=0)


def test_out_of_range_token_ids_and_targets_are_named():
    """They used to surface as a bare IndexError from the embedding or cross_entropy."""
    from fastcl.integrations.hf import sequence_classification_per_sample_loss

    model = tiny_llama(seed=3)
    batch = padded_batch([4, 3], 5, seed=1)
    bad = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["attention_mask"] == 1, VOCAB + 5)}
    with pytest.raises(ValueError, match=rf"input_ids must be token ids in \[0, {VOCAB}\)"):
        causal_lm_forward(model, bad)
    logits, targets = torch.randn(2, 5, VOCAB), batch["labels"].clone()
    targets[0, 2] = VOCAB
    with pytest.raises(ValueError, match="targets must be token ids"):
        causal_lm_per_sequence_loss(logits, targets)
    targets[0, 2] = -3
    with pytest.raises(ValueError, match="targets must be token ids"):
        causal_lm_per_sequence_loss(logits, targets)
    with pytest.raises(ValueError, match="problem_type must be one of"):
        sequence_classification_per_sample_loss(torch.randn(3, 4), torch.tensor([0, 1, 1]), problem_type="bogus")
    with pytest.raises(TypeError, match="logits and labels"):
        sequence_classification_per_sample_loss(torch.randn(3, 4), [0, 1, 1])


def test_ewc_consolidate_on_bad_token_ids_changes_nothing(tmp_path):
    model = tiny_llama(seed=4)
    ewc = fastcl.EWC(model, 1.0)
    trainer = ContinualTrainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset(4, 6, seed=0), regularizer=ewc)
    before = {k: v for k, v in vars(ewc).items()}

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            ids = torch.full((6,), VOCAB + 1)
            return {"input_ids": ids, "attention_mask": torch.ones(6, dtype=torch.long), "labels": ids}

    with pytest.raises(ValueError, match="input_ids"):
        trainer.consolidate(Bad())
    assert vars(ewc) == before and not ewc.consolidated


def test_lwf_penalty_student_hidden_type_named():
    model = tiny_llama(seed=5)
    lwf = CausalLMLwF(model)
    with pytest.raises(TypeError, match="student_hidden"):
        lwf.penalty({"input_ids": torch.zeros(1, 3, dtype=torch.long)}, "hidden")
