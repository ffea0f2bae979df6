"""Atomicity and validation: every call that raises leaves the strategy and the model exactly as they were.

Each bad input is tried on a consolidated strategy; the strategy's ``state_dict()`` and the
model's parameters (values, ``.grad``, ``requires_grad``, train mode) are compared before
and after, bit for bit.
"""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import fastcl
import fastcl.strategies.base as base_module

from .conftest import make_mlp, perturb_


def same(a, b) -> bool:
    """Deep equality of states: tensors bit for bit (dtype too), floats with NaN == NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bits(a).equal(bits(b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def bits(t):
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def model_state(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
    }


def model_same(a, b):
    return (a["requires_grad"] == b["requires_grad"] and a["training"] == b["training"] and same(a["params"], b["params"])
            and all((x is None and y is None) or (x is not None and y is not None and same(x, y))
                    for x, y in zip(a["grads"].values(), b["grads"].values())))


def assert_unchanged(strategy, call, error, match=None):
    before, model_before = strategy.state_dict(), model_state(strategy.model)
    with pytest.raises(error, match=match):
        call()
    assert same(strategy.state_dict(), before)
    assert model_same(model_state(strategy.model), model_before)


def data(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))]


def trained_si(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si = fastcl.SI(model, strength=2.0, damping=0.3).attach(opt)
    x, y = data()[0]
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    si.consolidate()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # a path integral in progress, so omega/start are in the state
    si.detach()
    return si


def build(name):
    """A fresh consolidated strategy (and model) of kind ``name``: a deep copy of one built once."""
    if name not in _BUILT:
        _BUILT[name] = _build(name)
    return copy.deepcopy(_BUILT[name])


_BUILT = {}


def _build(name):
    model = make_mlp()
    if name == "ewc":
        reg = fastcl.EWC(model, strength=3.0)
        reg.consolidate(data(0), verbose=False)
    elif name == "online":
        reg = fastcl.EWC(model, strength=3.0, mode="online", decay=0.5)
        reg.consolidate(data(0), verbose=False)
    elif name == "mas":
        reg = fastcl.MAS(model, strength=3.0, decay=0.5)
        reg.consolidate(data(0), verbose=False)
    elif name == "si":
        reg = trained_si(model)
    elif name == "l2sp":
        reg = fastcl.L2SP(model, strength=3.0)
    elif name == "l1sp":
        reg = fastcl.L1SP(model, strength=3.0)
    else:
        reg = fastcl.LwF(model, strength=3.0, temperature=2.0)
        reg.consolidate()
    perturb_(model, seed=1)
    return reg


def edit(state, path, value):
    """A copy of ``state`` with ``state[path[0]][path[1]]...`` replaced (``del`` when value is ``DELETE``)."""
    state = {k: (dict(v) if isinstance(v, dict) else v) for k, v in state.items()}
    target = state
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    elif callable(value):
        target[path[-1]] = value(target[path[-1]])
    else:
        target[path[-1]] = value
    return state


DELETE = object()


def poke(fill, index=0):
    def change(t):
        t = t.clone()
        t.view(-1)[index] = fill
        return t
    return change


COMMON = [
    ("strength nan", ["strength"], float("nan"), ValueError, "strength"),
    ("strength negative", ["strength"], -1.0, ValueError, "strength"),
    ("strength beyond float32", ["strength"], 1e39, ValueError, "float32"),
    ("strength str", ["strength"], "3", TypeError, "strength"),
    ("strength missing", ["strength"], DELETE, ValueError, "missing"),
    ("wrong type", ["type"], "Other", ValueError, "Other"),
]
ANCHORED = COMMON + [
    ("anchors missing", ["anchors"], DELETE, ValueError, "missing"),
    ("anchor inf", ["anchors", "0.weight"], poke(float("inf")), ValueError, "not finite"),
    ("anchor nan", ["anchors", "2.bias"], poke(float("nan")), ValueError, "not finite"),
    ("anchor shape", ["anchors", "0.weight"], lambda t: t[:, :2], ValueError, "shape"),
    ("anchor not a tensor", ["anchors", "0.weight"], lambda t: t.tolist(), TypeError, "tensor"),
    ("anchor integer", ["anchors", "0.weight"], lambda t: t.long(), TypeError, "floating"),
    ("unknown parameter", ["anchors", "9.weight"], torch.zeros(1, dtype=torch.float64), ValueError, "9.weight"),
    ("anchors not a mapping", ["anchors"], [1, 2], TypeError, "mapping"),
    ("constant nan", ["constant"], float("nan"), ValueError, "constant"),
    ("constant negative", ["constant"], -1.0, ValueError, "constant"),
    ("num_consolidations negative", ["num_consolidations"], -1, ValueError, "num_consolidations"),
    ("form", ["form"], "cubic", ValueError, "form"),
]
WEIGHTED = ANCHORED + [
    ("importance missing", ["importance"], DELETE, ValueError, "missing"),
    ("importance negative", ["importance", "0.weight"], poke(-1.0), ValueError, "negative"),
    ("importance nan", ["importance", "0.bias"], poke(float("nan")), ValueError, "not finite"),
    ("importance inf", ["importance", "0.bias"], poke(float("inf")), ValueError, "not finite"),
    ("importance for fewer parameters", ["importance", "2.bias"], DELETE, ValueError, "different parameters"),
]
DECAYED = WEIGHTED + [
    ("decay 5", ["decay"], 5.0, ValueError, "decay"),
    ("decay nan", ["decay"], float("nan"), ValueError, "decay"),
]
BAD_STATES = {
    "ewc": WEIGHTED + [("decay in separate mode", ["decay"], 0.5, ValueError, "separate"),
                       ("mode", ["mode"], "online", ValueError, "mode"), ("fisher kind", ["fisher"], "diag", ValueError, "fisher")],
    "online": DECAYED,
    "mas": DECAYED,
    "si": DECAYED + [
        ("damping 0", ["damping"], 0.0, ValueError, "damping"),
        ("damping nan", ["damping"], float("nan"), ValueError, "damping"),
        ("omega nan", ["omega", "0.weight"], poke(float("nan")), ValueError, "not finite"),
        ("start without omega", ["start", "0.weight"], DELETE, ValueError, "different parameters"),
        ("steps negative", ["steps"], -1, ValueError, "steps"),
    ],
    "l2sp": ANCHORED + [("importance given", ["importance"], {"0.weight": torch.ones(7, 5, dtype=torch.float64)}, ValueError, "unweighted")],
    "l1sp": ANCHORED,
    "lwf": COMMON + [
        ("temperature negative", ["temperature"], -2.0, ValueError, "temperature"),
        ("temperature nan", ["temperature"], float("nan"), ValueError, "temperature"),
        ("temperature missing", ["temperature"], DELETE, ValueError, "missing"),
        ("teacher nan", ["teacher", "0.weight"], poke(float("nan")), ValueError, "not finite"),
        ("teacher lacks a key", ["teacher", "2.bias"], DELETE, ValueError, "lacks"),
        ("teacher extra key", ["teacher", "9.weight"], torch.zeros(1), ValueError, "9.weight"),
        ("teacher shape", ["teacher", "0.weight"], lambda t: t[:2], ValueError, "shape"),
        ("teacher not a mapping", ["teacher"], 3, TypeError, "teacher"),
    ],
}
CASES = [(name, *case) for name, cases in BAD_STATES.items() for case in cases]


@pytest.mark.parametrize("name, label, path, value, error, match", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_a_refused_state_changes_nothing(name, label, path, value, error, match):
    source, target = build(name), build(name)
    target.strength = 0.25  # differs from the state being loaded: a partial load would show
    bad = edit(source.state_dict(), path, value)
    assert_unchanged(target, lambda: target.load_state_dict(bad), error, match)


@pytest.mark.parametrize("name", list(BAD_STATES))
@pytest.mark.parametrize("state", [None, [], "state"])
def test_a_non_mapping_state_is_a_type_error(name, state):
    reg = build(name)
    assert_unchanged(reg, lambda: reg.load_state_dict(state), TypeError, "mapping")


@pytest.mark.parametrize("name", list(BAD_STATES))
def test_round_trip(name):
    source, target = build(name), build(name)
    target.strength = 0.25
    target.load_state_dict(source.state_dict())
    assert same(target.state_dict(), source.state_dict())


def test_anchor_that_overflows_float32_storage_is_refused():
    model = make_mlp(torch.float32)
    reg = fastcl.L2SP(model, 1.0)
    bad = edit(reg.state_dict(), ["anchors", "0.weight"], lambda t: poke(1e39)(t.double()))
    assert_unchanged(reg, lambda: reg.load_state_dict(bad), ValueError, "not finite")


# --------------------------------------------------------------------------- failing consolidations


@pytest.mark.parametrize("name", ["ewc", "mas"])
def test_failed_consolidation_changes_nothing(name):
    reg = build(name)
    x, y = data(3)[0]
    reg.model.train()
    reg.model[0].weight.grad = torch.ones_like(reg.model[0].weight)
    broken = [(x * float("nan"), y)]
    assert_unchanged(reg, lambda: reg.consolidate(broken, verbose=False), ValueError)


@pytest.mark.parametrize("name", ["ewc", "mas"])
def test_consolidate_options_are_keyword_only(name):
    reg = build(name)
    assert_unchanged(reg, lambda: reg.consolidate(data(3), 100), TypeError, "positional")


@pytest.mark.parametrize("importance, error, match", [
    ({}, ValueError, "empty"),
    ({"0.weight": -torch.ones(7, 5, dtype=torch.float64)}, ValueError, "negative"),
    ({"0.weight": torch.full((7, 5), float("nan"), dtype=torch.float64)}, ValueError, "not finite"),
    ({"0.weight": torch.ones(5, 7, dtype=torch.float64)}, ValueError, "shape"),
    ({"9.weight": torch.ones(1, dtype=torch.float64)}, ValueError, "9.weight"),
    ({"0.weight": [[1.0]]}, TypeError, "tensor"),
    ([1.0], TypeError, "mapping"),
])
def test_failed_fold_changes_nothing(importance, error, match):
    reg = build("ewc")
    assert_unchanged(reg, lambda: reg.fold(importance), error, match)


def test_fold_overflowing_bfloat16_storage_is_refused():
    model = make_mlp(torch.float32)
    reg = fastcl.EWC(model, 1.0, storage_dtype=torch.bfloat16)
    huge = {n: torch.full_like(p, 1e39, dtype=torch.float64) for n, p in model.named_parameters()}
    assert_unchanged(reg, lambda: reg.fold(huge), ValueError, "not finite")


def test_failed_l2sp_consolidation_changes_nothing():
    reg = build("l2sp")
    with torch.no_grad():
        reg.model[2].bias[0] = float("nan")
    assert_unchanged(reg, reg.consolidate, ValueError, "2.bias")


def test_failed_si_consolidation_changes_nothing():
    reg = build("si")
    with torch.no_grad():
        reg.model[2].bias[1] = float("inf")  # ω/(Δθ² + ξ) is then not finite
    assert_unchanged(reg, reg.consolidate, ValueError, "not finite")


def test_add_penalty_grad_assigns_new_grads_only_after_the_op_succeeded(monkeypatch):
    reg = build("ewc")
    reg.model[0].weight.grad = torch.zeros_like(reg.model[0].weight)

    def failing(*args, **kwargs):
        raise ValueError("refused by the op")

    monkeypatch.setattr(base_module, "fused_penalty", failing)
    assert_unchanged(reg, reg.add_penalty_grad_, ValueError, "refused")


def test_failed_attach_registers_no_hook():
    reg = build("l2sp")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    assert_unchanged(reg, lambda: reg.attach(opt), ValueError, "none of")
    assert not opt._optimizer_step_pre_hooks and not reg.attached


# --------------------------------------------------------------------------- hyperparameters (issue 14.13)


def test_numpy_and_tensor_scalars_are_accepted_and_stored_as_python_numbers():
    model = make_mlp()
    ewc = fastcl.EWC(model, np.float32(2.0), mode="online", decay=torch.tensor(0.5))
    exact = fastcl.EWC(model, torch.tensor(1), fisher="exact", top_k=np.int64(2))
    si = fastcl.SI(model, np.float64(1.0), damping=torch.tensor(0.25, dtype=torch.float64))
    mas = fastcl.MAS(model, 1, decay=np.float16(0.5))
    values = [ewc.strength, ewc.decay, exact.strength, si.strength, si.damping, mas.decay]
    assert values == [2.0, 0.5, 1.0, 1.0, 0.25, 0.5] and all(type(v) is float for v in values)
    assert type(exact.top_k) is int and exact.top_k == 2


@pytest.mark.parametrize("make, error", [
    (lambda m: fastcl.EWC(m, 1e39), ValueError),
    (lambda m: fastcl.EWC(m, torch.tensor([1.0, 2.0])), TypeError),
    (lambda m: fastcl.EWC(m, 1.0, mode="online", decay=5), ValueError),
    (lambda m: fastcl.EWC(m, 1.0, mode="online", decay=np.bool_(True)), TypeError),
    (lambda m: fastcl.EWC(m, 1.0, decay=0.5), ValueError),
    (lambda m: fastcl.EWC(m, 1.0, fisher="exact", top_k=0), ValueError),
    (lambda m: fastcl.EWC(m, 1.0, fisher="exact", top_k=2.0), TypeError),
    (lambda m: fastcl.EWC(m, 1.0, top_k=2), ValueError),
    (lambda m: fastcl.EWC(m, 1.0, mode="both"), ValueError),
    (lambda m: fastcl.EWC(m, 1.0, fisher="diag"), ValueError),
    (lambda m: fastcl.MAS(m, 1.0, decay=-0.1), ValueError),
    (lambda m: fastcl.L2SP(m, float("inf")), ValueError),
    (lambda m: fastcl.L1SP(m, True), TypeError),
    (lambda m: fastcl.L2SP(m, 1.0, storage_dtype=torch.float16), TypeError),
])
def test_bad_hyperparameters(make, error):
    with pytest.raises(error):
        make(make_mlp())


def test_earlier_form_key_is_still_checked():
    """States saved before the penalty's φ was called ``form`` carry it as ``"kind"``."""
    model = nn.Linear(3, 2)
    reg = fastcl.L2SP(model, strength=1.0)
    reg.consolidate()
    state = reg.state_dict()
    state["kind"] = state.pop("form")
    fastcl.L2SP(model, strength=1.0).load_state_dict(state)
    state["kind"] = "l1"
    with pytest.raises(ValueError, match="form='l1'"):
        fastcl.L2SP(model, strength=1.0).load_state_dict(state)


