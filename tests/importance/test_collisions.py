"""Batches where another dimension has the batch size: the sample dimension comes from provenance, not sizes.

Each case runs with a batch size equal to the colliding size (sequence length, table rows,
prototypes), plus a ragged last batch that collides while the others do not, and is checked
against a float64 per-sample loop and against ``torch.func.vmap(grad)``. None may take the
fallback: these are the common cases the rules exist for.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastcl.importance import diagonal_fisher, mas_importance

from . import models, reference

STEPS = 6



def _case(name, gen):
    """``(model, x, y, batch sizes)``: batches of ``STEPS`` samples and a ragged last one that collides too."""
    if name == "embedding_positions":
        model, x = models.PositionTable(steps=STEPS), torch.randint(0, 11, (14, STEPS), generator=gen)
    elif name == "parameter_positions":
        model, x = models.PositionTable(steps=STEPS, parameter=True), torch.randint(0, 11, (14, STEPS), generator=gen)
    elif name == "shared_table_into_linear":
        model, x = models.SharedTable(steps=STEPS), torch.randn(14, STEPS, 5, generator=gen, dtype=torch.float64)
    elif name == "parameter_through_a_layer":
        model, x = models.Prototypes(rows=STEPS), torch.randn(14, 4, generator=gen, dtype=torch.float64)
    elif name == "sequence_first_T_equals_B":
        model, x = models.SequenceFirst(), torch.randn(14, STEPS, 5, generator=gen, dtype=torch.float64)
    else:
        raise AssertionError(name)
    classes = STEPS if name == "parameter_through_a_layer" else 3
    y = torch.randint(0, classes, (x.shape[0],), generator=gen)
    return reference.float64_copy(model), x, y, [8, STEPS]  # 14 samples: the last batch (6) collides


CASES = ["embedding_positions", "parameter_positions", "shared_table_into_linear", "parameter_through_a_layer",
         "sequence_first_T_equals_B"]



@pytest.mark.parametrize("objective", ["empirical", "mas", "exact"])
@pytest.mark.parametrize("case", CASES)
def test_collision_matches_loop_and_vmap(case, objective):
    gen = torch.Generator().manual_seed(CASES.index(case) * 10 + ["empirical", "mas", "exact"].index(objective))
    torch.manual_seed(CASES.index(case))
    model, x, y, sizes = _case(case, gen)
    batches = reference.in_batches(x, y, sizes)
    if objective == "empirical":
        got = reference.no_fallback(diagonal_fisher, model, batches)
        refs = [reference.per_sample_importance(model, reference.split(x, y), reference.cross_entropy_loss),
                reference.vmap_importance(model, batches, reference.cross_entropy_loss)]
    elif objective == "mas":
        got = reference.no_fallback(mas_importance, model, [b for b, _ in batches])
        refs = [reference.per_sample_importance(model, reference.split(x), reference.mas_loss, power=1),
                reference.vmap_importance(model, [(b,) for b, _ in batches], reference.mas_loss, power=1)]
    else:
        got = reference.no_fallback(diagonal_fisher, model, [b for b, _ in batches], kind="exact")
        refs = [reference.exact_fisher(model, reference.split(x))]
    for ref in refs:
        reference.assert_matches(got, ref, rtol=1e-8, atol=1e-13)


def test_true_kind_draws_the_same_labels_as_a_loop():
    """kind="true": labels drawn from the model's own predictions with the global RNG, then the empirical rule."""
    gen = torch.Generator().manual_seed(5)
    model, x, _, sizes = _case("embedding_positions", gen)
    batches = [x[:sizes[0]], x[sizes[0]:]]
    torch.manual_seed(7)
    labels = []
    with torch.no_grad():
        for b in batches:
            labels.append(torch.multinomial(torch.softmax(model(b), -1), 1).squeeze(1))
    ref = reference.per_sample_importance(model, reference.split(x, torch.cat(labels)), reference.cross_entropy_loss)
    torch.manual_seed(7)
    reference.assert_matches(reference.no_fallback(diagonal_fisher, model, batches, kind="true"), ref)


# --------------------------------------------------------------------------- Hugging Face, batch == sequence


