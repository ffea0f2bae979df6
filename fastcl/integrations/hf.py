r"""Continual learning inside Hugging Face ``transformers``.

Three pieces, usable together or alone:

* :class:`ContinualTrainer` (a ``transformers.Trainer``) and :class:`ContinualTrainerMixin`
  (for other ``Trainer`` subclasses, e.g. TRL's) add to the training loss::

      loss = task_loss + Σ_r penalty_r(θ) + lwf_penalty(batch)

  with any fastcl regularizer (EWC, online EWC, SI, MAS, L2-SP, L1-SP) and/or a
  :class:`CausalLMLwF`. Gradient accumulation: every penalty enters each optimizer step's
  gradient with total weight exactly 1. Each micro-batch adds ``penalty / k`` (``k``
  micro-batches in the step) in the units the ``Trainer`` uses for the task loss, i.e.
  ``penalty / k`` when the task loss is already normalised over the whole accumulated
  batch (``num_items_in_batch``), ``penalty`` when ``Trainer.training_step`` divides the
  loss by ``k`` itself. A weight penalty is constant within a step (θ does not change),
  so its contribution is exactly the penalty; the LwF term contributes the mean of the
  micro-batches' per-token means. Mixed precision: penalties are computed with autocast
  off, in float32 (float64 for float64 models). Evaluation losses stay the task loss.

* :func:`causal_lm_forward` and :func:`causal_lm_per_sequence_loss` make
  ``EWC.consolidate(dataloader, forward=causal_lm_forward, loss_fn=causal_lm_per_sequence_loss)``
  compute the exact per-sequence diagonal Fisher ``F = (1/N) Σ_n (∂ℓ_n/∂θ)²`` with
  ``ℓ_n`` the mean next-token NLL of sequence ``n`` over its unmasked tokens;
  :func:`sequence_classification_forward` and :func:`sequence_classification_per_sample_loss`
  do the same for ``*ForSequenceClassification`` models (``ℓ_n`` from ``labels``).

* :class:`CausalLMLwF`: Learning without Forgetting for causal LMs. The distillation runs
  through :func:`fastcl.fused_linear_distillation` on the final hidden states and the LM
  head, so neither the student's second use of the logits nor the teacher's logits are
  ever materialised as a ``[tokens, vocab]`` tensor. The teacher is a frozen copy of the
  model, or, for PEFT/LoRA models, the same model with its adapters disabled (no second
  copy of the base weights).

Limits: the LM head must be a plain ``nn.Linear`` with ``logits = head(last_hidden_state)``
(no softcapping / logit scaling, no LoRA on the head), and reading the head weight
outside the forward pass rules out FSDP / ZeRO-3 sharded heads for :class:`CausalLMLwF`.
Under DDP each rank consolidates EWC/MAS on its own shard of the data; the all-reduced
penalty gradient is then that of the mean of the per-rank Fishers.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

try:
    from transformers import Trainer
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "fastcl.integrations.hf needs the transformers package: pip install 'fastcl[hf]'"
    ) from error

from .._names import unwrap_model
from .._validate import check_int
from ..ops import fused_linear_distillation
from ..strategies import LwF
from ..strategies.base import check_strength
from ..strategies.lwf import check_temperature, frozen_copy
from ._atomic import all_or_nothing

__all__ = [
    "IGNORE_INDEX",
    "PROBLEM_TYPES",
    "CausalLMLwF",
    "ContinualTrainer",
    "ContinualTrainerMixin",
    "causal_lm_forward",
    "causal_lm_per_sequence_loss",
    "causal_lm_targets",
    "sequence_classification_forward",
    "sequence_classification_per_sample_loss",
]

IGNORE_INDEX = -100
"""Label value that marks a token as no target (the ``transformers`` convention)."""

_NOT_MODEL_INPUTS = ("labels", "shift_labels", "num_items_in_batch")


# --------------------------------------------------------------------------- small helpers


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _penalty_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device):
    """Autocast switched off on ``device`` (penalties run in their own precision)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


