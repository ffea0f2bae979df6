"""Parameters used directly in Python: ``w * x``, ``x + w``, ``x - w``, products of parameters, in place.

Every result is checked against a float64 per-sample loop (batch of one, autograd, square
or abs, mean). These uses are followed to where they meet the batch and must not warn; a
use whose result depends on a sample's position in the batch must take the exact fallback.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcl.importance import PerSampleFallbackWarning, diagonal_fisher, mas_importance

from . import reference

CLASSES = 3




def _fisher_matches(model, x, y, sizes, rtol=1e-8, atol=1e-12, params=None):
    ref = reference.per_sample_importance(reference.float64_copy(model), reference.split(x.double(), y),
                                          reference.cross_entropy_loss)
    got = reference.no_fallback(diagonal_fisher, model, reference.in_batches(x, y, sizes), params=params)
    reference.assert_matches(got, ref, rtol=rtol, atol=atol, names=params)
    for name in got:
        assert ref[name].abs().max() > 0, name  # every parameter is exercised
    return got


def _pool(h):
    """``[B, *, H] -> [B, H]``: mean over the middle dims (identity for ``[B, H]``)."""
    return h.reshape(h.shape[0], -1, h.shape[-1]).mean(1)


# --------------------------------------------------------------------------- modules


class HFRMSNorm(nn.Module):
    """RMSNorm written like Hugging Face's ``LlamaRMSNorm``: the weight multiplies directly."""

    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(hidden) + 0.5)
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class NormNet(nn.Module):
    def __init__(self, d_in=5, hidden=7):
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.norm = HFRMSNorm(hidden)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        return self.head(_pool(torch.tanh(self.norm(self.inp(x)))))


class Elementwise(nn.Module):
    """``inp -> one elementwise use of ``p`` -> tanh -> pooled head``; ``p`` has ``shape``."""

    def __init__(self, how, shape, d_in=5, hidden=6):
        super().__init__()
        self.how = how
        self.inp = nn.Linear(d_in, hidden)
        self.p = nn.Parameter(torch.randn(shape) * 0.5 + (1.0 if "mul" in how else 0.0))
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        h, p = self.inp(x), self.p
        h = {
            "mul": lambda: p * h,
            "rmul": lambda: h * p,
            "torch.mul": lambda: torch.mul(h, p),
            "add": lambda: h + p,
            "radd": lambda: p + h,
            "sub": lambda: h - p,
            "psub": lambda: p - h,
            "add_alpha": lambda: torch.add(h, p, alpha=-2.5),
            "sub_alpha": lambda: h.sub(p, alpha=0.75),
        }[self.how]()
        h = h.reshape(*x.shape[:-1], h.shape[-1])  # drops the extra leading 1s of a [1, 1, 1, H] parameter
        return self.head(_pool(torch.tanh(h)))


# --------------------------------------------------------------------------- supported uses


@pytest.mark.parametrize("shape", [(6, 5), (6, 4, 5), (6, 4, 3, 5)], ids=["BH", "BTH", "BTUH"])
def test_hf_style_rms_norm(shape):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)
    model = reference.float64_copy(NormNet())
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (shape[0],), generator=gen)
    _fisher_matches(model, x, y, [4, 2])


@pytest.mark.parametrize("how", ["mul", "rmul", "torch.mul", "add", "radd", "sub", "psub", "add_alpha", "sub_alpha"])
@pytest.mark.parametrize("batched_shape", [(7, 5), (7, 3, 5), (4, 4, 5)], ids=["BH", "BTH", "T_equals_B"])
def test_parameter_times_or_plus_activation(how, batched_shape):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(4)
    model = reference.float64_copy(Elementwise(how, (6,)))
    x = torch.randn(*batched_shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (batched_shape[0],), generator=gen)
    sizes = [batched_shape[0] - 3, 1, 2]  # a batch of one takes the ("all",) layout
    _fisher_matches(model, x, y, sizes)


