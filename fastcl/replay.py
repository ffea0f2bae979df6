r"""Experience replay: a fixed-size memory of past samples, mixed into the new task's batches.

:class:`ReplayBuffer` keeps at most ``capacity`` ``(input, target)`` samples on the CPU,
chosen from everything it was shown (:meth:`ReplayBuffer.add`) by one of two policies:

* ``"reservoir"`` (Vitter's algorithm R): after ``n`` samples were shown, each of them is
  in the buffer with probability ``capacity / n``, whatever its position in the stream.
  The ``i``-th sample (1-based) enters with probability ``min(1, capacity / i)`` and
  replaces a slot drawn uniformly.
* ``"class_balanced"`` (class-balanced reservoir, Chrysakis & Moens, ICML 2020): the
  memory is shared as equally as possible among the classes seen so far. Once it is
  full, a sample of a class that is not among the largest in memory replaces a random
  sample of a largest class; a sample of a largest class ``c`` replaces a random sample
  of ``c`` with probability ``m_c / n_c`` (``m_c`` stored, ``n_c`` seen), i.e. a
  reservoir within the class. A class with fewer samples than its share keeps all of
  them; rare classes are never crowded out by frequent ones.

Mixing into a new task: :meth:`ReplayBuffer.mixed_loader` returns an ordinary
:class:`~torch.utils.data.DataLoader` whose every batch holds ``round(batch_size · ρ)``
replayed samples and the rest from the new data (``ρ = replay_fraction``), built on
:class:`MixedBatchSampler` (usable with any ``DataLoader`` over
``ConcatDataset([new, replay])``). An empty buffer gives plain new-data batches, so one
training loop serves every task. Replay is data, so it composes with every regularizer.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, TensorDataset

from ._validate import check_int, check_real

__all__ = ["POLICIES", "MixedBatchSampler", "ReplayBuffer"]

POLICIES = ("reservoir", "class_balanced")
_SETTINGS = ("capacity", "policy", "num_seen")
"""The scalar entries of :meth:`ReplayBuffer.state_dict` (besides the contents and the generator)."""


def _seeded_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(check_int(seed, "seed", low=0, high=2**64 - 1))
    return g


class ReplayBuffer:
    """A memory of at most ``capacity`` past ``(input, target)`` samples, kept on the CPU.

    Args:
        capacity: the memory budget in samples (≥ 1).
        policy: ``"reservoir"`` (uniform over everything seen) or ``"class_balanced"``
            (equal shares per class; targets must be 1-D integer class labels).
        seed: seed of the buffer's own random generator (``None``: nondeterministic).

    Usage::

        buffer = fastcl.ReplayBuffer(capacity=500, policy="class_balanced", seed=0)
        for task_data in tasks:                                   # map-style datasets of (x, y)
            loader = buffer.mixed_loader(task_data, batch_size=32, replay_fraction=0.25)
            for x, y in loader:                                   # 8 replayed + 24 new per batch
                ...                                               # any loss, any regularizer
            for x, y in DataLoader(task_data, batch_size=256):
                buffer.add(x, y)                                  # remember some of this task

    All samples must share one input shape and dtype (and one target shape and dtype).
    Stored tensors are detached copies; :meth:`add` never keeps a reference to its inputs.
    """

    def __init__(self, capacity: int, *, policy: str = "reservoir", seed: int | None = None):
        self.capacity = check_int(capacity, "capacity", low=1)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self._generator = _seeded_generator(seed)
        self._inputs: torch.Tensor | None = None  # [rows, *input_shape], rows grow geometrically up to capacity
        self._targets: torch.Tensor | None = None
        self._size = 0
        self.num_seen = 0
        self._seen_per_class: dict[int, int] = {}  # class_balanced: n_c
        self._full_classes: set[int] = set()

    # ------------------------------------------------------------------ contents
    def __len__(self) -> int:
        return self._size

    @property
    def inputs(self) -> torch.Tensor:
        """The stored inputs, ``[len(self), *input_shape]`` (a view: do not modify)."""
        return self._empty_like_or_view(self._inputs)

    @property
    def targets(self) -> torch.Tensor:
        """The stored targets, ``[len(self), *target_shape]`` (a view: do not modify)."""
        return self._empty_like_or_view(self._targets)

    def _empty_like_or_view(self, t: torch.Tensor | None) -> torch.Tensor:
        return torch.empty(0) if t is None else t[: self._size]

    def class_counts(self) -> dict[int, int]:
        """``{class: number stored}`` (targets must be 1-D integer labels)."""
        if self._targets is None:
            return {}
        self._require_labels(self._targets, "stored targets")
        values, counts = torch.unique(self.targets, return_counts=True)
        return dict(zip(values.tolist(), counts.tolist()))

    def dataset(self) -> TensorDataset:
        """A snapshot of the contents as a ``TensorDataset(inputs, targets)`` (copies)."""
        if self._size == 0:
            raise ValueError("the replay buffer is empty: add() samples first")
        return TensorDataset(self.inputs.clone(), self.targets.clone())

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` stored samples drawn uniformly without replacement (``n ≤ len(self)``), as copies."""
        n = check_int(n, "n", low=0)
        if n > self._size:
            raise ValueError(f"n must be at most the number of stored samples ({self._size}), got {n}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if self._inputs is None:  # empty and never shown a sample: n == 0
            return self.inputs, self.targets
        idx = torch.randperm(self._size, generator=generator if generator is not None else self._generator)[:n]
        return self._inputs[idx], self._targets[idx]  # advanced indexing copies

    # ------------------------------------------------------------------ adding
    @staticmethod
    def _require_labels(targets: torch.Tensor, name: str) -> None:
        if targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
            raise ValueError(
                f"policy 'class_balanced' needs {name} to be 1-D integer class labels, got shape "
                f"{tuple(targets.shape)} and dtype {targets.dtype}"
            )
        if targets.numel() and int(targets.min()) < 0:
            raise ValueError(
                f"policy 'class_balanced' needs {name} to be class ids >= 0, got {int(targets.min())} "
                "(a sample without a label, such as -100, belongs to no class)"
            )

    def _reserve(self, rows: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Make the storage hold at least ``rows`` samples (at most ``capacity``), growing geometrically.

        Memory follows what is stored, not the budget: a buffer of ``capacity=10**9`` that was
        shown 100 samples holds 100 rows.
        """
        have = 0 if self._inputs is None else self._inputs.shape[0]
        if rows <= have:
            return
        rows = min(self.capacity, max(rows, 2 * have))
        inputs = torch.empty((rows, *x.shape[1:]), dtype=x.dtype)
        targets = torch.empty((rows, *y.shape[1:]), dtype=y.dtype)
        if have:
            inputs[:have] = self._inputs
            targets[:have] = self._targets
        self._inputs, self._targets = inputs, targets

    def _check_batch(self, inputs, targets) -> tuple[torch.Tensor, torch.Tensor]:
        for name, t in (("inputs", inputs), ("targets", targets)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.dim() < 1:
                raise ValueError(f"{name} must have a leading sample dimension, got a 0-dim tensor")
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs and targets differ in their number of samples ({inputs.shape[0]} vs {targets.shape[0]})")
        if self.policy == "class_balanced":
            self._require_labels(targets, "targets")
        for name, t, stored in (("inputs", inputs, self._inputs), ("targets", targets, self._targets)):
            if stored is not None and (t.shape[1:] != stored.shape[1:] or t.dtype != stored.dtype):
                raise ValueError(
                    f"{name} samples have shape {tuple(t.shape[1:])} and dtype {t.dtype}; the buffer holds "
                    f"{tuple(stored.shape[1:])} and {stored.dtype}"
                )
        return inputs.detach().to("cpu"), targets.detach().to("cpu")

    @torch.no_grad()
    def add(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Show the buffer a batch of samples (``inputs[i]``, ``targets[i]``); it keeps some per its policy.

        Atomic: a call that raises (wrong type, shape or dtype) changes nothing.
        """
        x, y = self._check_batch(inputs, targets)
        if x.shape[0] == 0:
            return
        self._reserve(min(self.capacity, self._size + x.shape[0]), x, y)
        if self.policy == "reservoir":
            self._add_reservoir(x, y)
        else:
            self._add_class_balanced(x, y)

    def _add_reservoir(self, x: torch.Tensor, y: torch.Tensor) -> None:
        b, cap = x.shape[0], self.capacity
        free = min(b, cap - self._size)
        if free > 0:
            self._inputs[self._size : self._size + free] = x[:free]
            self._targets[self._size : self._size + free] = y[:free]
            self._size += free
        rest = b - free
        if rest > 0:
            # the sample with 1-based stream position i draws j uniform in [0, i) and lands in slot j if j < capacity
            positions = torch.arange(self.num_seen + free + 1, self.num_seen + b + 1, dtype=torch.float64)
            j = (torch.rand(rest, dtype=torch.float64, generator=self._generator) * positions).floor().long()
            j = torch.minimum(j, positions.long() - 1)  # guards against u·i rounding up to i
            accepted = torch.nonzero(j < cap).flatten()
            if accepted.numel():
                slots, sources = j[accepted].tolist(), (accepted + free).tolist()
                last = dict(zip(slots, sources))  # in stream order, a later sample overwrites an earlier one
                slot_t = torch.tensor(list(last.keys()), dtype=torch.long)
                src_t = torch.tensor(list(last.values()), dtype=torch.long)
                self._inputs[slot_t] = x[src_t]
                self._targets[slot_t] = y[src_t]
        self.num_seen += b

    def _add_class_balanced(self, x: torch.Tensor, y: torch.Tensor) -> None:
        labels = y.tolist()
        g = self._generator
        # per-class slot lists of the stored samples, kept in step with every replacement
        slots: dict[int, list[int]] = {}
        for s, c in enumerate(self._targets[: self._size].tolist()):
            slots.setdefault(c, []).append(s)
        for i, c in enumerate(labels):
            n_c = self._seen_per_class.get(c, 0) + 1
            self._seen_per_class[c] = n_c
            self.num_seen += 1
            if self._size < self.capacity:
                slot = self._size
                self._size += 1
            else:
                if c not in self._full_classes:
                    largest = max(len(v) for v in slots.values())
                    candidates = sorted(k for k, v in slots.items() if len(v) == largest)
                    victim = candidates[int(torch.randint(len(candidates), (1,), generator=g))]
                else:
                    victim = c
                    m_c = len(slots[c])
                    if float(torch.rand((), dtype=torch.float64, generator=g)) >= m_c / n_c:
                        continue
                pool = slots[victim]
                k = int(torch.randint(len(pool), (1,), generator=g))
                slot = pool[k]
                pool[k] = pool[-1]
                pool.pop()
                if not pool:
                    del slots[victim]
            self._inputs[slot] = x[i]
            self._targets[slot] = y[i]
            slots.setdefault(c, []).append(slot)
            if self._size == self.capacity:
                largest = max(len(v) for v in slots.values())
                self._full_classes.update(k for k, v in slots.items() if len(v) == largest)

    # ------------------------------------------------------------------ mixing
    def mixed_loader(self, new_data: Dataset, *, batch_size: int, replay_fraction: float, **options: Any) -> DataLoader:
        """A ``DataLoader`` over ``new_data`` whose batches also hold replayed samples.

        Each full batch has ``k = round(batch_size · replay_fraction)`` samples from a
        snapshot of this buffer (taken now; later :meth:`add` calls do not change it) and
        ``batch_size − k`` from ``new_data``, new samples first. An epoch is one pass over
        ``new_data``; replayed samples are drawn without replacement, cycling through the
        buffer. A last, partial batch gets a proportional share of replay. An empty buffer
        gives plain batches of ``new_data``. ``new_data`` items must be ``(input, target)``
        pairs like the stored ones.

        ``options``: :class:`MixedBatchSampler`'s ``shuffle`` (default ``True``), ``drop_last``
        (default ``False``) and ``generator``; everything else goes to ``DataLoader``
        (``num_workers``, ``pin_memory``, ``collate_fn``...).
        """
        if not isinstance(new_data, Dataset):
            raise TypeError(f"new_data must be a map-style torch.utils.data.Dataset, got {type(new_data).__name__}")
        for key in ("sampler", "batch_sampler"):
            if key in options:
                raise TypeError(f"mixed_loader() builds the {key} itself (a MixedBatchSampler); use MixedBatchSampler directly for your own")
        if len(new_data) == 0:
            raise ValueError("new_data is empty: an epoch is one pass over the new data")
        sampler_options = {k: options.pop(k) for k in MixedBatchSampler.OPTIONS if k in options}
        replay = self.dataset() if self._size else None
        sampler = MixedBatchSampler(
            len(new_data), 0 if replay is None else len(replay), batch_size=batch_size, replay_fraction=replay_fraction, **sampler_options
        )
        data = new_data if replay is None else ConcatDataset([new_data, replay])
        return DataLoader(data, batch_sampler=sampler, **options)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Everything needed to resume: settings, contents (copies), counters and the generator state."""
        return {
            "type": "ReplayBuffer",
            **{key: getattr(self, key) for key in _SETTINGS},
            "inputs": None if self._inputs is None else self.inputs.clone(),
            "targets": None if self._targets is None else self.targets.clone(),
            "seen_per_class": dict(self._seen_per_class),
            "full_classes": sorted(self._full_classes),
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore from :meth:`state_dict`; everything is checked first, so a bad state changes nothing."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping from ReplayBuffer.state_dict(), got {type(state).__name__}")
        missing = [k for k in (*_SETTINGS, "inputs", "targets", "generator") if k not in state]
        if missing:
            raise ValueError(f"state_dict is missing {', '.join(missing)} (expected ReplayBuffer.state_dict())")
        if state.get("type", "ReplayBuffer") != "ReplayBuffer":
            raise ValueError(f"state_dict is for {state.get('type')}, not ReplayBuffer")
        if state["capacity"] != self.capacity or state["policy"] != self.policy:
            raise ValueError(
                f"state_dict is for capacity={state['capacity']!r}, policy={state['policy']!r}; this buffer has "
                f"capacity={self.capacity}, policy={self.policy!r}"
            )
        num_seen = check_int(state["num_seen"], "num_seen", low=0)
        x, y = state["inputs"], state["targets"]
        if (x is None) != (y is None):
            raise ValueError("state_dict must have both inputs and targets, or neither")
        size = 0
        if x is not None:
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() < 1 or y.dim() < 1:
                raise TypeError("state_dict inputs and targets must be tensors with a leading sample dimension")
            size = x.shape[0]
            if y.shape[0] != size or size > self.capacity or size > num_seen:
                raise ValueError(
                    f"state_dict holds {size} inputs and {y.shape[0]} targets after {num_seen} seen; "
                    f"they must match and not exceed the capacity {self.capacity} nor the number seen"
                )
            if size < min(self.capacity, num_seen):
                raise ValueError(f"state_dict holds {size} samples after {num_seen} seen; the buffer would hold {min(self.capacity, num_seen)}")
        seen_per_class: dict[int, int] = {}
        full: set[int] = set()
        if self.policy == "class_balanced":
            raw = state.get("seen_per_class", {})
            if not isinstance(raw, Mapping):
                raise TypeError("state_dict seen_per_class must be a mapping {class: count}")
            seen_per_class = {check_int(c, "class"): check_int(n, f"seen_per_class[{c}]", low=1) for c, n in raw.items()}
            if sum(seen_per_class.values()) != num_seen:
                raise ValueError(f"state_dict seen_per_class sums to {sum(seen_per_class.values())}, not num_seen={num_seen}")
            if y is not None:
                self._require_labels(y, "state_dict targets")
                values, counts = torch.unique(y, return_counts=True)
                for c, m in zip(values.tolist(), counts.tolist()):
                    if m > seen_per_class.get(c, 0):
                        raise ValueError(f"state_dict stores {m} samples of class {c} but saw {seen_per_class.get(c, 0)}")
            raw_full = state.get("full_classes", [])
            if isinstance(raw_full, (str, bytes, Mapping)) or not isinstance(raw_full, (list, tuple, set, frozenset)):
                raise TypeError(f"state_dict full_classes must be a list of class ids, got {type(raw_full).__name__}")
            full = {check_int(c, "state_dict full_classes entry") for c in raw_full}
        generator = torch.Generator()
        try:
            generator.set_state(state["generator"])
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"state_dict generator is not a torch.Generator state: {exc}") from None
        # everything checked: commit
        if x is None:
            self._inputs = self._targets = None
        else:
            self._inputs = x.detach().cpu().clone(memory_format=torch.contiguous_format)
            self._targets = y.detach().cpu().clone(memory_format=torch.contiguous_format)
        self._size, self.num_seen = size, num_seen
        self._seen_per_class, self._full_classes = seen_per_class, full
        self._generator = generator

    def __repr__(self) -> str:
        return f"ReplayBuffer(capacity={self.capacity}, policy={self.policy!r}, stored={self._size}, seen={self.num_seen})"


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


class MixedBatchSampler(Sampler[list[int]]):
    """Batches of indices into ``ConcatDataset([new, replay])``: new samples plus a fixed share of replay.

    Indices ``0 .. num_new−1`` are the new data, ``num_new .. num_new+num_replay−1`` the
    replay data. A full batch has ``k = round(batch_size · replay_fraction)`` replay
    indices (``0`` when ``num_replay == 0``) after ``batch_size − k`` new ones. One epoch
    is one pass over the new data (shuffled when ``shuffle``); replay indices come from
    successive random permutations of the replay data (each replayed sample is used
    once before any is used twice). The last, partial batch of new data (kept unless
    ``drop_last``) with ``m`` new samples gets ``round(m · k / (batch_size − k))`` replayed ones.
    """

    OPTIONS = ("shuffle", "drop_last", "generator")
    """The optional keywords, which :meth:`ReplayBuffer.mixed_loader` passes on."""

    def __init__(
        self,
        num_new: int,
        num_replay: int,
        *,
        batch_size: int,
        replay_fraction: float,
        shuffle: bool = True,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
    ):
        self.num_new = check_int(num_new, "num_new", low=1)
        self.num_replay = check_int(num_replay, "num_replay", low=0)
        self.batch_size = check_int(batch_size, "batch_size", low=1)
        self.replay_fraction = check_real(replay_fraction, "replay_fraction", low=0.0, high=1.0, high_inclusive=False)
        self.replay_per_batch = round(self.batch_size * self.replay_fraction) if self.num_replay else 0
        self.new_per_batch = self.batch_size - self.replay_per_batch
        if self.new_per_batch < 1:
            raise ValueError(
                f"batch_size={batch_size} with replay_fraction={replay_fraction} leaves no room for new samples"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.shuffle, self.drop_last = _check_bool(shuffle, "shuffle"), _check_bool(drop_last, "drop_last")
        self.generator = generator

    def __len__(self) -> int:
        full, rest = divmod(self.num_new, self.new_per_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[list[int]]:
        g = self.generator
        if g is None:
            g = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        new = torch.randperm(self.num_new, generator=g) if self.shuffle else torch.arange(self.num_new)
        replay: list[int] = []
        for start in range(0, self.num_new, self.new_per_batch):
            chunk = new[start : start + self.new_per_batch].tolist()
            if len(chunk) < self.new_per_batch:
                if self.drop_last:
                    return
                k = round(len(chunk) * self.replay_per_batch / self.new_per_batch)
            else:
                k = self.replay_per_batch
            while len(replay) < k:
                replay.extend((torch.randperm(self.num_replay, generator=g) + self.num_new).tolist())
            yield chunk + replay[:k]
            del replay[:k]

