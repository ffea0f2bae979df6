"""diagonal_fisher: kinds, batching, dtypes, side effects and argument errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcl.importance import diagonal_fisher, mas_importance

from . import models, reference


def _data(n, d_in=7, classes=4, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen, dtype=dtype), torch.randint(0, classes, (n,), generator=gen)



@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-8), (torch.float32, 2e-4)])
def test_mlp_empirical_matches_loop(dtype, rtol):
    torch.manual_seed(1)
    model = models.mlp().to(dtype)
    x, y = _data(9, seed=1)
    ref = reference.per_sample_importance(reference.float64_copy(model), reference.split(x, y), reference.cross_entropy_loss)
    got = diagonal_fisher(model, reference.in_batches(x.to(dtype), y, [5, 4]))
    assert all(v.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) for v in got.values())
    assert all(v.shape == p.shape for v, (_, p) in zip(got.values(), model.named_parameters()))
    reference.assert_matches(got, ref, rtol=rtol, atol=1e-7 if dtype == torch.float32 else 1e-12)


def test_ragged_batches_and_max_samples():
    torch.manual_seed(2)
    model = reference.float64_copy(models.mlp())
    x, y = _data(9, seed=2)
    batches = reference.in_batches(x, y, [5, 3, 1])
    want = reference.per_sample_importance(model, reference.split(x, y), reference.cross_entropy_loss)
    reference.assert_matches(diagonal_fisher(model, batches), want)
    # max_samples=7 uses 5 + the first 2 of the second batch, and never touches the third
    consumed = []

    def gen():
        for i, b in enumerate(batches):
            consumed.append(i)
            yield b

    got = diagonal_fisher(model, gen(), max_samples=7)
    assert consumed == [0, 1]
    want = reference.per_sample_importance(model, reference.split(x[:7], y[:7]), reference.cross_entropy_loss)
    reference.assert_matches(got, want)


def test_non_contiguous_inputs_and_tuple_inputs():
    torch.manual_seed(3)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

        def forward(self, u, v):
            return self.a(u) * torch.tanh(self.b(v))

    model = reference.float64_copy(TwoInputs())
    u = torch.randn(3, 6, dtype=torch.float64).t()  # [6, 3], non-contiguous
    v = torch.randn(6, 2, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    ref = reference.per_sample_importance(
        model, [(u[i:i + 1], v[i:i + 1], y[i:i + 1]) for i in range(6)], lambda m, a, b, t: F.cross_entropy(m(a, b), t)
    )
    got = diagonal_fisher(model, [((u[:4], v[:4]), y[:4]), ([u[4:], v[4:]], y[4:])])
    reference.assert_matches(got, ref)


def test_custom_loss_and_forward_with_dict_batches():
    torch.manual_seed(4)
    model = reference.float64_copy(models.mlp(classes=1))
    x, _ = _data(6, seed=4)
    t = torch.randn(6, dtype=torch.float64)

    def loss_fn(out, target):
        return (out.squeeze(1) - target).square()

    def forward(m, batch):
        return m(batch["x"]), batch["t"]

    ref = reference.per_sample_importance(model, [(x[i:i + 1], t[i:i + 1]) for i in range(6)],
                                          lambda m, a, b: loss_fn(m(a), b).sum())
    got = diagonal_fisher(model, [{"x": x[:4], "t": t[:4]}, {"x": x[4:], "t": t[4:]}], loss_fn, forward=forward)
    reference.assert_matches(got, ref)


@pytest.mark.parametrize("top_k", [None, 2])
def test_exact_kind_matches_loop_over_classes(top_k):
    torch.manual_seed(5)
    model = reference.float64_copy(models.mlp(classes=4))
    x, y = _data(7, seed=5)
    ref = reference.exact_fisher(model, reference.split(x), top_k=top_k)
    got = diagonal_fisher(model, reference.in_batches(x, y, [4, 3]), kind="exact", top_k=top_k)
    reference.assert_matches(got, ref)
    if top_k is not None:  # no renormalisation: strictly below the full sum somewhere
        full = reference.exact_fisher(model, reference.split(x))
        assert all((got[n] <= full[n] + 1e-12).all() for n in got)
        assert any((got[n] < full[n] - 1e-9).any() for n in got)


def test_true_kind_is_unbiased_for_exact_and_follows_the_rng():
    torch.manual_seed(6)
    model = reference.float64_copy(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)))
    x, _ = _data(4, d_in=3, seed=6)
    exact = diagonal_fisher(model, [x], kind="exact")
    repeats = 400
    data = [x.repeat(100, 1) for _ in range(repeats // 100)]
    torch.manual_seed(123)
    sampled = diagonal_fisher(model, data, kind="true")
    torch.manual_seed(123)
    again = diagonal_fisher(model, data, kind="true")
    for n in exact:
        torch.testing.assert_close(sampled[n], again[n], rtol=0, atol=0)
        scale = exact[n].abs().max()
        assert (sampled[n] - exact[n]).abs().max() < 0.15 * scale, n
    torch.manual_seed(7)
    one_draw = diagonal_fisher(model, [x], kind="true")
    assert any(not torch.allclose(one_draw[n], exact[n]) for n in exact)


def test_bf16_model_accumulates_in_float32():
    torch.manual_seed(8)
    model = models.randomise_norm_stats(models.CNN())
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 3, 9, 10, generator=gen)
    y = torch.randint(0, 5, (6,), generator=gen)
    ref = reference.per_sample_importance(reference.float64_copy(model), reference.split(x.double(), y),
                                          reference.cross_entropy_loss)
    got = diagonal_fisher(model.to(torch.bfloat16), [(x.to(torch.bfloat16), y)])
    for n, v in got.items():
        assert v.dtype == torch.float32, n
        err = (v.double() - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)
        assert err < 0.1, (n, err.item())


def test_params_subset_and_frozen_parameters():
    torch.manual_seed(9)
    model = reference.float64_copy(models.mlp())
    model[0].weight.requires_grad_(False)
    x, y = _data(5, seed=9)
    got = diagonal_fisher(model, [(x, y)])
    assert "0.weight" not in got and set(got) == {n for n, p in model.named_parameters() if p.requires_grad}
    model[0].weight.requires_grad_(True)
    ref = reference.per_sample_importance(model, reference.split(x, y), reference.cross_entropy_loss)
    model[0].weight.requires_grad_(False)
    sub = diagonal_fisher(model, [(x, y)], params=["0.weight", "module.4.bias"])
    assert list(sub) == ["0.weight", "4.bias"]
    reference.assert_matches(sub, ref, names=["0.weight", "4.bias"])
    assert model[0].weight.requires_grad is False


def test_model_mode_grads_and_flags_are_restored():
    torch.manual_seed(10)
    model = models.randomise_norm_stats(models.CNN())
    model.train()
    model.bn.eval()  # a mixed state must come back exactly
    before_modes = {n: m.training for n, m in model.named_modules()}
    model.c1.weight.grad = torch.randn_like(model.c1.weight)
    saved = model.c1.weight.grad.clone()
    model.c2.weight.requires_grad_(False)
    stats = model.bn.running_mean.clone()
    x = torch.randn(4, 3, 9, 10)
    y = torch.randint(0, 5, (4,))
    diagonal_fisher(model, [(x, y)])
    assert {n: m.training for n, m in model.named_modules()} == before_modes
    torch.testing.assert_close(model.c1.weight.grad, saved, rtol=0, atol=0)
    assert model.head.weight.grad is None and model.c1.bias.grad is None
    assert model.c2.weight.requires_grad is False
    torch.testing.assert_close(model.bn.running_mean, stats, rtol=0, atol=0)
    # also after an exception in the middle of the pass
    bad = [(x, y), (x * float("nan"), y)]
    with pytest.raises(ValueError, match="batch 1"):
        diagonal_fisher(model, bad)
    assert {n: m.training for n, m in model.named_modules()} == before_modes
    torch.testing.assert_close(model.c1.weight.grad, saved, rtol=0, atol=0)
    assert model.c2.weight.requires_grad is False


def test_wrapper_prefixes_are_canonical():
    torch.manual_seed(11)

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, x):
            return self.module(x)

    inner = reference.float64_copy(models.mlp())
    x, y = _data(5, seed=11)
    got = diagonal_fisher(Wrapper(inner), [(x, y)])
    reference.assert_matches(got, reference.per_sample_importance(inner, reference.split(x, y), reference.cross_entropy_loss))


def test_progress_bar(capsys):
    model = reference.float64_copy(models.mlp())
    x, y = _data(4)
    diagonal_fisher(model, [(x, y)], verbose=False)
    assert "Importance-bar" not in capsys.readouterr().err
    diagonal_fisher(model, [(x, y)], verbose=True, desc="Importance-bar")
    assert "Importance-bar" in capsys.readouterr().err


# --------------------------------------------------------------------------- errors


def test_empty_data_raises():
    with pytest.raises(ValueError, match="no samples"):
        diagonal_fisher(models.mlp(), [])


def test_nan_loss_names_the_batch():
    model = models.mlp()
    x, y = _data(4, dtype=torch.float32)
    x2 = x.clone()
    x2[2] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite per-sample loss in batch 1 \(samples \[2\]\)"):
        diagonal_fisher(model, [(x, y), (x2, y)])


@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e20), (torch.float64, 1e160)])
def test_non_finite_fisher_names_the_parameter(dtype, big):
    """Float32 accumulators check finiteness in the pass that divides by the sample count, float64 in its own."""
    model = nn.Linear(3, 2).to(dtype)
    x = torch.full((2, 3), big, dtype=dtype)
    with pytest.raises(ValueError, match=r"non-finite importance after 1 batch\(es\) for parameter\(s\) \['weight'\]"):
        diagonal_fisher(model, [(x, torch.tensor([0, 1]))])


@pytest.mark.parametrize("loss_fn", [
    lambda out, t: F.cross_entropy(out, t),  # scalar
    lambda out, t: F.cross_entropy(out, t, reduction="none")[:-1],  # wrong length
    lambda out, t: F.cross_entropy(out, t, reduction="none")[:, None],  # [B, 1]
])
def test_loss_must_be_per_sample(loss_fn):
    x, y = _data(4, dtype=torch.float32)
    with pytest.raises(ValueError, match="per-sample|one loss per sample"):
        diagonal_fisher(models.mlp(), [(x, y)], loss_fn)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="fisher"), "kind must be"),
    (dict(kind="true", loss_fn=lambda o, t: o.sum(1)), "loss_fn is only accepted"),
    (dict(kind="exact", loss_fn=lambda o, t: o.sum(1)), "loss_fn is only accepted"),
    (dict(top_k=2), "top_k is only meaningful"),
    (dict(kind="exact", top_k=0), "top_k must be an int >= 1"),
    (dict(params=["nope.weight"]), "no parameter 'nope.weight'"),
    (dict(max_samples=0), "max_samples"),
])
def test_argument_errors(kwargs, match):
    x, y = _data(3, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        diagonal_fisher(models.mlp(), [(x, y)], **kwargs)


def test_true_and_exact_need_logits():
    model = nn.Sequential(nn.Linear(7, 4), nn.Unflatten(1, (2, 2)))
    x, y = _data(3, dtype=torch.float32)
    for kind in ("true", "exact"):
        with pytest.raises(ValueError, match=r"logits outputs of shape \[B, C\]"):
            diagonal_fisher(model, [(x, y)], kind=kind)


def test_batch_norm_with_batch_statistics_is_rejected():
    model = nn.Sequential(nn.Linear(7, 4), nn.BatchNorm1d(4, track_running_stats=False))
    x, y = _data(3, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch statistics"):
        diagonal_fisher(model, [(x, y)])


def test_pass_leaves_no_autograd_graph_alive():
    """Nothing of a batch's graph survives the pass (a leaked graph keeps its saved inputs)."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))

    def run():
        x = torch.randn(4, 6)
        ref = weakref.ref(x)
        diagonal_fisher(model, [(x, torch.tensor([0, 1, 2, 0]))], verbose=False)
        return ref

    ref = run()
    gc.collect()
    assert ref() is None


