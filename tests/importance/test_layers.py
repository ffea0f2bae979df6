"""Per-sample rules for each layer type against a float64 per-sample loop."""
from __future__ import annotations

import warnings

import pytest
import torch

from fastcl.importance import PerSampleFallbackWarning, diagonal_fisher, mas_importance

from . import models, reference


def _case(name, gen):
    """(model, x, y, batch sizes) for architecture ``name``; fresh random data each call."""
    if name == "cnn":
        model = models.randomise_norm_stats(models.CNN(), gen)
        x = torch.randn(7, 3, 9, 10, generator=gen)
        classes = 5
    elif name == "conv1d":
        model = models.randomise_norm_stats(models.Conv1dNet(), gen)
        x = torch.randn(6, 4, 15, generator=gen)
        classes = 3
    elif name == "conv3d":
        model = models.Conv3dNet()
        x = torch.randn(5, 2, 4, 5, 4, generator=gen)
        classes = 3
    elif name.startswith("transformer"):
        batch_first = name.endswith("batch_first")
        model = models.randomise_norm_stats(models.TinyTransformer(batch_first=batch_first, norm_first=not batch_first), gen)
        # second batch has S == B == 4: the sample dimension is ambiguous from shapes alone
        x = torch.randint(0, 13, (7, 4), generator=gen)
        x[0, -1] = 0  # a padding token
        x[2, 1] = x[2, 2] = 5  # a repeated token
        classes = 4
    else:
        raise AssertionError(name)
    y = torch.randint(0, classes, (x.shape[0],), generator=gen)
    return model, x, y, [3, 4] if x.shape[0] == 7 else [x.shape[0] - 2, 2]


ARCHS = ["cnn", "conv1d", "conv3d", "transformer_batch_first", "transformer_seq_first"]


