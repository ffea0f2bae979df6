r"""Continual learning inside PyTorch Lightning: one callback, no change to the LightningModule.

:class:`ContinualCallback` makes each ``trainer.fit(module, task_loader)`` train on
``task_loss + Σ_r penalty_r(θ) + lwf_penalty`` and consolidates at the end of the fit:

* **Weight-space regularizers** (EWC, online EWC, SI, MAS, L2-SP, L1-SP): in
  ``on_before_optimizer_step`` — once per optimizer step, after the whole accumulated
  backward and, under fp16 AMP, after Lightning's ``scaler.unscale_`` and before gradient
  clipping — the callback calls ``regularizer.add_penalty_grad_()``, the fused pass
  ``p.grad += ∂penalty/∂θ``. A weight penalty is constant within a step, so it enters
  each step's gradient with weight exactly 1 whatever ``accumulate_grad_batches``.
  SI is attached to the fit's optimizer for its path integral (its hook adds SI's
  gradient at the step; its ``add_penalty_grad_()`` then only returns the value).
* **LwF**: a forward hook on ``lwf.model`` sees every training forward of the student
  network with its inputs; the teacher (a frozen copy taken at the previous
  consolidation) runs on the same inputs, and the distillation gradient
  ``∂(λ·T²·KL)/∂z_student`` (one fused pass, :func:`fastcl.distillation_loss`) is added
  to the gradient reaching the student's logits during the task's own backward — the
  exact gradient of ``task_loss + lwf_penalty``, with no second student forward. It is
  scaled like Lightning scales the task loss (divided by ``accumulate_grad_batches``
  in automatic optimization, multiplied by the AMP loss scale).
* **Consolidation** at ``on_train_end`` (the end of each ``fit``, i.e. of each task), on
  the fit's training data (``trainer.train_dataloader``) unless ``consolidation_data``
  says otherwise: importance + anchors for EWC/MAS, the path integral for SI, a new
  anchor for L2-SP/L1-SP, a new teacher for LwF.

Give the strategies the *network* (e.g. ``module.net``), not the LightningModule: LwF's
teacher is a deep copy of its model, and a LightningModule holds its Trainer. The
network must return the logits tensor when LwF is used. One optimizer per fit.
Needs ``pip install lightning``.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - exercised only without lightning
    try:
        import pytorch_lightning as pl
    except ImportError as error:
        raise ImportError("fastcl.integrations.lightning needs PyTorch Lightning: pip install lightning") from error

from .._validate import check_int
from ..strategies import SI, LwF
from ._atomic import all_or_nothing

__all__ = ["ContinualCallback"]


def _consolidate(strategy, data, **options) -> None:
    """``strategy.consolidate`` with ``data`` when it uses data, plus the options its signature accepts."""
    params = inspect.signature(strategy.consolidate).parameters
    kwargs = {k: v for k, v in options.items() if k in params and v is not None}
    data_param = params.get("data")
    if data_param is not None and data_param.default is inspect.Parameter.empty:
        if data is None:
            raise ValueError(f"{type(strategy).__name__}.consolidate needs data; the fit has no train_dataloader")
        strategy.consolidate(data, **kwargs)
    else:
        strategy.consolidate(**kwargs)


def _check_old_classes(old_classes, lwf) -> None:
    """Early, type-level check of LwF's ``old_classes`` (the class count is known only at the first step)."""
    if old_classes is None:
        return
    if lwf is None:
        raise ValueError("old_classes selects the teacher's columns for LwF; it needs lwf=LwF(...)")
    if isinstance(old_classes, (slice, torch.Tensor)):
        return
    if isinstance(old_classes, (str, bytes)) or not (isinstance(old_classes, Sequence) or hasattr(old_classes, "__index__")):
        raise TypeError(f"old_classes must be an int, a slice, a sequence or tensor of class ids, or a bool mask; got {old_classes!r}")
    if isinstance(old_classes, Sequence):
        if not old_classes:
            raise ValueError("old_classes is empty: it must select at least one class")
        for c in old_classes:
            check_int(c, "old_classes entry", low=0)
    else:
        check_int(old_classes, "old_classes", low=1)


