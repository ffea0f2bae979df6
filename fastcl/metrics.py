r"""Continual-learning metrics over an accuracy matrix.

``R[i, j]`` is the accuracy on task ``j`` measured right after training task ``i``
(tasks numbered ``0 .. T-1``). With ``T`` the number of rows used (the last recorded
row, unless stated otherwise):

* average accuracy after task ``i``:  ``A_i = (1/(i+1)) Σ_{j≤i} R[i, j]``
* forgetting (Chaudhry et al., 2018):
  ``F = (1/(T-1)) Σ_{j<T-1} ( max_{j≤i<T-1} R[i, j] − R[T-1, j] )``
* backward transfer (Lopez-Paz & Ranzato, 2017):
  ``BWT = (1/(T-1)) Σ_{j<T-1} ( R[T-1, j] − R[j, j] )``
* forward transfer (Lopez-Paz & Ranzato, 2017), with ``b_j`` the accuracy of a
  reference model (e.g. at random init) on task ``j``:
  ``FWT = (1/(T-1)) Σ_{j≥1} ( R[j-1, j] − b_j )``
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._validate import check_int, check_real

__all__ = ["AccuracyMatrix"]


class AccuracyMatrix:
    """Accuracies ``R[i, j]`` on task ``j`` after training task ``i``, and the metrics on them.

    Entries not recorded are ``nan``; a metric that needs a missing entry raises
    :class:`ValueError` naming it. "The last task" is the last row with any recorded
    entry (so a partially filled matrix gives metrics for the tasks seen so far).
    """

    def __init__(self, num_tasks: int):
        # an (n, n) float64 matrix: 2**15 tasks is already 8 GiB
        self.num_tasks = check_int(num_tasks, "num_tasks", low=1, high=2**15)
        self._r = np.full((self.num_tasks, self.num_tasks), np.nan, dtype=np.float64)

    # ------------------------------------------------------------------ recording
    def _check_index(self, name: str, value) -> int:
        """A task index in ``[0, num_tasks - 1]`` (int, NumPy integer or 0-dim integer tensor)."""
        return check_int(value, name, low=0, high=self.num_tasks - 1)

    def record(self, after_task: int, on_task: int, accuracy: float) -> None:
        """Set ``R[after_task, on_task] = accuracy`` (a finite real number in [0, 1], not a bool).

        Task indices are ints (NumPy integers and 0-dim integer tensors too); ``accuracy``
        may also be a NumPy scalar or a 0-dim tensor. A call that raises records nothing.
        """
        i = self._check_index("after_task", after_task)
        j = self._check_index("on_task", on_task)
        self._r[i, j] = check_real(accuracy, "accuracy", low=0.0, high=1.0)

    def __getitem__(self, index):
        return self._r[index]

    # ------------------------------------------------------------------ helpers
    @property
    def last_task(self) -> int:
        """Index of the last row with at least one recorded entry (-1 when empty)."""
        rows = np.flatnonzero(~np.isnan(self._r).all(axis=1))
        return int(rows[-1]) if rows.size else -1

    def _entry(self, i: int, j: int) -> float:
        value = self._r[i, j]
        if np.isnan(value):
            raise ValueError(f"accuracy after task {i} on task {j} has not been recorded")
        return float(value)

    def _final_task(self, metric: str) -> int:
        last = self.last_task
        if last < 0:
            raise ValueError(f"{metric} needs recorded accuracies; the matrix is empty")
        return last

    # ------------------------------------------------------------------ metrics
    def average_accuracy(self, after_task: int | None = None) -> float:
        """``(1/(i+1)) Σ_{j≤i} R[i, j]`` for ``i = after_task`` (default: the last recorded row)."""
        i = self._final_task("average_accuracy") if after_task is None else self._check_index("after_task", after_task)
        return float(np.mean([self._entry(i, j) for j in range(i + 1)]))

    def forgetting(self) -> float:
        """Mean over old tasks ``j < T-1`` of ``max_{j≤i<T-1} R[i, j] − R[T-1, j]``.

        Raises ValueError with fewer than 2 tasks (there is no old task to forget).
        """
        last = self._final_task("forgetting")
        if last < 1:
            raise ValueError("forgetting needs at least 2 trained tasks (rows 0 and 1 recorded)")
        drops = []
        for j in range(last):
            best = max(self._entry(i, j) for i in range(j, last))
            drops.append(best - self._entry(last, j))
        return float(np.mean(drops))

    def backward_transfer(self) -> float:
        """Mean over ``j < T-1`` of ``R[T-1, j] − R[j, j]`` (negative = forgetting)."""
        last = self._final_task("backward_transfer")
        if last < 1:
            raise ValueError("backward_transfer needs at least 2 trained tasks (rows 0 and 1 recorded)")
        return float(np.mean([self._entry(last, j) - self._entry(j, j) for j in range(last)]))

    def forward_transfer(self, baseline: Sequence[float]) -> float:
        """Mean over ``1 ≤ j ≤ T-1`` of ``R[j-1, j] − baseline[j]``.

        ``baseline[j]`` is a reference accuracy on task ``j`` (e.g. of the untrained
        model); it needs one entry per task (``num_tasks``), entry 0 is not used.
        """
        last = self._final_task("forward_transfer")
        if last < 1:
            raise ValueError("forward_transfer needs at least 2 trained tasks (rows 0 and 1 recorded)")
        try:
            base = np.asarray(baseline, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"baseline must be a sequence of {self.num_tasks} accuracies, got {type(baseline).__name__}") from None
        if base.shape != (self.num_tasks,):
            raise ValueError(f"baseline must have one accuracy per task (shape ({self.num_tasks},)), got shape {base.shape}")
        used = base[1 : last + 1]
        if not (np.isfinite(used).all() and (used >= 0).all() and (used <= 1).all()):
            raise ValueError(f"baseline must hold accuracies in [0, 1], got {used.tolist()} for tasks 1..{last}")
        return float(np.mean([self._entry(j - 1, j) - base[j] for j in range(1, last + 1)]))

    # ------------------------------------------------------------------ export
    def as_array(self) -> np.ndarray:
        """A copy of ``R`` as a ``(num_tasks, num_tasks)`` float64 array, ``nan`` where unrecorded."""
        return self._r.copy()

    def to_dict(self) -> dict:
        """JSON-ready summary: the matrix (``None`` for unrecorded) and the metrics that can be computed."""
        out: dict = {
            "num_tasks": self.num_tasks,
            "accuracy_matrix": [[None if np.isnan(v) else float(v) for v in row] for row in self._r],
        }
        for name in ("average_accuracy", "forgetting", "backward_transfer"):
            try:
                out[name] = getattr(self, name)()
            except ValueError:
                out[name] = None
        return out

    def __repr__(self) -> str:
        rows = "\n".join(
            "  [" + ", ".join("  -  " if np.isnan(v) else f"{v:.3f}" for v in row) + "]" for row in self._r
        )
        return f"AccuracyMatrix(num_tasks={self.num_tasks},\n{rows})"
