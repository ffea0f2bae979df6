r"""The per-sample losses whose gradients the importance squares (or takes the absolute value of).

* Fisher, ``kind="empirical"``: ``ℓ_n = loss_fn(outputs, targets)[n]``; by default the
  cross-entropy ``−log p(y_n | x_n)`` of categorical logits ``[B, C]`` with integer labels
  ``[B]``. Labels equal to ``IGNORE_INDEX`` (−100, as in ``F.cross_entropy``) have no loss
  and are **not counted** as samples.
* Fisher, ``kind="true"``: ``−log p(ŷ_n | x_n)`` with ``ŷ_n ~ softmax(outputs_n)`` drawn once.
* Fisher, ``kind="exact"``: ``Σ_c p(c|x_n) (∂ log p(c|x_n))²`` as one loss per class weighted
  by ``√p(c|x_n)`` (optionally the ``top_k`` most probable classes).
* MAS: ``‖f(x_n)‖²₂`` over all output elements of sample ``n``.

The sample count ``N`` (the Fisher's denominator) counts the samples the per-sample loss
defines: with integer targets whose dim 0 is the batch, a sample all of whose targets are
``IGNORE_INDEX`` does not count (one label ``-100``, or a sequence whose tokens are all
``-100``); otherwise every sample counts. Regression needs a ``loss_fn``: float targets
with the default loss are refused (they would give a meaningless soft-label Fisher), e.g.
the per-sample squared error ``loss_fn=lambda out, y: 0.5 * (out - y).square().flatten(1).sum(1)``
(the negative log-likelihood of a unit-variance Gaussian, up to a constant).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "FisherObjective", "MASObjective", "check_losses"]

IGNORE_INDEX = -100

_OUTPUT_HELP = (
    "pass output_fn= to pick the logits tensor (e.g. output_fn=lambda out: out.logits for a Hugging Face "
    "model, output_fn=lambda out: out[0] for a tuple), a loss_fn that takes the outputs as they are, or "
    "forward=lambda model, batch: (logits, targets)"
)


def _float_logits(outputs: torch.Tensor) -> torch.Tensor:
    return outputs if outputs.dtype in (torch.float32, torch.float64) else outputs.float()


def _describe(outputs) -> str:
    if isinstance(outputs, torch.Tensor):
        return f"a tensor of shape {tuple(outputs.shape)} and dtype {outputs.dtype}"
    if isinstance(outputs, Mapping):
        return f"a {type(outputs).__name__} with keys {list(outputs)[:6]}"
    if isinstance(outputs, (tuple, list)):
        return f"a {type(outputs).__name__} of length {len(outputs)}"
    return f"a {type(outputs).__name__}"


def _need_tensor(outputs, what: str) -> None:
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"{what} needs the model outputs as a tensor, got {_describe(outputs)}; {_OUTPUT_HELP}")


def _check_logits(outputs, kind):
    _need_tensor(outputs, f'kind="{kind}"')
    if outputs.dim() != 2 or not outputs.is_floating_point():
        raise ValueError(f'kind="{kind}" needs categorical logits outputs of shape [B, C]; got {_describe(outputs)}')


def _check_labels(outputs, targets) -> bool:
    """The default loss's inputs: logits ``[B, C]`` and integer labels in ``[0, C)`` or ``IGNORE_INDEX``.

    Returns whether every label is in ``[0, C)`` (no ``IGNORE_INDEX``: every sample counts).
    """
    _need_tensor(outputs, "the default loss (cross-entropy)")
    if targets is None:
        raise ValueError(
            'the empirical Fisher needs targets: batches must be (inputs, targets), or use kind="true"/"exact"'
        )
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor of class indices, got {type(targets).__name__}")
    if targets.dtype == torch.bool:
        raise TypeError(
            "targets are torch.bool: the default loss is the cross-entropy of integer class indices; convert "
            "binary labels with targets.long() (classes 0 and 1), or pass loss_fn= returning per-sample losses [B]"
        )
    if targets.is_floating_point() or targets.is_complex():
        raise TypeError(
            f"targets are {targets.dtype}: the default loss is the cross-entropy of class indices. For regression "
            "or soft labels pass loss_fn= returning per-sample losses [B], e.g. the squared error "
            "loss_fn=lambda out, y: 0.5 * (out - y).square().flatten(1).sum(1)"
        )
    if outputs.dim() != 2 or not outputs.is_floating_point():
        raise ValueError(
            f"the default loss needs categorical logits of shape [B, C], got {_describe(outputs)}; pass loss_fn= "
            "returning per-sample losses [B] for other outputs"
        )
    if targets.dim() != 1 or targets.shape[0] != outputs.shape[0]:
        raise ValueError(
            f"targets must be class indices of shape [{outputs.shape[0]}] for logits {tuple(outputs.shape)}, "
            f"got shape {tuple(targets.shape)}"
        )
    classes = outputs.shape[1]
    if targets.numel() == 0:
        return True
    low, high = torch.aminmax(targets)
    if int(low) >= 0 and int(high) < classes:
        return True
    valid = targets != IGNORE_INDEX
    bad = valid & ((targets < 0) | (targets >= classes))
    if bool(bad.any()):
        label = int(targets[bad][0])
        raise ValueError(
            f"targets contain the label {label}, outside [0, {classes}) for logits with {classes} classes "
            f"(use {IGNORE_INDEX} for samples without a label)"
        )
    return False


def _cross_entropy(outputs, targets, extra):
    """Default empirical loss: ``−log softmax(outputs)[y]`` with integer labels (``-100``: no loss)."""
    labels = targets if targets.dtype == torch.long else targets.long()
    return F.cross_entropy(_float_logits(outputs), labels, reduction="none", ignore_index=IGNORE_INDEX)


def _sampled_cross_entropy(outputs, targets, labels):
    return F.cross_entropy(_float_logits(outputs), labels, reduction="none")


def _weighted_neg_log_prob(outputs, targets, extra):
    classes, weight = extra
    logp = torch.log_softmax(_float_logits(outputs), dim=-1)
    return -(weight * logp.gather(1, classes.unsqueeze(1)).squeeze(1))


def _squared_output_norm(outputs, targets, extra):
    # explicit width, not -1: an empty batch [0, ...] has no width to infer (it is then skipped)
    return _float_logits(outputs).reshape(outputs.shape[0], math.prod(outputs.shape[1:])).square().sum(1)


class _UserLoss:
    def __init__(self, loss_fn):
        self.loss_fn = loss_fn

    def __call__(self, outputs, targets, extra):
        return self.loss_fn(outputs, targets)


def _count_labelled(targets, size: int) -> int:
    """Samples with at least one target that is not ``IGNORE_INDEX`` (integer targets with dim 0 = batch)."""
    if (isinstance(targets, torch.Tensor) and not targets.is_floating_point() and not targets.is_complex()
            and targets.dtype != torch.bool and targets.dim() >= 1 and targets.shape[0] == size and targets.numel()):
        if int(targets.min()) > IGNORE_INDEX:  # no ignore index anywhere: every sample counts
            return size
        return int((targets.reshape(size, -1) != IGNORE_INDEX).any(1).sum())
    return size


class _Objective:
    def __init__(self, output_fn=None):
        self.output_fn = output_fn

    def outputs(self, outputs):
        """``output_fn(outputs)`` when given (e.g. ``out.logits``)."""
        return outputs if self.output_fn is None else self.output_fn(outputs)

    def check(self, outputs, targets) -> None:
        """Validate what the losses will see (called once per batch, outside the traced forward)."""

    def counted(self, outputs, targets, size: int) -> int:
        return size


class FisherObjective(_Objective):
    def __init__(self, kind, loss_fn, top_k, output_fn=None):
        super().__init__(output_fn)
        self.kind, self.top_k = kind, top_k
        self.empirical = _cross_entropy if loss_fn is None else _UserLoss(loss_fn)
        self._all_labelled = False  # set by check() for each batch

    def check(self, outputs, targets) -> None:
        self._all_labelled = False
        if self.kind == "empirical" and self.empirical is _cross_entropy:
            self._all_labelled = _check_labels(outputs, targets)
        elif self.kind != "empirical":
            _check_logits(outputs, self.kind)

    def variants(self, outputs, targets) -> list:
        """``[(loss, extra)]``: the per-sample losses whose squared gradients add up (after :meth:`check`)."""
        if self.kind == "empirical":
            return [(self.empirical, None)]
        probs = torch.softmax(_float_logits(outputs.detach()), dim=-1)
        if self.kind == "true":
            return [(_sampled_cross_entropy, torch.multinomial(probs, 1).squeeze(1))]
        # sqrt(p) weights on the per-sample loss give p · (∂ log p)² once squared
        if self.top_k is None:
            values = probs
            classes = torch.arange(probs.shape[1], device=probs.device).expand_as(probs)
        else:
            values, classes = probs.topk(min(self.top_k, probs.shape[1]), dim=1)
        weights = values.sqrt()
        return [(_weighted_neg_log_prob, (classes[:, j].contiguous(), weights[:, j].contiguous()))
                for j in range(classes.shape[1])]

    def counted(self, outputs, targets, size: int) -> int:
        if self.kind != "empirical" or self._all_labelled:
            return size
        return _count_labelled(targets, size)


class MASObjective(_Objective):
    def check(self, outputs, targets) -> None:
        _need_tensor(outputs, "MAS")
        if outputs.dim() == 0:
            raise ValueError(f"MAS needs model outputs of shape [B, ...], got {_describe(outputs)}")

    def variants(self, outputs, targets) -> list:
        return [(_squared_output_norm, None)]


def check_losses(losses, outputs, batch_index):
    """Per-sample losses are a finite floating vector with one entry per sample."""
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
        got = f"shape {tuple(losses.shape)}" if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return per-sample losses of shape [B] (e.g. reduction='none'), got {got} "
            f"in batch {batch_index}: the Fisher needs each sample's own gradient"
        )
    if isinstance(outputs, torch.Tensor) and outputs.dim() >= 1 and losses.shape[0] != outputs.shape[0]:
        raise ValueError(
            f"loss_fn returned {losses.shape[0]} losses for {outputs.shape[0]} samples in batch {batch_index}; "
            "it must return one loss per sample (shape [B])"
        )
    if not losses.is_floating_point():
        raise ValueError(f"per-sample losses must be floating point, got {losses.dtype} in batch {batch_index}")
    # One summing pass carries any NaN/inf (a finite total proves every loss finite; an overflowing
    # total only pays for the element-wise check).
    if math.isfinite(float(losses.detach().sum())):
        return
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()[:5].tolist()
        raise ValueError(f"non-finite per-sample loss in batch {batch_index} (samples {bad})")