class ContinualCallback(pl.Callback):
    """Regularize every task's training toward the earlier tasks; consolidate at the end of each fit.

    Args:
        regularizers: one weight-space regularizer (EWC, SI, MAS, L2SP, L1SP) or a sequence of them.
        lwf: an :class:`~fastcl.LwF` on the student network (returns logits).
        old_classes: LwF's ``old_classes`` (the teacher's columns); ``None``: every column.
        consolidation_data: what to consolidate on at the end of a fit: an iterable of
            ``(inputs, targets)`` batches or a callable ``(trainer, module) -> iterable``.
            Default: the fit's ``trainer.train_dataloader``.
        forward, loss_fn: passed to ``consolidate`` of the strategies that take them
            (EWC, MAS): ``forward(model, batch) -> (outputs, targets)``, per-sample ``loss_fn``.
        consolidate: ``False`` to call :meth:`consolidate` yourself.

    Usage::

        ewc = fastcl.EWC(module.net, strength=10.0)
        trainer_kwargs = dict(max_epochs=3, callbacks=[ContinualCallback(ewc)])
        for loader in task_loaders:
            lightning.Trainer(**trainer_kwargs).fit(module, loader)   # consolidates on `loader` at the end

    ``callback.last_penalty`` / ``callback.last_lwf_penalty`` hold the latest values (floats).
    The callback's ``state_dict`` carries every strategy's state, so Lightning checkpoints resume it.
    """

    def __init__(
        self,
        regularizers=None,
        *,
        lwf: LwF | None = None,
        old_classes=None,
        consolidation_data: Iterable | Callable[[Any, Any], Iterable] | None = None,
        forward: Callable | None = None,
        loss_fn: Callable | None = None,
        consolidate: bool = True,
    ):
        super().__init__()
        if regularizers is None:
            regs: list = []
        elif isinstance(regularizers, Sequence) and not isinstance(regularizers, (str, bytes)):
            regs = list(regularizers)
        else:
            regs = [regularizers]
        for r in regs:
            if not (callable(getattr(r, "add_penalty_grad_", None)) and callable(getattr(r, "consolidate", None))):
                raise TypeError(f"regularizers must be fastcl weight-space regularizers (EWC, SI, MAS, L2SP, L1SP), got {type(r).__name__}")
        if lwf is not None and not isinstance(lwf, LwF):
            raise TypeError(f"lwf must be a fastcl.LwF, got {type(lwf).__name__}")
        for s in (*regs, *([lwf] if lwf is not None else [])):
            if isinstance(s.model, pl.LightningModule):
                raise TypeError(
                    f"give {type(s).__name__} the network inside the LightningModule (e.g. module.net), not the "
                    "LightningModule itself: it holds the Trainer, which a teacher copy or an importance pass must not touch"
                )
        if not isinstance(consolidate, bool):
            raise TypeError(f"consolidate must be a bool, got {type(consolidate).__name__}")
        for name, fn in (("forward", forward), ("loss_fn", loss_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
        if consolidation_data is not None and not callable(consolidation_data) and not isinstance(consolidation_data, Iterable):
            raise TypeError(
                "consolidation_data must be an iterable of batches, a callable (trainer, module) -> iterable, or None; "
                f"got {type(consolidation_data).__name__}"
            )
        _check_old_classes(old_classes, lwf)
        self.regularizers = regs
        self.lwf = lwf
        self.old_classes = old_classes
        self.consolidation_data = consolidation_data
        self.forward, self.loss_fn = forward, loss_fn
        self.auto_consolidate = consolidate
        self.last_penalty = 0.0
        self.last_lwf_penalty = 0.0
        self._hook = None
        self._trainer = None
        self._unused_outputs = 0
        self._warned_unused = False

    # ------------------------------------------------------------------ fit lifecycle
    def on_train_start(self, trainer, pl_module) -> None:
        optimizers = list(trainer.optimizers)
        if len(optimizers) > 1 and self.regularizers:
            raise NotImplementedError("ContinualCallback supports one optimizer per fit (the penalty is added once per step)")
        self._trainer = trainer
        for r in self.regularizers:
            if isinstance(r, SI):
                r.detach()
                if optimizers:
                    r.attach(optimizers[0])  # the step hook sees gradients GradScaler already unscaled
        if self.lwf is not None and self._hook is None:
            self._hook = self.lwf.model.register_forward_hook(self._distill_hook, with_kwargs=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self._remove_hook()
        for r in self.regularizers:
            if isinstance(r, SI):
                r.detach()
        if self.auto_consolidate:
            data = self.consolidation_data
            if callable(data):
                data = data(trainer, pl_module)
            elif data is None:
                data = trainer.train_dataloader
            self.consolidate(data)
        self._trainer = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_hook()
        for r in self.regularizers:
            if isinstance(r, SI):
                r.detach()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def consolidate(self, data=None) -> None:
        """End of a task: consolidate every regularizer on ``data`` and snapshot LwF's teacher.

        All or nothing: if one of them raises, none changes.
        """
        with all_or_nothing(self._strategies()):
            for r in self.regularizers:
                _consolidate(r, data, forward=self.forward, loss_fn=self.loss_fn, verbose=False)
            if self.lwf is not None:
                self.lwf.consolidate()

    def _strategies(self) -> list:
        return [*self.regularizers, *([self.lwf] if self.lwf is not None else [])]

    # ------------------------------------------------------------------ the step
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        total = 0.0
        for r in self.regularizers:
            total += float(r.add_penalty_grad_())
        self.last_penalty = total
        if not math.isfinite(total):  # caught at the step that diverged, not later in consolidate()
            raise FloatingPointError(
                f"the regularizer penalty is {total} at step {trainer.global_step}: training diverged. Lower the strength "
                "(README: Choosing strength; a strength ported from Avalanche's ewc_lambda is 2·ewc_lambda/batch_size) "
                "or the learning rate"
            )
        if self._unused_outputs and not self._warned_unused:
            warnings.warn(
                f"ContinualCallback: {self._unused_outputs} output(s) of the LwF student in training received no "
                "gradient, so they got no distillation term (is the network's output used in the loss?)",
                stacklevel=2,
            )
            self._warned_unused = True
        self._unused_outputs = 0

    def _loss_multiplier(self) -> float:
        """How Lightning scales the task loss before backward: AMP loss scale / accumulation."""
        trainer = self._trainer
        if trainer is None:
            return 1.0
        scale = 1.0
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale = float(scaler.get_scale())
        module = trainer.lightning_module
        if module is not None and module.automatic_optimization:
            scale /= trainer.accumulate_grad_batches
        return scale

    def _distill_hook(self, module, args, kwargs, output):
        if not (module.training and torch.is_grad_enabled()) or self.lwf is None or not self.lwf.consolidated:
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"LwF through ContinualCallback needs {type(module).__name__}.forward to return the logits tensor, "
                f"got {type(output).__name__}; give LwF a module that returns logits"
            )
        if not output.requires_grad:
            return None
        if kwargs:
            raise TypeError("LwF through ContinualCallback needs the network called with positional inputs only")
        student = output.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self.lwf.penalty(args[0] if len(args) == 1 else tuple(args), student, old_classes=self.old_classes)
            (grad,) = torch.autograd.grad(value, student, allow_unused=True)
        self.last_lwf_penalty = float(value.detach())
        if grad is None:
            return None
        self._unused_outputs += 1

        def add_distillation_grad(g: torch.Tensor) -> torch.Tensor:
            self._unused_outputs -= 1
            return g + (grad * self._loss_multiplier()).to(g.dtype)

        output.register_hook(add_distillation_grad)
        return None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "regularizers": [r.state_dict() for r in self.regularizers],
            "lwf": None if self.lwf is None else self.lwf.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore every strategy from :meth:`state_dict`; all or nothing: if one state is bad, none changes."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping from ContinualCallback.state_dict(), got {type(state_dict).__name__}")
        if "regularizers" not in state_dict:
            raise ValueError("state_dict has no 'regularizers' entry (expected ContinualCallback.state_dict())")
        regs = state_dict["regularizers"]
        if not isinstance(regs, (list, tuple)):
            raise TypeError(f"state_dict['regularizers'] must be a list of regularizer states, got {type(regs).__name__}")
        if len(regs) != len(self.regularizers) or (state_dict.get("lwf") is None) != (self.lwf is None):
            raise ValueError(
                f"checkpoint holds {len(regs)} regularizer(s) and {'an' if state_dict.get('lwf') else 'no'} LwF state; "
                f"this callback has {len(self.regularizers)} and {'an' if self.lwf else 'no'} LwF"
            )
        with all_or_nothing(self._strategies()):
            for r, s in zip(self.regularizers, regs):
                r.load_state_dict(s)
            if self.lwf is not None:
                self.lwf.load_state_dict(state_dict["lwf"])