# --------------------------------------------------------------------------- audit follow-ups (issue 14)


@pytest.mark.parametrize("name, key", [(n, k) for n in BAD_STATES for k in build(n).state_dict()],
                         ids=[f"{n}-{k}" for n in BAD_STATES for k in build(n).state_dict()])
def test_every_key_state_dict_writes_is_required(name, key):
    source, target = build(name), build(name)
    target.strength = 0.25
    bad = edit(source.state_dict(), [key], DELETE)
    assert_unchanged(target, lambda: target.load_state_dict(bad), ValueError, rf"missing the keys \['{key}'\]")


@pytest.mark.parametrize("num, teacher", [(1, None), (0, "kept")])
def test_lwf_state_with_teacher_and_count_disagreeing_is_refused(num, teacher):
    source, target = build("lwf"), build("lwf")
    bad = dict(source.state_dict(), num_consolidations=num)
    if teacher is None:
        bad["teacher"] = None
    assert_unchanged(target, lambda: target.load_state_dict(bad), ValueError, "num_consolidations")


@pytest.mark.parametrize("name", ["ewc", "mas"])
@pytest.mark.parametrize("bad", [None, 5, 2.5])
def test_consolidate_data_that_is_no_iterable_names_data(name, bad):
    reg = build(name)
    assert_unchanged(reg, lambda: reg.consolidate(bad, verbose=False), TypeError, "data must be an iterable of batches")


