"""Continual-learning scenarios: a labelled data set cut into a sequence of tasks.

* :func:`split` (class-incremental / task-incremental): task ``t`` holds the samples of
  ``classes_per_task`` classes, disjoint from the other tasks' classes.
* :func:`permuted` (domain-incremental): every task holds all samples, with the
  flattened features of task ``t`` reordered by a fixed permutation ``π_t``
  (``x'[k] = x[π_t[k]]``); ``π_0`` is the identity.
* :func:`load_digits`: scikit-learn's bundled 8x8 digits (1797 samples, 10 classes; no
  download) as float32 tensors in [0, 1].

Data may be given as ``(X, y)`` tensors or as any map-style ``torch.utils.data.Dataset``
whose items are ``(x, y)`` pairs (materialised into tensors once). Everything is
deterministic given ``seed``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset, TensorDataset

from ._validate import check_int, check_real

__all__ = ["Task", "split", "permuted", "load_digits"]

Data = Dataset | Sequence[torch.Tensor]


@dataclass
class Task:
    """One task of a scenario.

    ``train``/``test`` are ``TensorDataset(x, y)`` (``test`` is ``None`` when no test data
    was given), ``classes`` the labels that occur in the task, ``task_id`` its position,
    and ``permutation`` the feature permutation of a permuted scenario (else ``None``).
    """

    task_id: int
    train: TensorDataset
    test: TensorDataset | None
    classes: tuple[int, ...]
    permutation: torch.Tensor | None = field(default=None, repr=False)


def _generator(seed) -> torch.Generator:
    """A CPU generator seeded by ``seed`` (an int ``>= 0``: NumPy and 0-dim integer tensors too)."""
    return torch.Generator().manual_seed(check_int(seed, "seed", low=0, high=2**64 - 1))


def _class_order(class_order, present: list[int]) -> list[int]:
    """``class_order`` as a list of ints, checked to be a permutation of ``present``."""
    try:
        items = None if isinstance(class_order, (str, bytes)) else list(class_order)
    except TypeError:
        items = None
    if items is None:
        raise TypeError(f"class_order must be a sequence of int class ids, got {type(class_order).__name__}")
    order = [check_int(c, "class_order entry") for c in items]
    if sorted(order) != present:
        raise ValueError(f"class_order must be a permutation of the classes in train {present}, got {order}")
    return order


def _as_tensors(data: Data, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)`` from a pair of tensors or a Dataset of ``(x, y)`` items; y becomes int64 1-D."""
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        x, y = data.tensors
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    elif isinstance(data, Dataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{name} must be a map-style Dataset with __len__") from None
        if n == 0:
            raise ValueError(f"{name} is empty")
        xs, ys = [], []
        for i in range(n):
            item = data[i]
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(f"{name}[{i}] must be an (x, y) pair, got {type(item).__name__}")
            xs.append(torch.as_tensor(item[0]))
            ys.append(torch.as_tensor(item[1]))
        x, y = torch.stack(xs), torch.stack(ys)
    else:
        raise TypeError(f"{name} must be an (X, y) pair of tensors or a torch Dataset of (x, y) items, got {type(data).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name}: X must have a non-empty leading sample dimension, got shape {tuple(x.shape)}")
    y = y.reshape(-1) if y.dim() > 1 and y.numel() == y.shape[0] else y
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: y must be 1-D with one label per sample ({x.shape[0]}), got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
        raise TypeError(f"{name}: labels must be integers, got dtype {y.dtype}")
    if (y < 0).any():
        raise ValueError(f"{name}: labels must be non-negative")
    return x, y.long()


def _check_test(x: torch.Tensor, xt: torch.Tensor | None, yt: torch.Tensor | None = None, y: torch.Tensor | None = None) -> None:
    """Test samples must have the train samples' shape; with labels, only classes seen in train."""
    if xt is None:
        return
    if xt.shape[1:] != x.shape[1:]:
        raise ValueError(f"test samples have shape {tuple(xt.shape[1:])}, train samples {tuple(x.shape[1:])}: they differ in size")
    if yt is not None:
        unseen = sorted(set(torch.unique(yt).tolist()) - set(torch.unique(y).tolist()))
        if unseen:
            raise ValueError(f"test holds classes {unseen} that train does not; they would belong to no task")


def split(
    train: Data,
    classes_per_task: int,
    test: Data | None = None,
    class_order: Sequence[int] | None = None,
    seed: int | None = None,
) -> list[Task]:
    """Cut ``train`` (and ``test``) into tasks of ``classes_per_task`` disjoint classes.

    The classes (those present in ``train``) are taken in ``class_order`` if given, else
    ascending, or shuffled by ``seed`` when ``seed`` is not ``None``; task ``t`` gets
    classes ``order[t·c : (t+1)·c]``. The number of classes must be a multiple of
    ``classes_per_task``. Sample order within a task is the input order.
    """
    x, y = _as_tensors(train, "train")
    xt, yt = _as_tensors(test, "test") if test is not None else (None, None)
    classes_per_task = check_int(classes_per_task, "classes_per_task", low=1)
    _check_test(x, xt, yt, y)
    present = sorted(torch.unique(y).tolist())
    if class_order is not None:
        order = _class_order(class_order, present)
    elif seed is not None:
        g = _generator(seed)
        order = [present[i] for i in torch.randperm(len(present), generator=g).tolist()]
    else:
        order = present
    if len(order) % classes_per_task:
        raise ValueError(
            f"classes_per_task={classes_per_task} does not divide the {len(order)} classes in train"
        )
    tasks = []
    for t in range(len(order) // classes_per_task):
        classes = tuple(order[t * classes_per_task : (t + 1) * classes_per_task])
        cls = torch.tensor(classes)
        keep = torch.isin(y, cls)
        test_set = None
        if xt is not None:
            keep_t = torch.isin(yt, cls)
            test_set = TensorDataset(xt[keep_t], yt[keep_t])
        tasks.append(Task(t, TensorDataset(x[keep], y[keep]), test_set, classes))
    return tasks


def _permute(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1)
    return flat[:, perm].reshape(x.shape)


def permuted(train: Data, num_tasks: int, test: Data | None = None, seed: int = 0) -> list[Task]:
    """``num_tasks`` tasks over all of ``train``/``test``, task ``t`` with features permuted by ``π_t``.

    ``π_0`` is the identity; ``π_1..π_{T-1}`` are drawn from ``torch.randperm`` with a
    generator seeded by ``seed`` and apply to the flattened per-sample features (the
    sample shape is kept). Train and test of one task share its permutation.
    """
    x, y = _as_tensors(train, "train")
    xt, yt = _as_tensors(test, "test") if test is not None else (None, None)
    # each task holds its own permuted copy of the data: the count is bounded by what memory can hold
    num_tasks = check_int(num_tasks, "num_tasks", low=1, high=2**16)
    _check_test(x, xt)
    d = x[0].numel()
    g = _generator(seed)
    classes = tuple(sorted(torch.unique(y).tolist()))
    tasks = []
    for t in range(num_tasks):
        perm = torch.arange(d) if t == 0 else torch.randperm(d, generator=g)
        test_set = None if xt is None else TensorDataset(_permute(xt, perm), yt)
        tasks.append(Task(t, TensorDataset(_permute(x, perm), y), test_set, classes, perm))
    return tasks


def load_digits(
    test_fraction: float = 0.25, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's bundled digits as ``((X_train, y_train), (X_test, y_test))``.

    X is float32 ``(n, 64)`` with pixel values ``v/16`` in [0, 1]; y is int64 in 0..9.
    The split is stratified by class and fixed by ``seed``; ``test_fraction`` in (0, 1).
    Needs scikit-learn (``pip install fastcl[demo]``).
    """
    test_fraction = check_real(test_fraction, "test_fraction", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    g = _generator(seed)
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from exc
    bunch = _sk_load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = max(1, round(test_fraction * idx.numel()))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    # interleave classes: a fixed shuffle so that consecutive samples are not one class
    train_idx = torch.cat(train_idx)
    train_idx = train_idx[torch.randperm(train_idx.numel(), generator=g)]
    test_idx = torch.cat(test_idx).sort().values
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])
