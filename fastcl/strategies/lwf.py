r"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017).

A frozen copy of the model taken at :meth:`LwF.consolidate` (the teacher) labels the new
task's inputs; the student is pulled toward the teacher's softened predictions on the
old classes::

    penalty = λ · T² · mean_rows KL( softmax(z_teacher / T) ‖ softmax(z_student / T) )

computed by :func:`fastcl.distillation_loss` (fused forward + backward).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from .._names import unwrap_model
from ..ops import distillation_loss
from .base import check_strength

__all__ = ["LwF", "frozen_copy"]


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

    def __init__(self, model: torch.nn.Module, strength: float = 1.0, temperature: float = 2.0):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.model = model
        self.strength = check_strength(strength)
        self.temperature = float(temperature)
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

    def penalty(self, inputs, student_logits: torch.Tensor, old_classes: Sequence[int] | torch.Tensor | slice | None = None) -> torch.Tensor:
        """``λ · distillation_loss(student[..., old], teacher[..., old], T)``; exactly 0 before consolidation.

        ``old_classes``: indices (list / 1-D long tensor), a bool mask over the last dim,
        or a slice selecting the teacher's classes; ``None`` uses every column.
        """
        if self.teacher is None or self.strength == 0.0:
            return torch.zeros((), dtype=torch.float32, device=student_logits.device)
        teacher = self.teacher_logits(inputs)
        if teacher.shape != student_logits.shape and old_classes is None:
            raise ValueError(
                f"teacher logits {tuple(teacher.shape)} and student logits {tuple(student_logits.shape)} differ; pass old_classes"
            )
        if old_classes is not None:
            index = old_classes if isinstance(old_classes, slice) else torch.as_tensor(old_classes, device=student_logits.device)
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
        """Restore; the teacher is rebuilt as a copy of the current model with the saved weights."""
        if state.get("type") not in (None, "LwF"):
            raise ValueError(f"state_dict is for {state.get('type')}, not LwF")
        teacher = None
        if state.get("teacher") is not None:
            teacher = copy.deepcopy(unwrap_model(self.model))
            own = teacher.state_dict()
            for name, value in state["teacher"].items():
                if name not in own:
                    raise ValueError(f"teacher state has {name!r}, which the model does not have")
                if tuple(own[name].shape) != tuple(value.shape):
                    raise ValueError(f"teacher {name!r}: saved shape {tuple(value.shape)} does not match the model's {tuple(own[name].shape)}")
            teacher.load_state_dict(state["teacher"])
            teacher.eval()
            teacher.requires_grad_(False)
        self.strength = check_strength(state["strength"])
        self.temperature = float(state["temperature"])
        self.teacher = teacher
        self.num_consolidations = int(state.get("num_consolidations", 0 if teacher is None else 1))

    def __repr__(self) -> str:
        return f"LwF(strength={self.strength}, temperature={self.temperature}, consolidated={self.consolidated})"