def _as_batch(batch) -> Mapping:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"batch must be a dict with input_ids (and optionally attention_mask, labels) or an input_ids tensor, "
            f"got {type(batch).__name__}"
        )
    if "input_ids" not in batch and "inputs_embeds" not in batch:
        raise ValueError(f"batch must contain input_ids (or inputs_embeds); it has {sorted(batch)}")
    return batch


def _model_inputs(batch: Mapping, device: torch.device | None = None) -> dict:
    """The batch without label entries, tensors moved to ``device``."""
    out = {}
    for key, value in batch.items():
        if key in _NOT_MODEL_INPUTS:
            continue
        out[key] = value.to(device, non_blocking=True) if (device is not None and isinstance(value, torch.Tensor)) else value
    return out


# --------------------------------------------------------------------------- per-sequence Fisher


def causal_lm_targets(batch) -> torch.Tensor:
    """Next-token targets ``[B, S]`` (unshifted) with ``IGNORE_INDEX`` where no loss is taken.

    ``batch["labels"]`` when present, else ``batch["input_ids"]``; positions whose
    ``attention_mask`` is 0 (padding) are set to ``IGNORE_INDEX`` either way.
    """
    batch = _as_batch(batch)
    labels = batch.get("labels")
    if labels is None:
        if "input_ids" not in batch:
            raise ValueError("a batch with inputs_embeds needs labels")
        labels = batch["input_ids"]
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a [batch, sequence] tensor, got {got}")
    mask = batch.get("attention_mask")
    if mask is not None:
        if tuple(mask.shape) != tuple(labels.shape):
            raise ValueError(f"attention_mask {tuple(mask.shape)} and labels {tuple(labels.shape)} differ in shape")
        labels = labels.masked_fill(mask.to(labels.device) == 0, IGNORE_INDEX)
    return labels


def _check_token_ids(model: nn.Module, batch: Mapping) -> None:
    """``input_ids`` must index the model's embedding table (else a bare IndexError deep in the forward)."""
    ids = batch.get("input_ids")
    embeddings = getattr(unwrap_model(model), "get_input_embeddings", None)
    if not isinstance(ids, torch.Tensor) or ids.numel() == 0 or not callable(embeddings):
        return
    table = embeddings()
    size = getattr(table, "num_embeddings", None)
    if size is not None and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise ValueError(f"input_ids must be token ids in [0, {size}) (the model's vocabulary), got {int(ids.min())} to {int(ids.max())}")