# --------------------------------------------------------------------------- labels, targets, outputs


def test_ignored_labels_are_not_samples():
    """Label -100 has no loss and is not counted: partly ignored data does not dilute the Fisher."""
    torch.manual_seed(3)
    model = reference.float64_copy(models.mlp())
    x, y = _data(9, seed=3)
    y_ignored = y.clone()
    y_ignored[[1, 4, 8]] = -100
    keep = y_ignored != -100
    ref = reference.per_sample_importance(model, reference.split(x[keep], y[keep]), reference.cross_entropy_loss)
    reference.assert_matches(diagonal_fisher(model, reference.in_batches(x, y_ignored, [5, 4])), ref)
    with pytest.raises(ValueError, match="ignore index -100"):
        diagonal_fisher(model, [(x, torch.full_like(y, -100))])


def test_sequences_without_targets_are_not_samples():
    """Per-sequence losses with [B, S] integer targets: a sequence whose targets are all -100 does not count."""
    torch.manual_seed(4)
    model = reference.float64_copy(nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7)))
    x = torch.randint(0, 7, (5, 3))
    t = torch.randint(0, 7, (5, 3))
    t[2] = -100

    def loss_fn(logits, targets):
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100)
        return nll.sum(1)

    got = diagonal_fisher(model, [(x, t)], loss_fn)
    keep = torch.tensor([0, 1, 3, 4])
    ref = reference.per_sample_importance(model, reference.split(x[keep], t[keep]), lambda m, xs, ts: loss_fn(m(xs), ts).sum())
    reference.assert_matches(got, ref)