@pytest.mark.parametrize("arch", ARCHS)
def test_empirical_fisher_matches_per_sample_loop(arch):
    gen = torch.Generator().manual_seed(ARCHS.index(arch))
    model, x, y, sizes = _case(arch, gen)
    model = reference.float64_copy(model)
    if x.is_floating_point():
        x = x.double()
    ref = reference.per_sample_importance(model, reference.split(x, y), reference.cross_entropy_loss)
    got = reference.no_fallback(diagonal_fisher, model, reference.in_batches(x, y, sizes))  # every layer here has a rule
    reference.assert_matches(got, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_mas_matches_per_sample_loop(arch):
    gen = torch.Generator().manual_seed(100 + ARCHS.index(arch))
    model, x, y, sizes = _case(arch, gen)
    model = reference.float64_copy(model)
    if x.is_floating_point():
        x = x.double()
    ref = reference.per_sample_importance(model, reference.split(x), reference.mas_loss, power=1)
    got = reference.no_fallback(mas_importance, model, [xb for xb, _ in reference.in_batches(x, y, sizes)])
    reference.assert_matches(got, ref)


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_recurrent_layers_use_the_fallback_with_a_warning(cell):
    gen = torch.Generator().manual_seed(7)
    model = reference.float64_copy(models.Recurrent(cell))
    x = torch.randn(6, 5, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    ref = reference.per_sample_importance(model, reference.split(x, y), reference.cross_entropy_loss)
    got, fallback = reference.with_fallback_warnings(diagonal_fisher, model, [(x[:4], y[:4]), (x[4:], y[4:])])
    reference.assert_matches(got, ref)
    named = [m for m in fallback if "no per-sample rule" in m]
    assert len(named) == 1  # once per call, not once per batch
    for p in ("rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"):
        assert p in named[0]
    assert "head." not in named[0]  # the head keeps its rule


@pytest.mark.parametrize("direct", [False, True])
def test_tied_weights_and_repeated_module(direct):
    """Tied embedding/head (sparse + factored per sample), a Linear called twice, ``h * scale.exp()``."""
    gen = torch.Generator().manual_seed(11)
    model = reference.float64_copy(models.TiedLM(direct=direct))
    assert model.head.weight is model.emb.weight
    x = torch.randint(0, 11, (7, 3), generator=gen)
    x[1, 0] = x[1, 2]  # repeated token within a sample
    y = torch.randint(0, 11, (7,), generator=gen)
    ref = reference.per_sample_importance(model, reference.split(x, y), reference.cross_entropy_loss)
    assert "head.weight" not in ref  # tied: one entry, under the first name
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)  # exp(scale) is followed to where it meets the batch
        got = diagonal_fisher(model, batches)
        reference.assert_matches(got, ref)
        mas_ref = reference.per_sample_importance(model, reference.split(x), reference.mas_loss, power=1)
        reference.assert_matches(mas_importance(model, [x[:5], x[5:]]), mas_ref)


def test_linear_with_sequence_dims_and_inplace_output():
    """[B, T, I] inputs, non-contiguous, output modified in place after the layer."""
    gen = torch.Generator().manual_seed(3)

    class Seq(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(5, 6)
            self.ln = torch.nn.LayerNorm(6)
            self.b = torch.nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            h.relu_()
            return self.b(self.ln(h)).sum(1)

    model = reference.float64_copy(Seq())
    x = torch.randn(5, 4, 6, generator=gen, dtype=torch.float64)[..., :5]  # non-contiguous
    y = torch.randint(0, 3, (5,), generator=gen)
    ref = reference.per_sample_importance(model, reference.split(x, y), reference.cross_entropy_loss)
    reference.assert_matches(diagonal_fisher(model, [(x[:2], y[:2]), (x[2:], y[2:])]), ref)


class _Attention(torch.nn.Module):
    """nn.MultiheadAttention used directly: self-attention (need_weights, padding mask) or cross-attention."""

    def __init__(self, cross, batch_first):
        super().__init__()
        self.cross, self.batch_first = cross, batch_first
        self.mha = torch.nn.MultiheadAttention(6, 2, batch_first=batch_first)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):  # x [B, S, 6]
        mask = x[..., 0] > 1.0  # some keys padded, never all
        mask[:, 0] = False
        q = x[:, :2] * 0.5 if self.cross else x
        if not self.batch_first:
            x = x.transpose(0, 1)
            q = q.transpose(0, 1) if self.cross else x  # keep `query is key` for self-attention
        out, _ = self.mha(q, x, x, key_padding_mask=mask, need_weights=True)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out.mean(1))


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_direct(cross, batch_first):
    gen = torch.Generator().manual_seed(21)
    model = reference.float64_copy(_Attention(cross, batch_first))
    x = torch.randn(5, 4, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    ref = reference.per_sample_importance(model, reference.split(x, y), reference.cross_entropy_loss)
    got, fallback = reference.with_fallback_warnings(diagonal_fisher, model, [(x[:4], y[:4]), (x[4:], y[4:])])
    reference.assert_matches(got, ref)
    text = " ".join(fallback)
    assert text == ""  # cross-attention splits the packed weight: followed to where each part meets the batch


@pytest.mark.parametrize("nd", [1, 2])
def test_convolution_with_asymmetric_same_padding_groups_and_unbatched_shared_input(nd):
    """Even kernels with ``padding="same"`` pad one side more; groups; a conv over a shared input."""
    gen = torch.Generator().manual_seed(30 + nd)
    torch.manual_seed(40 + nd)
    conv = (torch.nn.Conv1d if nd == 1 else torch.nn.Conv2d)(4, 6, (2,) * nd if nd == 1 else (2, 4), padding="same", groups=2)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = conv, torch.nn.Linear(6, 3)
            self.register_buffer("pattern", torch.randn(4, *(7,) * nd))

        def forward(self, x):
            h = self.conv(x) + self.conv(self.pattern)  # the second call: an unbatched input shared by all samples
            return self.head(torch.tanh(h).flatten(2).mean(2))

    model = reference.float64_copy(Net())
    x = torch.randn(5, 4, *(7,) * nd, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    got = reference.no_fallback(diagonal_fisher, model, [(x[:3], y[:3]), (x[3:], y[3:])])
    reference.assert_matches(got, reference.per_sample_importance(model, reference.split(x, y), reference.cross_entropy_loss))