def causal_lm_forward(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward`` for :func:`fastcl.diagonal_fisher` / ``EWC.consolidate`` on a causal LM.

    ``batch``: a dict as a ``transformers`` data collator makes it (``input_ids``,
    optional ``attention_mask``, ``labels``...) or an ``input_ids`` tensor. Tensors are
    moved to the model's device; every entry except the labels is passed to the model.

    Returns ``(logits [B, S, V], targets [B, S])`` with targets from :func:`causal_lm_targets`.
    """
    batch = _as_batch(batch)
    device = _model_device(model)
    _check_token_ids(model, batch)
    targets = causal_lm_targets(batch).to(device, non_blocking=True)
    outputs = model(**_model_inputs(batch, device), use_cache=False)
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    if logits.dim() != 3 or logits.shape[:2] != targets.shape:
        raise ValueError(
            f"the model returned logits of shape {tuple(logits.shape)} for targets {tuple(targets.shape)}; "
            "expected [batch, sequence, vocab] (logits_to_keep must be 0)"
        )
    return logits, targets


def causal_lm_per_sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r"""Per-sequence mean next-token NLL, ``[B]``: the loss whose gradients the Fisher squares.

    ``ℓ_n = (1/|T_n|) Σ_{t ∈ T_n} −log softmax(logits[n, t])[targets[n, t+1]]`` with
    ``T_n = {t < S−1 : targets[n, t+1] ≠ IGNORE_INDEX}``; a sequence with no target gets
    ``ℓ_n = 0`` (no gradient; it still counts as a sample). Computed in float32 (float64
    for float64 logits). Note this materialises ``[B·S, V]`` float32 log-probabilities, so
    pick the Fisher batch size accordingly.
    """
    if logits.dim() != 3 or targets.dim() != 2 or logits.shape[:2] != targets.shape:
        raise ValueError(f"expected logits [B, S, V] and targets [B, S], got {tuple(logits.shape)} and {tuple(targets.shape)}")
    B, S, V = logits.shape
    acc = _penalty_dtype(logits.dtype)
    if S < 2:
        return logits.sum(dim=(1, 2)).to(acc) * 0.0
    shifted = targets[:, 1:]
    # Checked with shape-stable ops, and not under torch.func transforms (the Fisher's exact
    # fallback vmaps this loss): a value-dependent branch cannot run there, and cross_entropy
    # itself refuses an out-of-range id.
    if not torch._C._are_functorch_transforms_active():
        out_of_range = (shifted != IGNORE_INDEX) & ((shifted < 0) | (shifted >= V))
        if bool(out_of_range.any()):
            bad = shifted[out_of_range]
            raise ValueError(
                f"targets must be token ids in [0, {V}) or {IGNORE_INDEX} (no loss), got {int(bad.min())} to {int(bad.max())}"
            )
    nll = F.cross_entropy(
        logits[:, :-1, :].reshape(-1, V).to(acc), shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(B, S - 1)
    count = (shifted != IGNORE_INDEX).sum(1).clamp(min=1).to(acc)
    return nll.sum(1) / count


def _causal_lm_mas_forward(model, batch):
    """MAS on a causal LM: the logits of the unpadded positions (padding rows zeroed)."""
    logits, targets = causal_lm_forward(model, batch)
    mask = _as_batch(batch).get("attention_mask")
    if mask is not None:
        logits = logits * mask.to(device=logits.device, dtype=logits.dtype).unsqueeze(-1)
    return logits, None


# --------------------------------------------------------------------------- sequence classification


def sequence_classification_forward(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``forward`` for :func:`fastcl.diagonal_fisher` / ``EWC.consolidate`` on a ``*ForSequenceClassification`` model.

    ``batch``: a dict as a ``transformers`` data collator makes it (``input_ids``,
    ``attention_mask``, ``labels``...). Returns ``(logits [B, C], batch["labels"] or None)``;
    the labels are not passed to the model (no loss is computed there).
    """
    batch = _as_batch(batch)
    device = _model_device(model)
    labels = batch.get("labels")
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
        labels = labels.to(device, non_blocking=True)
    outputs = model(**_model_inputs(batch, device))
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    if logits.dim() != 2:
        raise ValueError(f"a sequence classifier must return logits [batch, labels], got shape {tuple(logits.shape)}")
    return logits, labels


PROBLEM_TYPES = ("single_label_classification", "regression", "multi_label_classification")
"""The ``problem_type`` values of ``transformers`` sequence classifiers."""


def sequence_classification_per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, *, problem_type: str | None = None) -> torch.Tensor:
    r"""Per-sample loss ``ℓ_n`` ``[B]`` of a sequence classifier; ``transformers`` trains on their mean.

    As ``transformers`` picks it (``problem_type``, else from the shapes and label dtype):

    * ``"single_label_classification"`` (integer labels ``[B]``, C > 1): ``ℓ_n = −log softmax(z_n)[y_n]``;
    * ``"regression"`` (float labels; C = 1 or ``[B, C]`` targets): ``ℓ_n = mean_c (z_nc − y_nc)²``;
    * ``"multi_label_classification"`` (float 0/1 labels ``[B, C]``): ``ℓ_n = mean_c BCE(z_nc, y_nc)``.

    Computed in float32 (float64 for float64 logits).
    """
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {PROBLEM_TYPES} or None, got {problem_type!r}")
    if labels is None:
        raise ValueError("the per-sample loss of a sequence classifier needs labels: the batches must contain 'labels'")
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"logits and labels must be tensors, got {type(logits).__name__} and {type(labels).__name__}")
    if logits.dim() != 2 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"expected logits [B, C] and labels with B rows, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    acc = _penalty_dtype(logits.dtype)
    z = logits.to(acc)
    num_labels = z.shape[1]
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif not labels.is_floating_point():
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "single_label_classification":
        if labels.is_floating_point() or labels.dim() != 1:
            raise ValueError(f"single-label classification needs integer labels [B], got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
            raise ValueError(f"labels must be class ids in [0, {num_labels}), got values from {int(labels.min())} to {int(labels.max())}")
        return F.cross_entropy(z, labels, reduction="none")
    target = labels.to(acc).reshape(z.shape[0], -1)
    if target.shape != z.shape:
        raise ValueError(f"{problem_type} needs labels of shape {tuple(z.shape)} (or [B] for one label), got {tuple(labels.shape)}")
    if problem_type == "regression":
        return (z - target).square().mean(1)
    return F.binary_cross_entropy_with_logits(z, target, reduction="none").mean(1)


# --------------------------------------------------------------------------- what a model is


def _model_task(model: nn.Module) -> str | None:
    """``"causal_lm"``, ``"sequence_classification"`` or ``None`` for the ``transformers`` model under wrappers."""
    name = type(_hf_model(model)).__name__
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:  # pragma: no cover - layout of an unusual transformers version
        auto = None

    def listed(mapping_name: str) -> bool:
        mapping = getattr(auto, mapping_name, {}) if auto is not None else {}
        values = [v for vs in mapping.values() for v in ((vs,) if isinstance(vs, str) else vs)]
        return name in values

    if listed("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES") or name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if listed("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES") or name.endswith("ForSequenceClassification"):
        return "sequence_classification"
    return None


def _consolidation_kwargs(model: nn.Module, task: str | None, need: str) -> dict:
    """``forward`` (and ``loss_fn``) that make ``consolidate`` read ``need`` ("loss" or "outputs") on ``model``."""
    if task == "causal_lm":
        if need == "loss":
            return {"forward": causal_lm_forward, "loss_fn": causal_lm_per_sequence_loss}
        return {"forward": _causal_lm_mas_forward}
    if task == "sequence_classification":
        if need == "loss":
            problem_type = getattr(getattr(_hf_model(model), "config", None), "problem_type", None)
            return {"forward": sequence_classification_forward,
                    "loss_fn": functools.partial(sequence_classification_per_sample_loss, problem_type=problem_type)}
        return {"forward": sequence_classification_forward}
    raise TypeError(f"ContinualTrainer cannot consolidate on {type(_hf_model(model)).__name__}")


# --------------------------------------------------------------------------- LwF for causal LMs


def _hf_model(model: nn.Module) -> nn.Module:
    """The ``transformers`` model under DDP / compile / PEFT wrappers."""
    model = unwrap_model(model)
    get_base = getattr(model, "get_base_model", None)  # peft.PeftModel
    if callable(get_base):
        model = get_base()
    return model


def _decoder_of(model: nn.Module) -> nn.Module:
    """The module whose ``last_hidden_state`` feeds the LM head (``LlamaForCausalLM.model``...)."""
    hf = _hf_model(model)
    decoder = hf.get_decoder() if callable(getattr(hf, "get_decoder", None)) else None
    if not isinstance(decoder, nn.Module) or decoder is hf:
        prefix = getattr(hf, "base_model_prefix", None)
        decoder = getattr(hf, prefix, None) if prefix else None
    if not isinstance(decoder, nn.Module) or decoder is hf:
        raise TypeError(
            f"cannot find the decoder of {type(hf).__name__} (the module whose last_hidden_state feeds the LM head); "
            "CausalLMLwF supports transformers *ForCausalLM models"
        )
    return decoder


def _head_of(model: nn.Module) -> nn.Linear:
    hf = _hf_model(model)
    head = hf.get_output_embeddings() if callable(getattr(hf, "get_output_embeddings", None)) else None
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"CausalLMLwF needs the LM head of {type(hf).__name__} to be a torch.nn.Linear, got "
            f"{type(head).__name__} (LoRA or modules_to_save on the LM head are not supported)"
        )
    return head