def test_float_targets_need_a_loss_fn_and_the_documented_squared_error_works():
    torch.manual_seed(5)
    model = reference.float64_copy(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)))
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randn(7, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="loss_fn=.*square"):
        diagonal_fisher(model, [(x, y)])
    with pytest.raises(TypeError, match="loss_fn"):
        diagonal_fisher(model, [(x, y[:, 0])])  # one output: would have given a Fisher of 0

    def squared_error(out, target):
        return 0.5 * (out - target).square().flatten(1).sum(1)

    ref = reference.per_sample_importance(model, reference.split(x, y), lambda m, xs, ys: squared_error(m(xs), ys).sum())
    reference.assert_matches(diagonal_fisher(model, reference.in_batches(x, y, [4, 3]), squared_error), ref)


def test_labels_out_of_range_name_the_label_and_the_classes():
    x, y = _data(4, classes=4, dtype=torch.float32)
    y[2] = 7
    with pytest.raises(ValueError, match="label 7, outside \\[0, 4\\) for logits with 4 classes"):
        diagonal_fisher(models.mlp(), [(x, y)])
    y[2] = -3
    with pytest.raises(ValueError, match="label -3"):
        diagonal_fisher(models.mlp(), [(x, y)])


class _TupleOut(nn.Module):
    def __init__(self, as_dict=False):
        super().__init__()
        self.net, self.as_dict = models.mlp(), as_dict

    def forward(self, x):
        logits = self.net(x)
        return {"logits": logits, "hidden": x} if self.as_dict else (logits, x)


