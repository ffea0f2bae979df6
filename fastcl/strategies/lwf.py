r"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017).

A frozen copy of the model taken at :meth:`LwF.consolidate` (the teacher) labels the new
task's inputs; the student is pulled toward the teacher's softened predictions on the
old classes::

    penalty = λ · T² · mean_rows KL( softmax(z_teacher / T) ‖ softmax(z_student / T) )

computed by :func:`fastcl.distillation_loss` (fused forward + backward).
"""
from __future__ import annotations

import copy
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._names import unwrap_model
from .._validate import check_int, check_real, is_real_scalar
from ..ops import distillation_loss
from .base import check_strength

__all__ = ["LwF", "check_temperature", "class_index", "frozen_copy"]


def check_temperature(value: Any, name: str = "temperature") -> float:
    """``value`` as a float ``> 0`` (finite in float32)."""
    return check_real(value, name, low=0.0, low_inclusive=False)


def class_index(old_classes: Any, num_student: int, num_teacher: int, device: torch.device) -> slice | torch.Tensor:
    """The columns ``old_classes`` selects in both the student's and the teacher's logits.

    ``int k``: the first ``k`` classes (``0 .. k-1``); a slice; a sequence or 1-D integer
    tensor of distinct class ids; or a 1-D bool mask over the teacher's classes. Every
    selected id must exist in both outputs; an empty selection is refused.
    """
    limit = min(num_student, num_teacher)
    what = f"the student has {num_student} classes and the teacher {num_teacher}"
    if is_real_scalar(old_classes) or isinstance(old_classes, numbers.Number):
        k = check_int(old_classes, "old_classes", low=1)
        if k > limit:
            raise ValueError(f"old_classes={k} (the first {k} classes) exceeds the classes available: {what}")
        return slice(0, k)
    if isinstance(old_classes, slice):
        chosen = range(limit)[old_classes]
        if len(chosen) == 0:
            raise ValueError(f"old_classes={old_classes} selects no class ({what})")
        if old_classes.stop is not None and old_classes.stop > limit:
            raise ValueError(f"old_classes={old_classes} reaches past the classes available: {what}")
        start, stop, step = old_classes.indices(limit)  # negative bounds refer to the classes both outputs have
        return slice(start, stop, step) if step > 0 else torch.tensor(list(chosen), dtype=torch.long, device=device)
    if isinstance(old_classes, torch.Tensor):
        index = old_classes.detach()
    elif isinstance(old_classes, Sequence) and not isinstance(old_classes, (str, bytes)):
        index = torch.tensor([check_int(v, f"old_classes[{i}]") for i, v in enumerate(old_classes)], dtype=torch.long)
    else:
        raise TypeError(f"old_classes must be an int, a slice, a sequence or tensor of class ids, or a bool mask; got {type(old_classes).__name__}")
    if index.dim() != 1:
        raise ValueError(f"old_classes must be 1-D, got shape {tuple(index.shape)}")
    if index.dtype == torch.bool:
        if index.numel() != num_teacher:
            raise ValueError(f"old_classes as a bool mask must have one entry per teacher class ({num_teacher}), got {index.numel()}")
        index = index.nonzero().flatten()
    elif index.is_floating_point() or index.is_complex():
        raise TypeError(f"old_classes must hold integer class ids, got dtype {index.dtype}")
    if index.numel() == 0:
        raise ValueError("old_classes selects no class; pass None to distill over every class")
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= limit:
        raise ValueError(f"old_classes must be class ids in [0, {limit}) ({what}), got ids from {lo} to {hi}")
    if torch.unique(index).numel() != index.numel():
        raise ValueError("old_classes has repeated class ids (each would count twice in the softmax)")
    return index.to(device=device, dtype=torch.long)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of the unwrapped ``model`` in eval mode with every parameter frozen (a teacher)."""
    teacher = copy.deepcopy(unwrap_model(model))
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class LwF:
    """Distillation toward the model as it was at the last :meth:`consolidate`.

    Usage::

        lwf = fastcl.LwF(model, strength=1.0, temperature=2.0)
        for task in tasks:
            for x, y in loader:
                logits = model(x)
                loss = F.cross_entropy(logits, y) + lwf.penalty(x, logits, old_classes=seen)
                ...
            lwf.consolidate()
    """

    consolidation_input = None

    def __init__(self, model: torch.nn.Module, strength: float = 1.0, temperature: float = 2.0):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.strength = check_strength(strength)
        self.temperature = check_temperature(temperature)
        self.teacher: torch.nn.Module | None = None
        self.num_consolidations = 0

    @property
    def consolidated(self) -> bool:
        return self.teacher is not None

    def consolidate(self, data=None) -> None:
        """Snapshot the current model as the teacher (eval mode, no gradients). ``data`` is ignored."""
        self.teacher = frozen_copy(self.model)
        self.num_consolidations += 1

    @torch.no_grad()
    def teacher_logits(self, inputs) -> torch.Tensor:
        """The teacher's outputs for ``inputs`` (a tensor, or a tuple passed as ``teacher(*inputs)``)."""
        if self.teacher is None:
            raise RuntimeError("LwF has no teacher yet: call consolidate() after the first task")
        return self.teacher(*inputs) if isinstance(inputs, (tuple, list)) else self.teacher(inputs)

    def penalty(self, inputs, student_logits: torch.Tensor, old_classes: int | Sequence[int] | torch.Tensor | slice | None = None) -> torch.Tensor:
        """``λ · distillation_loss(student[..., old], teacher[..., old], T)``; exactly 0 before consolidation.

        ``old_classes`` selects the teacher's classes in the last dimension: an int ``k``
        (the first ``k`` classes), a slice, class ids (list or 1-D integer tensor, distinct)
        or a bool mask over the teacher's classes; ``None`` uses every column (then the
        student and teacher outputs must have the same shape).
        """
        if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point() or student_logits.dim() == 0:
            got = f"a {student_logits.dtype} tensor of shape {tuple(student_logits.shape)}" if isinstance(student_logits, torch.Tensor) else type(student_logits).__name__
            raise TypeError(f"student_logits must be a floating-point tensor [..., classes], got {got}")
        if self.teacher is None or self.strength == 0.0:
            return torch.zeros((), dtype=torch.float32, device=student_logits.device)
        teacher = self.teacher_logits(inputs)
        if not isinstance(teacher, torch.Tensor):
            raise TypeError(f"the teacher returned {type(teacher).__name__}; LwF needs a model whose output is the logits tensor")
        if teacher.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(
                f"teacher logits {tuple(teacher.shape)} and student logits {tuple(student_logits.shape)} differ "
                "in their leading (sample) dimensions; were they computed from the same inputs?"
            )
        if old_classes is None:
            if teacher.shape != student_logits.shape:
                raise ValueError(
                    f"teacher logits {tuple(teacher.shape)} and student logits {tuple(student_logits.shape)} differ; pass old_classes"
                )
        else:
            index = class_index(old_classes, student_logits.shape[-1], teacher.shape[-1], student_logits.device)
            student_logits = student_logits[..., index]
            teacher = teacher[..., index]
        return self.strength * distillation_loss(student_logits, teacher, self.temperature)

    def state_dict(self) -> dict:
        return {
            "type": "LwF",
            "strength": self.strength,
            "temperature": self.temperature,
            "num_consolidations": self.num_consolidations,
            "teacher": None if self.teacher is None else {k: v.clone() for k, v in self.teacher.state_dict().items()},
        }

    def load_state_dict(self, state) -> None:
        """Restore; the teacher is rebuilt as a copy of the current model with the saved weights.

        Everything is validated first (keys, hyperparameters, the teacher's names, shapes
        and finite values); a refused state raises and changes nothing.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict must be a mapping as returned by state_dict(), got {type(state).__name__}")
        missing = [k for k in ("type", "strength", "temperature", "num_consolidations", "teacher") if k not in state]
        if missing:
            raise ValueError(f"state_dict is missing the keys {missing}; expected every key of LwF.state_dict()")
        if state["type"] != "LwF":
            raise ValueError(f"state_dict is for {state['type']}, not LwF")
        strength = check_strength(state["strength"], "state_dict['strength']")
        temperature = check_temperature(state["temperature"], "state_dict['temperature']")
        saved = state["teacher"]
        num = check_int(state["num_consolidations"], "state_dict['num_consolidations']", low=0)
        if (saved is None) != (num == 0):
            raise ValueError(
                f"state_dict is inconsistent: num_consolidations={num} but teacher is "
                f"{'None' if saved is None else 'present'} (a teacher exists exactly when num_consolidations >= 1)"
            )
        teacher = None
        if saved is not None:
            if not isinstance(saved, Mapping):
                raise TypeError(f"state_dict['teacher'] must be None or a model state_dict, got {type(saved).__name__}")
            teacher = copy.deepcopy(unwrap_model(self.model))
            own = teacher.state_dict()
            absent = sorted(set(own) - set(saved))
            if absent:
                raise ValueError(f"state_dict['teacher'] lacks {absent[:5]} of the model")
            for name, value in saved.items():
                if name not in own:
                    raise ValueError(f"teacher state has {name!r}, which the model does not have")
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"teacher {name!r} must be a tensor, got {type(value).__name__}")
                if tuple(own[name].shape) != tuple(value.shape):
                    raise ValueError(f"teacher {name!r}: saved shape {tuple(value.shape)} does not match the model's {tuple(own[name].shape)}")
                if value.is_floating_point() and not torch.isfinite(value).all():
                    raise ValueError(f"teacher {name!r} is not finite (NaN or inf); state left unchanged")
            teacher.load_state_dict(saved)
            teacher.eval()
            teacher.requires_grad_(False)
        self.strength, self.temperature, self.teacher, self.num_consolidations = strength, temperature, teacher, num

    def __repr__(self) -> str:
        return f"LwF(strength={self.strength}, temperature={self.temperature}, consolidated={self.consolidated})"