def _lmbatches(vocab, gen, masked):
    ids = torch.randint(0, vocab, (16, 8), generator=gen)  # batches of 8 sequences of 8 tokens
    mask = torch.ones_like(ids)
    if masked:
        mask[1, 6:] = 0  # right padding
        mask[9, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hugging_face_causal_lm_at_batch_equal_to_sequence_needsno_fallback(arch):
    pytest.importorskip("transformers")
    from fastcl.integrations.hf import causal_lm_forward, causal_lm_per_sequence_loss, causal_lm_targets

    torch.manual_seed(31)
    model = (models.tiny_gpt2() if arch == "gpt2" else models.tiny_llama()).double().eval()
    gen = torch.Generator().manual_seed(32)
    ids, mask = _lmbatches(40, gen, masked=True)
    batches = [{"input_ids": ids[:8], "attention_mask": mask[:8]}, {"input_ids": ids[8:], "attention_mask": mask[8:]}]

    def sequence_loss(model, ids, mask):
        batch = {"input_ids": ids, "attention_mask": mask}
        return causal_lm_per_sequence_loss(model(**batch, use_cache=False).logits, causal_lm_targets(batch))[0]

    got = reference.no_fallback(diagonal_fisher, model, batches, causal_lm_per_sequence_loss, forward=causal_lm_forward)
    reference.assert_matches(got, reference.per_sample_importance(model, reference.split(ids, mask), sequence_loss))
    if arch == "gpt2":
        # the position table is the parameter a size-based guess got wrong at B == T
        assert got["transformer.wpe.weight"].abs().max() > 0
        # torch.func can run GPT-2 without an attention mask (the mask code branches on its values)
        def unmasked_loss(model, ids):
            return causal_lm_per_sequence_loss(model(input_ids=ids, use_cache=False).logits, ids)[0]

        got = reference.no_fallback(diagonal_fisher, model, [{"input_ids": ids[:8]}], causal_lm_per_sequence_loss,
                           forward=causal_lm_forward)
        reference.assert_matches(got, reference.vmap_importance(model, [(ids[:8],)], unmasked_loss))


def test_hugging_face_mas_at_batch_equal_to_sequence():
    pytest.importorskip("transformers")
    torch.manual_seed(33)
    model = models.tiny_gpt2(layers=1).double().eval()
    ids = torch.randint(0, 40, (8, 8), generator=torch.Generator().manual_seed(34))

    def logits_norm(model, ids):
        return model(input_ids=ids, use_cache=False).logits.square().sum()

    got = reference.no_fallback(mas_importance, model, [ids], output_fn=lambda out: out.logits)
    reference.assert_matches(got, reference.per_sample_importance(model, reference.split(ids), logits_norm, power=1))


def test_float32_model_at_batch_equal_to_sequence():
    """The collision cases in float32 against the float64 loop (tolerance for float32 sums)."""
    gen = torch.Generator().manual_seed(41)
    torch.manual_seed(42)
    model, x, y, sizes = _case("embedding_positions", gen)
    got = reference.no_fallback(diagonal_fisher, model.float(), reference.in_batches(x, y, sizes))
    ref = reference.per_sample_importance(model.double(), reference.split(x, y), reference.cross_entropy_loss)
    reference.assert_matches(got, ref, rtol=2e-4, atol=1e-7)
    assert all(v.dtype == torch.float32 for v in got.values())


def test_cross_entropy_of_logits_flattened_over_positions():
    """A loss that reshapes ``[B, T, C]`` logits to ``[B·T, C]`` and back: the samples survive the merge."""
    gen = torch.Generator().manual_seed(43)
    torch.manual_seed(44)
    model = reference.float64_copy(torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5)))
    x = torch.randint(0, 11, (STEPS, STEPS), generator=gen)
    y = torch.randint(0, 5, (STEPS, STEPS), generator=gen)

    def loss_fn(out, t):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1), reduction="none").view(t.shape).mean(1)

    def sample_loss(model, x, y):
        return loss_fn(model(x), y).sum()

    got = reference.no_fallback(diagonal_fisher, model, [(x, y)], loss_fn)
    reference.assert_matches(got, reference.per_sample_importance(model, reference.split(x, y), sample_loss))