@pytest.mark.parametrize("as_dict", [False, True])
def test_model_outputs_that_are_not_a_tensor(as_dict):
    torch.manual_seed(6)
    model = reference.float64_copy(_TupleOut(as_dict))
    x, y = _data(6, seed=6)
    with pytest.raises(TypeError, match="output_fn"):
        diagonal_fisher(model, [(x, y)])
    with pytest.raises(TypeError, match="output_fn"):
        mas_importance(model, [x])
    pick = (lambda out: out["logits"]) if as_dict else (lambda out: out[0])
    ref = reference.per_sample_importance(model.net, reference.split(x, y), reference.cross_entropy_loss)
    reference.assert_matches(diagonal_fisher(model, [(x, y)], output_fn=pick), {f"net.{k}": v for k, v in ref.items()})
    mas_ref = reference.per_sample_importance(model.net, reference.split(x), reference.mas_loss, power=1)
    reference.assert_matches(mas_importance(model, [x], output_fn=pick), {f"net.{k}": v for k, v in mas_ref.items()})
    with pytest.raises(TypeError, match="output_fn must be callable"):
        diagonal_fisher(model, [(x, y)], output_fn="logits")


@pytest.mark.parametrize("fn", [diagonal_fisher, mas_importance])
@pytest.mark.parametrize("data, kwargs, match", [
    (None, {}, "data must be an iterable of batches"),
    (5, {}, "data must be an iterable of batches"),
    ("ok", {"max_samples": 4.0}, "max_samples must be an int"),
    ("ok", {"max_samples": True}, "max_samples must be an int"),
    ("ok", {"verbose": "yes"}, "verbose must be True, False or None"),
])
def test_argument_type_errors_name_the_argument(fn, data, kwargs, match):
    batches = [_data(3, dtype=torch.float32)] if data == "ok" else data
    with pytest.raises(TypeError, match=match):
        fn(models.mlp(), batches, **kwargs)