def _check_plain_head(model: nn.Module) -> None:
    config = getattr(_hf_model(model), "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if softcap is not None or (scale is not None and scale != 1.0):
        raise ValueError(
            f"{type(_hf_model(model)).__name__} transforms its logits after the LM head (softcapping or logit_scale), "
            "so logits ≠ head(hidden); CausalLMLwF's fused path would distill the wrong distribution"
        )


@contextlib.contextmanager
def _modes(model: nn.Module, training: bool):
    saved = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for m, mode in saved.items():
            m.training = mode


class _Captured:
    hidden: torch.Tensor | None = None


class CausalLMLwF:
    r"""Learning without Forgetting for causal LMs, on hidden states and the LM head (fused).

    With student hidden states ``h`` and head ``(W, b)``, teacher hidden states ``h'`` and
    head ``(W', b')``, and the unpadded token positions ``M`` (``attention_mask == 1``)::

        penalty = λ · T² · (1/|M|) Σ_{i ∈ M} KL( softmax((h'_i W'ᵀ + b')/T) ‖ softmax((h_i Wᵀ + b)/T) )

    evaluated by :func:`fastcl.fused_linear_distillation` in row chunks, so no
    ``[tokens, vocab]`` logits are stored for it.

    Args:
        model: a ``transformers`` ``*ForCausalLM`` (optionally PEFT-wrapped) whose logits
            are ``lm_head(last_hidden_state)``.
        strength: λ ≥ 0.
        temperature: T > 0.
        teacher: ``"copy"`` — :meth:`consolidate` stores a frozen deep copy of the model;
            ``"disable_adapter"`` — the teacher is the same PEFT model run inside
            ``model.disable_adapter()`` (the base weights, no second copy).
        chunk_size: rows per chunk of the fused op (default: the op's ~256 MiB budget).

    With :class:`ContinualTrainer` pass it as ``lwf=``. By hand::

        lwf = CausalLMLwF(model, strength=1.0); lwf.consolidate()      # after task A
        with lwf.capture_student() as cap:
            out = model(**batch)
        loss = out.loss + lwf.penalty(batch, cap.hidden)
    """

    TEACHERS = ("copy", "disable_adapter")
    consolidation_input = None

    def __init__(self, model: nn.Module, strength: float = 1.0, temperature: float = 2.0, *, teacher: str = "copy", chunk_size: int | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        temperature = check_temperature(temperature)
        strength = check_strength(strength)
        if teacher not in self.TEACHERS:
            raise ValueError(f"teacher must be one of {self.TEACHERS}, got {teacher!r}")
        if teacher == "disable_adapter" and not callable(getattr(unwrap_model(model), "disable_adapter", None)):
            raise TypeError(f'teacher="disable_adapter" needs a PEFT model with disable_adapter(), got {type(unwrap_model(model)).__name__}')
        if chunk_size is not None:
            chunk_size = check_int(chunk_size, "chunk_size", low=1)
        _check_plain_head(model)
        _head_of(model)
        _decoder_of(model)
        self.model = model
        self.strength = strength
        self.temperature = temperature
        self.teacher_mode = teacher
        self.chunk_size = chunk_size
        self.teacher: nn.Module | None = None
        self.num_consolidations = 0

    @property
    def consolidated(self) -> bool:
        return self.num_consolidations > 0

    @property
    def active(self) -> bool:
        """True when :meth:`penalty` can be non-zero (consolidated and λ > 0)."""
        return self.consolidated and self.strength > 0.0

    def consolidate(self, data=None) -> None:
        """End of a task: the current model becomes the teacher. ``data`` is ignored.

        ``"copy"``: a frozen deep copy (eval mode, no gradients). ``"disable_adapter"``:
        nothing is stored; the teacher is the base model under the adapters.
        """
        if self.teacher_mode == "copy":
            self.teacher = frozen_copy(self.model)
        self.num_consolidations += 1

    @torch.no_grad()
    def teacher_outputs(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(hidden [B, S, H], head weight [V, H], head bias or None)`` of the teacher, in eval mode."""
        if not self.consolidated:
            raise RuntimeError("CausalLMLwF has no teacher yet: call consolidate() after the first task")
        batch = _as_batch(batch)
        device = _model_device(self.model)
        inputs = _model_inputs(batch, device)
        if self.teacher_mode == "copy":
            if _model_device(self.teacher) != device:
                self.teacher.to(device)
            hidden = self._hidden(self.teacher, inputs)
            head = _head_of(self.teacher)
        else:
            model = unwrap_model(self.model)
            with _modes(model, False), model.disable_adapter():
                hidden = self._hidden(model, inputs)
            head = _head_of(model)
        return hidden, head.weight.detach(), None if head.bias is None else head.bias.detach()

    @staticmethod
    def _hidden(model: nn.Module, inputs: dict) -> torch.Tensor:
        out = _decoder_of(model)(**inputs, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    @contextlib.contextmanager
    def capture_student(self):
        """Within the block, the input of the student's LM head (its final hidden states) is kept.

        Yields an object whose ``.hidden`` is that tensor after the model's forward pass.
        """
        captured = _Captured()

        def hook(module, args, output):
            captured.hidden = args[0]

        handle = _head_of(self.model).register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()

    def penalty(self, batch, student_hidden: torch.Tensor, teacher: tuple | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``λ · T² · mean over unpadded tokens of KL(teacher ‖ student)``; 0 before consolidation.

        Args:
            batch: the model inputs (dict with ``input_ids``, ``attention_mask``...).
            student_hidden: ``[B, S, H]`` final hidden states of the student (as fed to its head,
                e.g. from :meth:`capture_student`); the gradient flows into them and the head.
            teacher: ``teacher_outputs(batch)`` if already computed.
            mask: ``[B, S]`` bool, tokens that count; default ``batch["attention_mask"] != 0``
                (all tokens without an attention mask).
        """
        if not isinstance(student_hidden, torch.Tensor):
            raise TypeError(f"student_hidden must be the [B, S, H] tensor of final hidden states, got {type(student_hidden).__name__}")
        device = student_hidden.device
        if not self.active:
            return torch.zeros((), dtype=_penalty_dtype(student_hidden.dtype), device=device)
        batch = _as_batch(batch)
        t_hidden, t_weight, t_bias = self.teacher_outputs(batch) if teacher is None else teacher
        if t_hidden.shape[:-1] != student_hidden.shape[:-1]:
            raise ValueError(
                f"student hidden states {tuple(student_hidden.shape)} and teacher hidden states {tuple(t_hidden.shape)} "
                "cover different tokens (was the model called with logits_to_keep?)"
            )
        if mask is None and batch.get("attention_mask") is not None:
            mask = batch["attention_mask"] != 0
        if mask is not None:
            mask = mask.to(device=device, dtype=torch.bool)
        head = _head_of(self.model)
        with _no_autocast(device):
            value = fused_linear_distillation(
                student_hidden,
                head.weight,
                teacher_hidden=t_hidden.to(device),
                teacher_weight=t_weight.to(device),
                student_bias=head.bias,
                teacher_bias=None if t_bias is None else t_bias.to(device),
                temperature=self.temperature,
                reduction="batchmean",
                mask=mask,
                chunk_size=self.chunk_size,
            )
        return self.strength * value.to(_penalty_dtype(value.dtype))

    def __repr__(self) -> str:
        return (
            f"CausalLMLwF(strength={self.strength}, temperature={self.temperature}, teacher={self.teacher_mode!r}, "
            f"consolidated={self.consolidated})"
        )


# --------------------------------------------------------------------------- Trainer


def _as_regularizers(regularizer) -> list:
    if regularizer is None:
        return []
    items = list(regularizer) if isinstance(regularizer, (list, tuple)) else [regularizer]
    for item in items:
        if not callable(getattr(item, "penalty", None)) or isinstance(item, (LwF, CausalLMLwF)):
            raise TypeError(
                "regularizer must be a fastcl weight regularizer (EWC, SI, MAS, L2SP, L1SP) or a list of them, got "
                f"{type(item).__name__}" + ("; pass distillation as lwf=CausalLMLwF(...)" if isinstance(item, (LwF, CausalLMLwF)) else "")
            )
    return items


class ContinualTrainerMixin:
    """Adds fastcl penalties to ``compute_loss`` of any ``transformers.Trainer`` subclass.

    ``class MyTrainer(ContinualTrainerMixin, SomeTrainer): ...`` — the mixin must come
    first. Keyword arguments ``regularizer`` (one fastcl regularizer or a list) and ``lwf``
    (a :class:`CausalLMLwF`) are taken; everything else goes to the ``Trainer``.
    Regularizers that need the optimizer (SI) are attached to the one the trainer creates.
    Logged training metrics gain ``cl_penalty`` (mean total penalty per micro-batch).

    Models: causal LMs (``*ForCausalLM``) and sequence classifiers
    (``*ForSequenceClassification``, per-sample loss from ``labels``) can consolidate
    every regularizer; other models only those that need no data (SI, L2-SP, L1-SP).
    """

    def __init__(self, *args, regularizer=None, lwf: CausalLMLwF | None = None, **kwargs):
        self.regularizers = _as_regularizers(regularizer)
        if lwf is not None and not isinstance(lwf, CausalLMLwF):
            raise TypeError(f"lwf must be a fastcl.integrations.hf.CausalLMLwF, got {type(lwf).__name__}")
        model = kwargs.get("model", args[0] if args else None)
        self._task = _model_task(model) if isinstance(model, nn.Module) else None
        needy = [type(r).__name__ for r in self.regularizers if getattr(r, "consolidation_input", None) is not None]
        if needy and self._task is None:
            got = type(_hf_model(model)).__name__ if isinstance(model, nn.Module) else type(model).__name__
            raise TypeError(
                f"ContinualTrainer consolidates {', '.join(needy)} on causal language models (*ForCausalLM) and sequence "
                f"classifiers (*ForSequenceClassification), got {got}; consolidate them yourself with "
                "reg.consolidate(loader, forward=..., loss_fn=...) or use regularizers that need no data (SI, L2SP, L1SP)"
            )
        self.lwf = lwf
        self._attached: set[int] = set()
        self._penalty_sum: torch.Tensor | float = 0.0
        self._penalty_count = 0
        super().__init__(*args, **kwargs)

    # -------------------------------------------------------------- optimizer
    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if id(optimizer) not in self._attached:
            for reg in self.regularizers:
                if getattr(reg, "requires_optimizer", False):  # SI integrates the path in the step hooks
                    reg.attach(optimizer)
            self._attached.add(id(optimizer))
        return optimizer

    # -------------------------------------------------------------- loss
    def _check_lwf_ready(self) -> None:
        if self.lwf is not None and not self.lwf.consolidated:
            raise RuntimeError(
                "lwf has no teacher yet, so training would add no distillation: call lwf.consolidate() before training "
                "(the current model becomes the teacher; trainer.consolidate() at the end of the previous task does it), "
                "or pass lwf=None for a task without distillation"
            )

    def train(self, *args, **kwargs):
        self._check_lwf_ready()
        return super().train(*args, **kwargs)

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether ``Trainer.training_step`` uses our loss as is (True) or divides it by the accumulation steps."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        accepts = bool(getattr(self, "model_accepts_loss_kwargs", False))
        return (accepts and num_items_in_batch is not None) or getattr(self, "compute_loss_func", None) is not None

    def _penalty_scale(self, num_items_in_batch) -> float:
        """Coefficient of a micro-batch's penalty so that each optimizer step gets the penalty once."""
        if not self._loss_is_scaled_for_ga(num_items_in_batch):
            return 1.0
        steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        return 1.0 / max(int(steps), 1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        training = model.training
        if training:
            self._check_lwf_ready()
        use_lwf = training and self.lwf is not None and self.lwf.active
        teacher = self.lwf.teacher_outputs(inputs) if use_lwf else None  # before the student: the teacher may be the same model
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        capture = self.lwf.capture_student() if use_lwf else contextlib.nullcontext()
        lwf_inputs = dict(inputs) if use_lwf else None  # the Trainer may pop labels from inputs
        with capture as captured:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if not training or not (self.regularizers or use_lwf):
            return (loss, outputs) if return_outputs else loss

        dtype = torch.promote_types(loss.dtype, torch.float32)
        penalty = torch.zeros((), dtype=dtype, device=loss.device)
        with _no_autocast(loss.device):
            for reg in self.regularizers:  # an attached regularizer's value has no graph: its hook adds the gradient
                penalty = penalty + reg.penalty().to(device=loss.device, dtype=dtype)
            if use_lwf:
                if captured.hidden is None:
                    raise RuntimeError("CausalLMLwF: the model's forward pass never called its LM head")
                penalty = penalty + self.lwf.penalty(lwf_inputs, captured.hidden, teacher=teacher).to(device=loss.device, dtype=dtype)
        self._penalty_sum = self._penalty_sum + penalty.detach()  # read at logging time: no sync per step
        self._penalty_count += 1
        loss = loss.to(dtype) + self._penalty_scale(num_items_in_batch) * penalty
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if self._penalty_count and "loss" in logs:
            logs = {**logs, "cl_penalty": float(self._penalty_sum) / self._penalty_count}
            self._penalty_sum, self._penalty_count = 0.0, 0
        return super().log(logs, *args, **kwargs)

    # -------------------------------------------------------------- end of a task
    def consolidate(self, dataset=None, *, max_samples: int | None = None, verbose: bool | None = None) -> None:
        """End of a task: consolidate every regularizer and the LwF teacher, all or nothing.

        Regularizers that read data (``consolidation_input``: EWC, MAS) run over ``dataset``
        (default: the training set) batched by :meth:`get_eval_dataloader` (eval batch
        size, the trainer's collator, no shuffling): causal LMs with the per-sequence loss
        (:func:`causal_lm_forward`, :func:`causal_lm_per_sequence_loss`) or the logits of
        the unpadded positions, sequence classifiers with the per-sample loss of
        ``labels`` (:func:`sequence_classification_per_sample_loss`) or the logits. SI,
        L2-SP, L1-SP and the teacher need no data. If one raises, none changes.
        """
        loader = None
        if any(getattr(reg, "consolidation_input", None) is not None for reg in self.regularizers):
            data = dataset if dataset is not None else self.train_dataset
            if data is None:
                raise ValueError("consolidate needs a dataset: pass one or give the trainer a train_dataset")
            loader = self.get_eval_dataloader(data)
        everything = self.regularizers + ([self.lwf] if self.lwf is not None else [])
        with all_or_nothing(everything):
            for reg in self.regularizers:
                need = getattr(reg, "consolidation_input", None)
                if need is None:
                    reg.consolidate()
                else:
                    options = _consolidation_kwargs(self.model, self._task, need)
                    reg.consolidate(loader, max_samples=max_samples, verbose=verbose, **options)
            if self.lwf is not None:
                self.lwf.consolidate()


class ContinualTrainer(ContinualTrainerMixin, Trainer):
    """``transformers.Trainer`` whose training loss includes fastcl penalties.

    Usage (one EWC and one LwF object for all tasks; consolidate after each)::

        ewc = fastcl.EWC(model, strength=1e3)
        lwf = CausalLMLwF(model, strength=1.0, temperature=2.0)
        trainer = ContinualTrainer(model=model, args=args, train_dataset=task_a, regularizer=ewc)
        trainer.train()
        trainer.consolidate()                              # Fisher on task A
        lwf.consolidate()                                  # teacher = the model after task A
        ContinualTrainer(model=model, args=args, train_dataset=task_b, regularizer=ewc, lwf=lwf).train()

    (A fresh trainer per task gets a fresh optimizer and learning-rate schedule.) Training
    with an ``lwf`` that has no teacher raises.

    See :class:`ContinualTrainerMixin` and the module docstring for gradient accumulation
    and mixed precision.
    """