@pytest.mark.parametrize("how", ["mul", "add", "sub"])
@pytest.mark.parametrize("shape", [(), (1,), (1, 6), (1, 1, 1, 6), (3, 6)], ids=["scalar", "one", "1H", "111H", "TH"])
def test_parameter_shapes_broadcasting_along_leading_dims(how, shape):
    """Scalar-like parameters, leading size-1 dims (even more dims than ``x``), ``w [T, H]``."""
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(6)
    model = reference.float64_copy(Elementwise(how, shape))
    x = torch.randn(5, 3, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (5,), generator=gen)
    _fisher_matches(model, x, y, [3, 2])


def test_float32_model_matches_float64_reference():
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(8)
    model = NormNet().float().eval()
    x = torch.randn(6, 4, 5, generator=gen)
    y = torch.randint(0, CLASSES, (6,), generator=gen)
    got = _fisher_matches(model, x, y, [6], rtol=2e-4, atol=1e-7)
    assert all(v.dtype == torch.float32 for v in got.values())


class Reused(nn.Module):
    """``scale`` multiplies twice, ``shift`` is added then subtracted, ``mat`` is a Linear weight
    and an elementwise factor (mixed contribution kinds)."""

    def __init__(self, d_in=5, hidden=6):
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.scale = nn.Parameter(torch.rand(hidden) + 0.5)
        self.shift = nn.Parameter(torch.randn(hidden) * 0.3)
        self.mat = nn.Parameter(torch.randn(hidden, hidden) / hidden**0.5)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):  # x [B, T, d_in]
        h = torch.tanh(self.scale * self.inp(x) + self.shift)
        h = torch.tanh(self.scale * F.linear(h, self.mat) - self.shift)
        outer = h.unsqueeze(-1) * h.unsqueeze(-2)  # [B, T, H, H]
        h = h + (self.mat * outer).sum(-1)
        return self.head(h.mean(1))


def test_parameter_used_several_times_sums_before_squaring():
    gen = torch.Generator().manual_seed(9)
    torch.manual_seed(10)
    model = reference.float64_copy(Reused())
    x = torch.randn(7, 3, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (7,), generator=gen)
    _fisher_matches(model, x, y, [4, 3])
    mas_ref = reference.per_sample_importance(model, reference.split(x), reference.mas_loss, power=1)
    reference.assert_matches(reference.no_fallback(mas_importance, model, [x[:4], x[4:]]), mas_ref)


class SeqFirst(nn.Module):
    """Activations ``[T, B, H]`` (non-contiguous) scaled and shifted; no seq-first hint."""

    def __init__(self, d_in=5, hidden=6):
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.norm = HFRMSNorm(hidden)
        self.shift = nn.Parameter(torch.randn(hidden) * 0.3)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):  # x [B, T, d_in]
        h = self.inp(x).transpose(0, 1)  # [T, B, H]
        h = torch.tanh(self.norm(h) + self.shift)
        return self.head(h.mean(0))


class GainEncoderLayer(nn.TransformerEncoderLayer):
    """A seq-first encoder layer whose output is scaled by its own gain (ties need the hint)."""

    def __init__(self, d):
        super().__init__(d, nhead=2, dim_feedforward=8, dropout=0.0, batch_first=False)
        self.gain = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, src, *args, **kwargs):
        return self.gain * super().forward(src, *args, **kwargs)


class SeqFirstEncoder(nn.Module):
    def __init__(self, d_in=5, d=6):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.layer = GainEncoderLayer(d)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x):  # x [B, T, d_in]
        h = self.layer(self.inp(x).transpose(0, 1))  # [T, B, d]
        return self.head(h.mean(0))


@pytest.mark.parametrize("steps", [3, 5], ids=["T_ne_B", "T_equals_B"])
def test_seq_first_layouts(steps):
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(12)
    x = torch.randn(7, steps, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (7,), generator=gen)
    _fisher_matches(reference.float64_copy(SeqFirstEncoder()), x, y, [2, 5])
    if steps != 5:  # without a seq-first module, T == B cannot be told apart from shapes
        _fisher_matches(reference.float64_copy(SeqFirst()), x, y, [2, 5])


# --------------------------------------------------------------------------- fallback cases