@pytest.mark.parametrize("name", ["ewc", "mas"])
@pytest.mark.parametrize("batch", [0, 1])
def test_consolidate_with_inputs_the_model_cannot_take_names_data_and_the_batch(name, batch):
    reg = build(name)
    good = data(3)[0]
    wrong = (torch.randn(4, 7, dtype=torch.float64), torch.zeros(4, dtype=torch.long))  # the model takes width 5
    batches = [good, wrong] if batch else [wrong, good]
    where = "batch 1" if batch else "the first batch"
    assert_unchanged(reg, lambda: reg.consolidate(batches, verbose=False), ValueError,
                     f"data: the model's forward failed on {where}")
    with pytest.raises(ValueError) as info:
        reg.consolidate(batches, verbose=False)
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("name", ["ewc", "mas"])
def test_consolidate_max_samples_accepts_numpy_and_tensor_ints(name):
    results = []
    for max_samples in (4, np.int64(4), torch.tensor(4)):
        reg = build(name)
        reg.consolidate(data(3, n=6), max_samples=max_samples, verbose=False)
        results.append(reg.state_dict())
    assert same(results[0], results[1]) and same(results[0], results[2])


@pytest.mark.parametrize("name", ["ewc", "mas"])
@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_samples": 4.0}, TypeError, "max_samples"),
    ({"max_samples": True}, TypeError, "max_samples"),
    ({"max_samples": 0}, ValueError, "max_samples"),
    ({"verbose": "yes"}, TypeError, "verbose"),
    ({"verbose": 1}, TypeError, "verbose"),
])
def test_consolidate_bad_options_name_the_option(name, kwargs, error, match):
    reg = build(name)
    assert_unchanged(reg, lambda: reg.consolidate(data(3), **kwargs), error, match)