@pytest.mark.parametrize("kwargs, match", [(dict(desc=5), "desc must be a str"),
                                           (dict(kind="exact", top_k=True), "top_k must be an int")])
def test_fisher_only_argument_type_errors(kwargs, match):
    with pytest.raises(TypeError, match=match):
        diagonal_fisher(models.mlp(), [_data(3, dtype=torch.float32)], **kwargs)


def _identical(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_numpy_and_tensor_integers_are_accepted_for_counts():
    np = pytest.importorskip("numpy")
    model = models.mlp()
    x, y = _data(6, dtype=torch.float32)
    for fn, kwargs in ((diagonal_fisher, {}), (diagonal_fisher, {"kind": "exact"}), (mas_importance, {})):
        want = fn(model, [(x, y)], max_samples=4, **kwargs)
        for count in (np.int64(4), torch.tensor(4)):
            assert _identical(fn(model, [(x, y)], max_samples=count, **kwargs), want)
    want = diagonal_fisher(model, [(x, y)], kind="exact", top_k=2)
    for k in (np.int32(2), torch.tensor(2)):
        assert _identical(diagonal_fisher(model, [(x, y)], kind="exact", top_k=k), want)


def test_bool_labels_are_refused_by_the_default_loss():
    x, y = _data(4, classes=2, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"torch.bool.*targets.long\(\)"):
        diagonal_fisher(models.mlp(), [(x, y.bool())])


@pytest.mark.parametrize("fn", ["fisher", "mas"])
def test_empty_batches_are_skipped(fn):
    model = reference.float64_copy(models.mlp())
    x, y = _data(5)
    empty = (x[:0], y[:0])
    if fn == "fisher":
        got = diagonal_fisher(model, [empty, (x, y), empty])
        ref = reference.per_sample_importance(model, reference.split(x, y), reference.cross_entropy_loss)
    else:
        got = mas_importance(model, [empty, (x, y), empty])
        ref = reference.per_sample_importance(model, reference.split(x), reference.mas_loss, power=1)
    reference.assert_matches(got, ref)


@pytest.mark.parametrize("fn", [diagonal_fisher, mas_importance])
def test_a_batch_the_model_cannot_run_names_data_and_the_batch(fn):
    good, wrong = _data(3, dtype=torch.float32), _data(3, d_in=5, dtype=torch.float32)  # the MLP takes width 7
    for batches, where in (([wrong], "the first batch"), ([good, good, wrong], "batch 2")):
        with pytest.raises(ValueError, match=f"data: the model's forward failed on {where}") as info:
            fn(models.mlp(), batches)
        assert isinstance(info.value.__cause__, RuntimeError)