class PerRowParameter(nn.Module):
    """``w [4, H]`` times ``x [B, H]``: at ``B = 4`` the parameter spans the batch dimension.

    Row ``b`` of a batch of 4 uses ``w[b]``; a batch of one (the reference, the fallback)
    broadcasts to 4 rows and averages them. A rule that took dim 0 as the sample dimension
    would compute the former and disagree with the reference.
    """

    def __init__(self, rows=4, d_in=5, hidden=6):
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.w = nn.Parameter(torch.rand(rows, hidden) + 0.5)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        h = self.w * self.inp(x)
        if h.shape[0] != x.shape[0]:
            h = h.mean(0, keepdim=True)
        return self.head(torch.tanh(h))


class MiddleBroadcast(nn.Module):
    """``w [C, 1]`` times ``x [B, C, L]``: broadcast in the middle, not along leading dims."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.w = nn.Parameter(torch.rand(3, 1) + 0.5)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x):  # x [B, 3, 5]
        return self.head(torch.tanh(self.w * self.inp(x)).mean(1))


class InPlace(nn.Module):
    """``h.mul_(w)`` and ``h += b``: in-place uses stay on the fallback."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.w = nn.Parameter(torch.rand(6) + 0.5)
        self.b = nn.Parameter(torch.randn(6) * 0.3)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, x):
        h = self.inp(x)
        h.mul_(self.w)
        h += self.b
        return self.head(torch.tanh(h))


class TwoParameters(nn.Module):
    """``a * b`` (both tracked) and ``scale * frozen`` (a parameter the pass does not track)."""

    def __init__(self, rows):
        super().__init__()
        self.a = nn.Parameter(torch.rand(6) + 0.5)
        self.b = nn.Parameter(torch.rand(6) + 0.5)
        self.scale = nn.Parameter(torch.rand(5) + 0.5)
        self.frozen = nn.Parameter(torch.randn(rows, 5))  # rows == batch size: a shape coincidence
        self.head = nn.Linear(rows, CLASSES)

    def forward(self, x):  # x [B, 5]
        h = F.linear(x, self.scale * self.frozen)  # [B, rows]
        return self.head(torch.tanh(h)) * (self.a * self.b)[:CLASSES].sum()


def test_parameter_spanning_the_batch_takes_the_fallback():
    """Row ``b`` of a batch of 4 meets ``w[b]``: its loss depends on its position in the batch.

    A sample on its own (the reference, the fallback) broadcasts to all 4 rows instead. No
    per-sample rule computes that, so ``w`` takes the exact fallback, named in the warning.
    """
    gen = torch.Generator().manual_seed(13)
    torch.manual_seed(14)
    model = reference.float64_copy(PerRowParameter(rows=4))
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (4,), generator=gen)
    # only ``w``: the other layers' batched and single-sample semantics differ in this model
    ref = reference.per_sample_importance(model, reference.split(x, y), reference.cross_entropy_loss)
    with pytest.warns(PerSampleFallbackWarning, match="w .*position in the batch"):
        got = diagonal_fisher(model, reference.in_batches(x, y, [4]), params=["w"])
    reference.assert_matches(got, ref, names=["w"])


@pytest.mark.parametrize("model_cls, shape", [(MiddleBroadcast, (5, 3, 5)), (InPlace, (5, 5))],
                         ids=["broadcast_in_the_middle", "in_place"])
def test_other_elementwise_uses_are_exact_without_fallback(model_cls, shape):
    """``w [C, 1] * x [B, C, L]`` and ``h.mul_(w)``, ``h += b``: followed to where they meet the batch."""
    gen = torch.Generator().manual_seed(15)
    torch.manual_seed(16)
    model = reference.float64_copy(model_cls())
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (shape[0],), generator=gen)
    _fisher_matches(model, x, y, [3, 2])


def test_product_of_two_parameters_and_an_untracked_one():
    """``a * b`` (both tracked), ``scale * frozen`` with ``frozen`` (4 rows == B) left out of the pass."""
    gen = torch.Generator().manual_seed(19)
    torch.manual_seed(20)
    model = reference.float64_copy(TwoParameters(rows=4))
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (4,), generator=gen)
    _fisher_matches(model, x, y, [4], params=["a", "b", "scale", "head.weight", "head.bias"])
