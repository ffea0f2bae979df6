"""LwF's distillation against a float64 formula, and what old_classes may select."""
import numpy as np
import pytest
import torch

import fastcl

from .conftest import make_mlp, perturb_


def expected_penalty(student, teacher, columns, strength, temperature):
    """λ·T²·mean over rows of KL(softmax(t/T) ‖ softmax(s/T)) over ``columns``, written out."""
    s = student.detach()[:, columns] / temperature
    t = teacher[:, columns] / temperature
    pt = t.softmax(-1)
    return strength * temperature**2 * (pt * (pt.log() - s.log_softmax(-1))).sum(-1).mean()


@pytest.fixture
def setup():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 6)).double()
    lwf = fastcl.LwF(model, strength=0.5, temperature=3.0)
    x = torch.randn(8, 5, dtype=torch.float64)
    assert lwf.penalty(x, model(x)).item() == 0.0  # exactly 0 before consolidation
    lwf.consolidate()
    teacher = model(x).detach()
    perturb_(model, scale=0.2, seed=4)
    return model, lwf, x, teacher


@pytest.mark.parametrize("old_classes, columns", [
    (None, [0, 1, 2, 3, 4, 5]),
    ([0, 2], [0, 2]),
    (torch.tensor([4, 1]), [4, 1]),
    (5, [0, 1, 2, 3, 4]),  # an int k: the first k classes (issue 14.7)
    (np.int64(2), [0, 1]),
    (torch.tensor(3), [0, 1, 2]),
    (slice(1, 4), [1, 2, 3]),
    (slice(None, None, -2), [5, 3, 1]),
    (torch.tensor([True, False, True, False, False, True]), [0, 2, 5]),
])
def test_penalty_matches_formula(setup, old_classes, columns):
    model, lwf, x, teacher = setup
    logits = model(x)
    value = lwf.penalty(x, logits, old_classes=old_classes)
    assert value.item() == pytest.approx(expected_penalty(logits, teacher, columns, 0.5, 3.0).item(), rel=1e-10)
    value.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(not p.requires_grad for p in lwf.teacher.parameters())


def test_a_wider_student_head_with_old_classes_as_an_int(setup):
    model, lwf, x, teacher = setup
    wider = torch.cat([model(x), torch.randn(8, 4, dtype=torch.float64)], dim=1)  # 4 new classes
    value = lwf.penalty(x, wider, old_classes=6)
    assert value.item() == pytest.approx(expected_penalty(wider, teacher, list(range(6)), 0.5, 3.0).item(), rel=1e-10)
    with pytest.raises(ValueError, match="pass old_classes"):
        lwf.penalty(x, wider)


@pytest.mark.parametrize("old_classes, error, match", [
    ([], ValueError, "selects no class"),
    (torch.tensor([], dtype=torch.long), ValueError, "selects no class"),
    (0, ValueError, "old_classes"),
    (7, ValueError, "exceeds"),
    (2.0, TypeError, "int"),
    (True, TypeError, "int"),
    ([0, 0, 1], ValueError, "repeated"),
    ([0, 6], ValueError, r"\[0, 6\)"),
    ([-1], ValueError, r"\[0, 6\)"),
    ([0.5], TypeError, "old_classes\\[0\\]"),
    (torch.tensor([[0, 1]]), ValueError, "1-D"),
    (torch.tensor([0.0, 1.0]), TypeError, "integer"),
    (torch.tensor([True, False]), ValueError, "one entry per teacher class"),
    (slice(3, 3), ValueError, "selects no class"),
    (slice(0, 9), ValueError, "past"),
    ("0,1", TypeError, "old_classes"),
])
def test_bad_old_classes(setup, old_classes, error, match):
    model, lwf, x, _ = setup
    with pytest.raises(error, match=match):
        lwf.penalty(x, model(x), old_classes=old_classes)


def test_mismatched_rows_and_bad_logits(setup):
    model, lwf, x, _ = setup
    with pytest.raises(ValueError, match="leading"):
        lwf.penalty(x, model(x)[:4])
    with pytest.raises(TypeError, match="student_logits"):
        lwf.penalty(x, model(x).argmax(1))


def test_state_round_trip():
    model = make_mlp()
    lwf = fastcl.LwF(model, 1.0, 2.0)
    lwf.consolidate()
    state = lwf.state_dict()
    perturb_(model, scale=1.0, seed=1)
    other = fastcl.LwF(model, strength=np.float32(0.5), temperature=torch.tensor(4.0))
    assert isinstance(other.temperature, float) and other.temperature == 4.0
    other.load_state_dict(state)
    assert (other.strength, other.temperature, other.num_consolidations) == (1.0, 2.0, 1)
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(other.teacher_logits(x), lwf.teacher_logits(x))


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(temperature=-2.0), dict(temperature=float("nan")),
                                    dict(temperature=1e39), dict(strength=-1.0), dict(strength=float("inf"))])
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        fastcl.LwF(make_mlp(), **kwargs)
