"""Helpers for class-imbalanced data: a class-balanced sampler and loss class weights.

Labels are a 1-D list, numpy array or tensor of non-negative integers. ``n_c`` is the
number of samples of class ``c``, ``N = Σ_c n_c`` and ``K`` the number of classes.
Per-class results are indexed by class id ``0 .. K-1`` (as ``CrossEntropyLoss(weight=...)``
needs), so ``K`` is at most :data:`MAX_CLASSES`; sparse ids (say ``10**9``) must be
remapped first, e.g. with ``torch.unique(labels, return_inverse=True)``.
"""
from __future__ import annotations

import sys
import warnings

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from ._validate import check_int, check_real

__all__ = ["MAX_CLASSES", "balanced_sampler", "class_weights", "class_counts"]

SCHEMES = ("inverse", "effective")
MAX_CLASSES = 2**22
"""The most classes :func:`class_counts` / :func:`class_weights` return one entry each for."""


def _labels(labels) -> torch.Tensor:
    """Validate and convert labels to a 1-D int64 CPU tensor."""
    if isinstance(labels, torch.Tensor):
        t = labels.detach().cpu()
    elif isinstance(labels, np.ndarray):
        if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must hold integers, got numpy dtype {labels.dtype}")
        t = torch.from_numpy(labels.astype(np.int64))
    elif isinstance(labels, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in labels):
            raise TypeError("labels must be a list of ints")
        t = torch.tensor(list(labels), dtype=torch.int64)
    else:
        raise TypeError(f"labels must be a list, numpy array or tensor of ints, got {type(labels).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"labels must hold integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError("labels is empty")
    if (t < 0).any():
        raise ValueError(f"labels must be non-negative, got minimum {int(t.min())}")
    return t.long()


def class_counts(labels, num_classes: int | None = None) -> torch.Tensor:
    """``n_c`` for ``c = 0 .. K-1`` (int64), with ``K = num_classes`` or ``max(labels) + 1`` (at most :data:`MAX_CLASSES`)."""
    t = _labels(labels)
    needed = int(t.max()) + 1
    if num_classes is None:
        if needed > MAX_CLASSES:
            raise ValueError(
                f"labels go up to {needed - 1}, which would make {needed} per-class entries (at most {MAX_CLASSES}); "
                "class ids must be 0..K-1: remap sparse ids first, e.g. torch.unique(labels, return_inverse=True)[1]"
            )
        num_classes = needed
    else:
        num_classes = check_int(num_classes, "num_classes", low=1, high=MAX_CLASSES)
        if num_classes < needed:
            raise ValueError(f"num_classes={num_classes} is too small for label {needed - 1} (need at least {needed})")
    return torch.bincount(t, minlength=num_classes)


def balanced_sampler(
    labels, num_samples: int | None = None, replacement: bool = True, generator: torch.Generator | None = None
) -> WeightedRandomSampler:
    """A :class:`~torch.utils.data.WeightedRandomSampler` that draws every class equally often.

    Sample ``i`` gets weight ``1 / n_{y_i}``, so each class has total weight 1 and a draw
    picks a class uniformly (among classes present), then a sample of it uniformly.
    ``num_samples`` defaults to ``len(labels)``; without ``replacement`` it may not exceed it.
    """
    t = _labels(labels)
    # WeightedRandomSampler's len() must fit a Py_ssize_t
    num_samples = t.numel() if num_samples is None else check_int(num_samples, "num_samples", low=1, high=sys.maxsize)
    if not isinstance(replacement, (bool, np.bool_)):
        raise TypeError(f"replacement must be a bool, got {type(replacement).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    replacement = bool(replacement)
    if not replacement and num_samples > t.numel():
        raise ValueError(f"num_samples={num_samples} exceeds the {t.numel()} samples, which needs replacement=True")
    _, inverse, counts = torch.unique(t, return_inverse=True, return_counts=True)  # any class ids, no dense table
    weights = 1.0 / counts[inverse].double()
    return WeightedRandomSampler(weights, num_samples, replacement=replacement, generator=generator)


def class_weights(labels, num_classes: int | None = None, scheme: str = "inverse", beta: float = 0.999) -> torch.Tensor:
    r"""Per-class loss weights (float32, shape ``(K,)``), e.g. for ``nn.CrossEntropyLoss(weight=...)``.

    * ``"inverse"``: ``w_c = N / (K · n_c)`` (a balanced set gets all ones).
    * ``"effective"`` (Cui et al., 2019, class-balanced loss): ``w_c ∝ (1 − β) / (1 − β^{n_c})``
      (the inverse of the effective number of samples), normalised so ``Σ_c w_c = K``.
      ``β`` in [0, 1): ``β → 1`` approaches inverse frequency, ``β = 0`` gives all ones.

    A class with no samples (possible when ``num_classes`` exceeds ``max(labels) + 1``)
    would get an infinite weight; it gets the largest weight of the present classes
    instead (before the ``"effective"`` normalisation), with a :func:`warnings.warn`.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    beta = check_real(beta, "beta", low=0.0, high=1.0, high_inclusive=False)  # checked even where unused: a typo is a bug
    counts = class_counts(labels, num_classes).double()
    k = counts.numel()
    present = counts > 0
    if scheme == "inverse":
        raw = counts.sum() / (k * counts.clamp_min(1))
    else:
        raw = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts.clamp_min(1)))
    if not present.all():
        missing = torch.nonzero(~present).flatten()
        shown = missing[:10].tolist()
        more = f" and {missing.numel() - 10} more" if missing.numel() > 10 else ""
        warnings.warn(f"class_weights: classes {shown}{more} have no samples; they get the largest weight of the others", stacklevel=2)
        raw = torch.where(present, raw, raw[present].max())
    if scheme == "effective":
        raw = raw * (k / raw.sum())
    return raw.float()
