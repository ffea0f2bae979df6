r"""Anchored penalty over a list of tensors, value and gradient in one pass.

Math (``t`` indexes tensors, ``k`` elements, ``s`` = ``scale``)::

    value   = s · Σ_t Σ_k w_tk · φ(θ_tk − a_tk)
    grad_t += s · w_t · φ'(θ_t − a_t)           (accumulate, the default)
    grad_t  = s · w_t · φ'(θ_t − a_t)           (store=True: grad_t is not read)

with ``form="quadratic"``: φ(d) = d²/2, φ'(d) = d, and ``form="l1"``: φ(d) = |d|,
φ'(d) = sign(d) (0 at d = 0). ``w`` is the importance (Fisher, MAS, SI); ``weights=None``
means w = 1 (L2-SP / L1-SP). A penalty is non-negative: ``scale`` must be ≥ 0 (checked,
``ValueError``) and the weights must be ≥ 0. The weights' sign is *not* checked here:
that would cost a full pass over them on every call, where validation is otherwise cached
per list. The strategies check importance once, when it enters their state
(consolidation, ``fold``, ``load_state_dict``); callers passing their own weights must
keep them non-negative. So EWC's ``(λ/2)·Σ F(θ−θ*)²`` is ``scale=λ, w=F``, L2-SP's
``(λ/2)·Σ(θ−θ*)²`` is ``scale=λ, weights=None`` and L1-SP's ``λ·Σ|θ−θ*|`` is
``scale=λ, form="l1"``.

Dtypes: θ and grad in float32, bfloat16 or float16 (grad has θ's dtype); a and w in
float32 or bfloat16; every product and the sum accumulate in float32 (float64 when θ, a
or w is float64, which only the torch backend runs). The value is a 0-dim float32
tensor on the device of ``params[0]`` (float64 when θ is float64).

Three entry points:

* :func:`penalty` — not differentiable; with ``grads`` it updates them in place (the
  fused path of ``add_penalty_grad_()``).
* :func:`anchored_penalty` — differentiable, for ``loss = task_loss + penalty``. The
  forward pass writes the gradient into fresh buffers with the store-mode kernel (one
  pass: read θ, a, w, write the gradient); the backward pass returns them (multiplied by
  the incoming gradient only when it is not 1), so autograd's AccumulateGrad adopts them
  as ``.grad`` when ``.grad`` is None. A buffer lives exactly as long as the graph that
  holds it. ``create_graph=True`` gets a gradient built from differentiable torch ops
  (the quadratic penalty's gradient s·w·(θ−a) is linear in θ), so second-order terms
  are exact. A second backward through a retained graph recomputes the gradient from
  the saved θ (torch's in-place check applies).
* ``OPS["penalty"]`` of a backend — the kernels, behind :func:`penalty`.

Guarantees of :func:`penalty` (checked before any tensor is touched, so a call that
raises changes nothing):

* lists of equal length, tensors of the dtypes above, shapes equal position-wise, each
  position's tensors on one device (a list may span devices: one kernel call per device
  and dtype combination, values summed on ``params[0]``'s device);
* dense (strided) tensors only: sparse ones (``Embedding(sparse=True)`` gradients) raise
  ``TypeError``;
* ``grads`` are no inference tensors (made under ``torch.inference_mode()``), and no
  gradient shares memory with another gradient or with any θ, a or w (the same tensor
  twice, overlapping views): ``ValueError``;
* every written gradient's version counter is bumped after the kernel returns, so
  autograd sees the in-place write.

Validation is cached: a list seen before (the same addresses, and for every tensor the
same dtype, shape, strides, device, requires_grad and dispatch keys — which tell
inference tensors apart —, re-checked on every call by dynamo's C++ tensor guards, or
by metadata tuples where those are unavailable) skips the checks, so a training loop
pays them once. A sparse tensor has no address, so a cache hit is a list that would
pass every check again; anything changed is a miss and is validated from scratch.

Backend kernels (``OPS["penalty"]`` of a backend module) are called as
``kernel(params, anchors, weights, scale, form, grads, *, store=False)`` (``store`` only
passed when True, and only to kernels whose signature has it; for others the ops layer
zeroes the gradients and accumulates) with these guarantees: non-empty lists of equal
length; every tensor non-empty, contiguous, on one device; per list one dtype (anchors
and weights not float64, except for the torch backend); shapes equal position-wise;
``weights`` a list or ``None``; ``grads`` a list or ``None``; ``scale`` a Python float.
Dense tensors whose tensors share one memory layout (channels_last, transposed) reach
the kernels as flat views of their memory: the op is elementwise. Other strided tensors
take the reference path on their views (no hidden copies of the inputs), and the
partial values are added.
"""
from __future__ import annotations

import bisect
import inspect
import itertools
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

import torch

from .._dtypes import FLOAT_DTYPES, acc_dtype, acc_dtype_of
from .._validate import check_real
from ..kernels._checks import CheckedTensors, Tensors
from ._dispatch import choose_backend
from ._library import compiling, register

__all__ = ["penalty", "anchored_penalty", "penalty_reference", "FORMS"]

FORMS = ("quadratic", "l1")
_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_CACHE_SIZE = 64  # validated lists kept (inputs, and inputs with gradients)


def penalty_reference(params: Tensors, anchors: Tensors, weights: Tensors | None, scale: float, form: str, grads: Tensors | None, *,
                      store: bool = False) -> torch.Tensor:
    """Plain-PyTorch penalty (the oracle and CPU fallback). Works on strided tensors."""
    acc = acc_dtype_of([*params, *anchors, *(weights or ())])
    total = torch.zeros((), dtype=acc, device=params[0].device)
    for i, p in enumerate(params):
        d = p.detach().to(acc) - anchors[i].to(acc)
        w = None if weights is None else weights[i].to(acc)
        if form == "quadratic":
            term = d * d
            total += 0.5 * (term if w is None else w * term).sum()
            slope = d
        else:
            term = d.abs()
            total += (term if w is None else w * term).sum()
            slope = d.sign()
        if grads is not None:
            step = scale * slope if w is None else (scale * w) * slope
            if store:
                grads[i].copy_(step)
            else:  # computed in the accumulation dtype, rounded once to the gradient's dtype
                grads[i].add_(step)
    return total * scale


# ----------------------------------------------------------------------------- validation

def _compiled_guards():
    """dynamo's C++ ``TensorGuards`` (dtype, device, dispatch keys — which tell inference and
    sparse tensors apart —, shape, strides, requires_grad of each tensor, and no tensor
    twice), if this torch has it and it behaves as probed here; else None."""
    try:
        from torch._C._dynamo.guards import TensorGuards

        def make(tensors):
            return TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)

        a = torch.zeros(2, 3)
        with torch.inference_mode():
            frozen = torch.zeros(2, 3)
        guard = make([a])
        others = (torch.zeros(3, 2), a.t(), a.double(), torch.zeros(2, 3, requires_grad=True), frozen)
        if guard.check(a) and not any(guard.check(t) for t in others) and not make([a, a]).check(a, a):
            return make
    except Exception:  # a private API: any surprise means "compare metadata tuples instead"
        pass
    return None


_make_guard = _compiled_guards()
_META = attrgetter("dtype", "shape", "device", "requires_grad")


class _Guard:
    """Re-checks on a cache hit everything about the tensors of a validated list that may
    change without changing their addresses: dtype, shape, strides, device, requires_grad
    and (for gradients) being an inference tensor. Sparse tensors have no address."""

    __slots__ = ("compiled", "meta", "dedupe")

    def __init__(self, tensors, grads):
        # TensorGuards refuses a tensor object listed twice (e.g. one weight tensor for
        # every position): such lists are guarded by their first occurrences
        self.dedupe = len({id(t) for t in (*tensors, *grads)}) != len(tensors) + len(grads)
        if self.dedupe:
            tensors, grads = self._first(tensors), self._first(grads)
        self.compiled = _make_guard([*tensors, *grads]) if _make_guard is not None else None
        self.meta = None if self.compiled is not None else self._meta(tensors, grads)

    @staticmethod
    def _first(tensors):
        return list({id(t): t for t in tensors}.values())

    @staticmethod
    def _meta(tensors, grads):
        both = [*tensors, *grads]
        return (*map(_META, both), *(t.stride() for t in both), *(g.is_inference() for g in grads))

    def check(self, tensors, grads) -> bool:
        if self.dedupe:
            tensors, grads = self._first(tensors), self._first(grads)
        if self.compiled is not None:
            return self.compiled.check(*tensors, *grads)
        return self._meta(tensors, grads) == self.meta


def _layout_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """Dims of ``t`` from outermost to innermost if ``t`` is dense and non-overlapping
    (some permutation of it is contiguous), else None. Size-1 dims are left out."""
    dims = [d for d in range(t.dim()) if t.shape[d] != 1]
    order = sorted(dims, key=t.stride, reverse=True)
    expected = 1
    for d in reversed(order):
        if t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    return tuple(order)


def _flat_layout(tensors) -> tuple[int, ...] | None:
    """How the tensors of one position reach a kernel: ``()`` as they are (all contiguous),
    a permutation that makes all of them contiguous (one shared dense layout), or None
    (the reference path)."""
    if all(t.is_contiguous() for t in tensors):
        return ()
    p = tensors[0]
    order = _layout_order(p)
    if order is None:
        return None
    strides = [p.stride(d) for d in order]
    if any([t.stride(d) for d in order] != strides for t in tensors[1:]):
        return None
    size_one = [d for d in range(p.dim()) if p.shape[d] == 1]
    return (*order, *size_one)


def _check_dense(label: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        hint = " (e.g. the gradient of Embedding(sparse=True); use sparse=False)" if label.startswith("grads") else ""
        raise TypeError(f"{label} is a {t.layout} tensor{hint}; the penalty needs dense (strided) tensors")


@dataclass(frozen=True)
class _Group:
    """Positions that one kernel call handles: same device and dtypes, flat memory."""

    device: torch.device
    dtype: torch.dtype  # the dtype the backend is resolved for (float64 if any tensor is)
    idx: tuple[int, ...] | None  # None: every position, in order
    layouts: tuple[tuple[int, ...], ...] | None  # per position: () as is, else the permutation to flatten


@dataclass(frozen=True)
class _Plan:
    groups: tuple[_Group, ...]
    strided: tuple[tuple[int, ...], ...]  # positions for the reference path, one tuple per device
    sizes: tuple[int, ...]  # numel of every position
    value_dtype: torch.dtype


def _validate_inputs(params, anchors, weights) -> None:
    n = len(params)
    for label, seq in (("anchors", anchors), ("weights", weights)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{label} has {len(seq)} tensors but params has {n}")
    for i, p in enumerate(params):
        _check_dense(f"params[{i}]", p)
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"params[{i}] has dtype {p.dtype}; expected one of {FLOAT_DTYPES}")
        for label, seq in (("anchors", anchors), ("weights", weights)):
            if seq is None:
                continue
            t = seq[i]
            _check_dense(f"{label}[{i}]", t)
            if t.shape != p.shape:
                raise ValueError(f"{label}[{i}] has shape {tuple(t.shape)} but params[{i}] has {tuple(p.shape)}")
            if t.device != p.device:
                raise ValueError(f"{label}[{i}] is on {t.device} but params[{i}] is on {p.device}")
            if t.dtype not in _STORAGE_DTYPES:
                raise TypeError(f"{label}[{i}] has dtype {t.dtype}; expected one of {_STORAGE_DTYPES}")


def _validate_grads(params, grads, *, tracing: bool = False) -> None:
    if len(grads) != len(params):
        raise ValueError(f"grads has {len(grads)} tensors but params has {len(params)}")
    for i, (p, g) in enumerate(zip(params, grads)):
        _check_dense(f"grads[{i}]", g)
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has {tuple(p.shape)}")
        if g.device != p.device:
            raise ValueError(f"grads[{i}] is on {g.device} but params[{i}] is on {p.device}")
        if g.dtype != p.dtype:
            raise TypeError(f"grads[{i}] has dtype {g.dtype}; expected params[{i}]'s dtype {p.dtype}")
        if not tracing and g.is_inference():  # (dynamo cannot trace is_inference: the op's eager body checks it)
            raise ValueError(f"grads[{i}] is an inference tensor (made under torch.inference_mode()); "
                             "the penalty cannot update it in place")


def _make_plan(params, anchors, weights, grads) -> _Plan:
    groups: dict[tuple, list[int]] = defaultdict(list)
    layouts: dict[tuple, list[tuple[int, ...]]] = defaultdict(list)
    strided: dict[torch.device, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        tensors = [p, anchors[i], *(() if weights is None else (weights[i],)), *(() if grads is None else (grads[i],))]
        layout = _flat_layout(tensors)
        if layout is None:
            strided[p.device].append(i)
            continue
        dtypes = tuple(t.dtype for t in tensors[1:3 if weights is not None else 2])
        key = (p.device, p.dtype, *dtypes)
        groups[key].append(i)
        layouts[key].append(layout)
    n = len(params)
    out = []
    for key, idx in groups.items():
        device, dtypes = key[0], key[1:]
        dtype = torch.float64 if torch.float64 in dtypes else key[1]
        flat = layouts[key] if any(layouts[key]) else None
        out.append(_Group(device, dtype, None if idx == list(range(n)) else tuple(idx), None if flat is None else tuple(flat)))
    return _Plan(tuple(out), tuple(tuple(v) for v in strided.values()), tuple(p.numel() for p in params), acc_dtype_of(params))


def _extent(t: torch.Tensor, address: int) -> tuple[int, int]:
    """[first byte, one past the last byte) that ``t``'s elements touch (``address`` = ``t.data_ptr()``)."""
    if t.is_contiguous():
        return address, address + t.numel() * t.element_size()
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return address, address + span * t.element_size()


def _element_starts(t: torch.Tensor) -> torch.Tensor:
    """Byte address of every element of ``t`` (int64, sorted)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = (offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride)
    return torch.sort(offsets.reshape(-1) * t.element_size() + t.data_ptr()).values


def _share_memory(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether ``a`` and ``b`` (whose extents intersect) have a byte in common (``b=None``: ``a`` with itself)."""
    if b is None:
        status = torch._debug_has_internal_overlap(a)
        if status != 2:
            return status == 1
        starts = _element_starts(a)
        return bool((starts[1:] < starts[:-1] + a.element_size()).any())
    if a.device != b.device:
        return False
    if _layout_order(a) is not None and _layout_order(b) is not None:
        return True  # dense tensors whose extents intersect share bytes
    sa, sb = _element_starts(a), _element_starts(b)
    ends = torch.cat([sa + a.element_size(), sb + b.element_size()])
    starts = torch.cat([sa, sb])
    owner = torch.cat([torch.zeros_like(sa), torch.ones_like(sb)])
    order = torch.argsort(starts)
    starts, ends, owner = starts[order], ends[order], owner[order]
    # neither list overlaps itself, so any overlap shows up between neighbours in start order
    return bool(((starts[1:] < ends[:-1]) & (owner[1:] != owner[:-1])).any())


@dataclass(frozen=True)
class _Spans:
    """The inputs' byte extents sorted by start, for the gradients' aliasing check."""

    starts: list[int]
    ends_max: list[int]  # running maximum of the ends, in start order
    items: list[tuple[int, int, str, torch.Tensor]]  # (start, end, label, tensor) in start order

    @classmethod
    def of(cls, lists, addresses) -> _Spans:
        items = []
        for label, seq, addr in zip(("params", "anchors", "weights"), lists, addresses):
            for i, t in enumerate(seq or ()):
                if t.numel():
                    items.append((*_extent(t, addr[i]), f"{label}[{i}]", t))
        items.sort(key=lambda item: item[0])
        return cls([it[0] for it in items], list(itertools.accumulate((it[1] for it in items), max)), items)

    def overlapping(self, start: int, end: int):
        """The inputs whose extents intersect [start, end)."""
        j = bisect.bisect_left(self.starts, end)
        if j == 0 or self.ends_max[j - 1] <= start:
            return []
        return [it for it in self.items[:j] if it[1] > start]


def _check_aliasing(grads, grad_addresses, spans: _Spans) -> None:
    """No gradient shares memory with another gradient or with any θ, a, w."""
    own = []
    for i, g in enumerate(grads):
        if not g.numel():
            continue
        if _share_memory(g, None):
            raise ValueError(f"grads[{i}] has overlapping elements (e.g. an expanded tensor); it cannot be written in place")
        start, end = _extent(g, grad_addresses[i])
        own.append((start, end, i, g))
        for _, _, label, t in spans.overlapping(start, end):
            if _share_memory(g, t):
                raise ValueError(f"grads[{i}] shares memory with {label}; the gradients written by the penalty must not "
                                 "overlap each other or its inputs (the same tensor twice, overlapping views)")
    own.sort(key=lambda item: item[0])
    for j, (start, end, i, g) in enumerate(own):
        for start2, _, i2, g2 in own[j + 1:]:
            if start2 >= end:
                break
            if _share_memory(g, g2):
                raise ValueError(f"grads[{min(i, i2)}] shares memory with grads[{max(i, i2)}]; the gradients written by "
                                 "the penalty must not overlap each other or its inputs (the same tensor twice, overlapping views)")


def _cached(cache: OrderedDict, key, value):
    cache[key] = value
    while len(cache) > _CACHE_SIZE:
        try:
            cache.popitem(last=False)
        except KeyError:  # emptied meanwhile by another thread
            break


# input lists -> (guard, plan without gradients, the inputs' spans); (input key, gradient
# addresses) -> (guard of the gradients, plan with them)
_inputs: OrderedDict[tuple, tuple[_Guard, _Plan, _Spans]] = OrderedDict()
_with_grads: OrderedDict[tuple, tuple[_Guard, _Plan]] = OrderedDict()


def _addresses(seq) -> list[int]:
    return [t.data_ptr() for t in seq]


def _prepare(params, anchors, weights, grads, *, own_grads: bool = False) -> tuple[_Plan, list[list[int]]]:
    """Validate (or find validated) lists; return the plan and the address lists (θ, a, w, grad).

    Two cache levels: the inputs (θ, a, w: the same every step), then the gradients with
    them (new tensors after every ``zero_grad(set_to_none=True)``, whose validation then
    costs only their own checks). ``own_grads``: ``grads`` are fresh
    ``torch.empty_like(params[i])`` buffers of the caller, correct by construction.
    """
    try:
        addresses = [_addresses(params), _addresses(anchors), [] if weights is None else _addresses(weights),
                     [] if grads is None else _addresses(grads)]
    except Exception:  # not tensors, or tensors without storage (sparse): the checks say which
        _validate_inputs(params, anchors, weights)
        if grads is not None:
            _validate_grads(params, grads)
        raise TypeError("params, anchors, weights and grads must be lists of dense tensors with storage") from None
    inputs = [*params, *anchors, *(weights or ())]
    key = (len(params), weights is None, *addresses[0], *addresses[1], *addresses[2])
    entry = _inputs.get(key)
    if entry is None or not entry[0].check(inputs, ()):
        _validate_inputs(params, anchors, weights)
        entry = (_Guard(inputs, ()), _make_plan(params, anchors, weights, None), _Spans.of((params, anchors, weights), addresses))
        _cached(_inputs, key, entry)
    if grads is None or own_grads:
        return entry[1], addresses
    grad_key = (key, *addresses[3])
    hit = _with_grads.get(grad_key)
    # inside inference mode a guard cannot tell inference tensors from others: no cache there
    if hit is not None and not torch.is_inference_mode_enabled() and hit[0].check((), grads):
        return hit[1], addresses
    _validate_grads(params, grads)
    _check_aliasing(grads, addresses[3], entry[2])
    same_layout = all(g.is_contiguous() for g in grads) and all(p.is_contiguous() for p in params)
    plan = entry[1] if same_layout else _make_plan(params, anchors, weights, grads)
    _cached(_with_grads, grad_key, (_Guard((), grads), plan))
    return plan, addresses


# ----------------------------------------------------------------------------- execution

_store_support: dict = {}


def _supports_store(kernel) -> bool:
    """A backend kernel declares store mode by accepting the ``store`` keyword."""
    known = _store_support.get(kernel)
    if known is None:
        try:
            known = "store" in inspect.signature(kernel).parameters
        except (TypeError, ValueError):
            known = False
        _store_support[kernel] = known
    return known


def _run(plan: _Plan, params, anchors, weights, grads, addresses, scale: float, form: str, store: bool) -> torch.Tensor:
    """Execute a validated plan: every kernel is resolved before any runs (atomic)."""
    calls = [(group, choose_backend("penalty", group.device, group.dtype)[1]) for group in plan.groups]
    parts = []
    for group, kernel in calls:
        lists = []
        for seq, addr in zip((params, anchors, weights, grads), addresses):
            if seq is None:
                lists.append(None)
                continue
            idx = range(len(seq)) if group.idx is None else group.idx
            picked = [seq[i] for i in idx] if group.idx is not None else seq
            if group.layouts is not None:
                picked = [t.permute(order).view(-1) if order else t for t, order in zip(picked, group.layouts)]
            lists.append(CheckedTensors(picked, addr if group.idx is None else [addr[i] for i in idx],
                                        plan.sizes if group.idx is None else [plan.sizes[i] for i in idx]))
        ps, as_, ws, gs = lists
        if store and not _supports_store(kernel):
            torch._foreach_zero_(gs)
            parts.append(kernel(ps, as_, ws, scale, form, gs))
        elif store:
            parts.append(kernel(ps, as_, ws, scale, form, gs, store=True))
        else:
            parts.append(kernel(ps, as_, ws, scale, form, gs))
    for idx in plan.strided:
        pick = lambda seq: None if seq is None else [seq[i] for i in idx]  # noqa: E731
        parts.append(penalty_reference(pick(params), pick(anchors), pick(weights), scale, form, pick(grads), store=store))
    out_device = params[0].device
    parts = [part.to(device=out_device, dtype=plan.value_dtype) for part in parts]
    if not parts:  # every tensor is empty
        return torch.zeros((), dtype=plan.value_dtype, device=out_device)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _checked_scalars(scale, form) -> float:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return check_real(scale, "scale", low=0.0)  # s < 0 would turn the penalty into a reward


def penalty(
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor] | None = None,
    *,
    scale: float = 1.0,
    form: str = "quadratic",
    grads: Sequence[torch.Tensor] | None = None,
    store: bool = False,
) -> torch.Tensor:
    """``s·Σ w·φ(θ−a)``; with ``grads``, also ``grads[t] += s·w·φ'(θ−a)`` in place
    (``store=True``: ``grads[t] = s·w·φ'(θ−a)``, their old contents never read).

    Not differentiable (use :func:`anchored_penalty` inside a loss). Returns a 0-dim
    float32 tensor on the device of ``params[0]`` (float64 when θ is float64).
    Tensors on several devices are grouped per device, one kernel launch per group.
    Guarantees (validation, aliasing, sparse and inference tensors, version counters)
    in the module docstring.
    """
    params = list(params)
    anchors = list(anchors)
    weights = None if weights is None else list(weights)
    grads = None if grads is None else list(grads)
    scale = _checked_scalars(scale, form)
    if not isinstance(store, bool):
        raise TypeError(f"store must be a bool, got {type(store).__name__}")
    if store and grads is None:
        raise ValueError("store=True needs grads (the tensors the gradient is stored into)")
    if len(anchors) != len(params):
        raise ValueError(f"anchors has {len(anchors)} tensors but params has {len(params)}")
    if not params:
        if weights or grads:
            raise ValueError("weights and grads must be empty when params is empty")
        return torch.zeros((), dtype=torch.float32)
    if compiling():
        _validate_inputs(params, anchors, weights)
        detached = [p.detach() for p in params]  # not differentiable, as in eager mode
        if grads is None:
            return _penalty_value_op(detached, anchors, weights or [], scale, form)
        _validate_grads(params, grads, tracing=True)
        return _penalty_grad_op(detached, anchors, weights or [], scale, form, grads, store)
    return _penalty_eager(params, anchors, weights, scale, form, grads, store)


def _penalty_eager(params, anchors, weights, scale, form, grads, store, *, own_grads: bool = False) -> torch.Tensor:
    plan, addresses = _prepare(params, anchors, weights, grads, own_grads=own_grads)
    with torch.no_grad():
        value = _run(plan, params, anchors, weights, grads, addresses, scale, form, store)
    if grads is not None and not own_grads:
        torch.autograd.graph.increment_version(grads)
    return value


# ----------------------------------------------------------------------------- torch.library
# Three custom ops, so that no op has an empty mutable list (inductor cannot handle one):
# the value alone, the in-place update of caller-owned gradients, and a functional op that
# returns the value with fresh gradients (anchored_penalty under torch.compile).

def _value_impl(params: list[torch.Tensor], anchors: list[torch.Tensor], weights: list[torch.Tensor],
                scale: float, form: str) -> torch.Tensor:
    return _penalty_eager(params, anchors, weights or None, scale, form, None, False)


def _value_fake(params, anchors, weights, scale, form, *_):
    return params[0].new_empty((), dtype=acc_dtype_of(params))


def _grad_impl(params: list[torch.Tensor], anchors: list[torch.Tensor], weights: list[torch.Tensor],
               scale: float, form: str, grads: list[torch.Tensor], store: bool) -> torch.Tensor:
    return _penalty_eager(params, anchors, weights or None, scale, form, grads, store)


def _with_grad_impl(params: list[torch.Tensor], anchors: list[torch.Tensor], weights: list[torch.Tensor],
                    scale: float, form: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    grads = [torch.empty_like(p) for p in params]
    return _penalty_eager(params, anchors, weights or None, scale, form, grads, True, own_grads=True), grads


def _with_grad_fake(params, anchors, weights, scale, form):
    return _value_fake(params, anchors, weights, scale, form), [torch.empty_like(p) for p in params]


_penalty_value_op = register("fastcl::penalty", _value_impl, _value_fake)
_penalty_grad_op = register("fastcl::penalty_grad_", _grad_impl, _value_fake, mutates_args=("grads",))
_penalty_with_grad_op = register("fastcl::penalty_with_grad", _with_grad_impl, _with_grad_fake)


# ----------------------------------------------------------------------------- autograd

def _value_and_gradient(params, anchors, weights, scale, form, idx) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The value, and ``s·w·φ'(θ−a)`` for the positions ``idx`` in fresh buffers (store mode)."""
    if len(idx) == len(params):
        buffers = [torch.empty_like(p) for p in params]
        return _penalty_eager(params, anchors, weights, scale, form, buffers, True, own_grads=True), buffers
    pick = lambda seq, sel: None if seq is None else [seq[i] for i in sel]  # noqa: E731
    chosen = set(idx)
    rest = [i for i in range(len(params)) if i not in chosen]
    buffers = [torch.empty_like(params[i]) for i in idx]
    value = _penalty_eager(pick(params, rest), pick(anchors, rest), pick(weights, rest), scale, form, None, False)
    if idx:
        value = value + _penalty_eager(pick(params, idx), pick(anchors, idx), pick(weights, idx), scale, form,
                                       buffers, True, own_grads=True)
    return value, buffers


def _scale_(buffers: list[torch.Tensor], factor: torch.Tensor) -> None:
    """``buffers *= factor`` in place, per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for b in buffers:
        by_device[b.device].append(b)
    for device, group in by_device.items():
        torch._foreach_mul_(group, factor if factor.device == device else factor.to(device))


def _differentiable_gradient(p, a, w, scale, form, grad_output) -> torch.Tensor:
    """``grad_output·s·w·φ'(θ−a)`` from torch ops, for ``create_graph=True``."""
    acc = acc_dtype(p.dtype)
    d = p.to(acc) - a.to(acc)
    slope = d if form == "quadratic" else d.sign()
    step = slope * scale if w is None else slope * (w.to(acc) * scale)
    return (step * grad_output.to(acc)).to(p.dtype)


class _AnchoredPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale, form, anchors, weights, *params):
        ctx.scale, ctx.form, ctx.anchors, ctx.weights = scale, form, anchors, weights
        ctx.idx = [i for i, need in enumerate(ctx.needs_input_grad[4:]) if need]
        ctx.save_for_backward(*params)  # read only by create_graph and a second backward
        value, ctx.buffers = _value_and_gradient(params, anchors, weights, scale, form, ctx.idx)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        out = [None] * (len(ctx.needs_input_grad) - 4)
        buffers, ctx.buffers = ctx.buffers, None  # ours no longer: AccumulateGrad may adopt them
        if torch.is_grad_enabled():  # create_graph=True
            params = ctx.saved_tensors
            for i in ctx.idx:
                w = None if ctx.weights is None else ctx.weights[i]
                out[i] = _differentiable_gradient(params[i], ctx.anchors[i], w, ctx.scale, ctx.form, grad_output)
            return (None, None, None, None, *out)
        if buffers is None:  # a second backward through a retained graph
            params = ctx.saved_tensors
            _, buffers = _value_and_gradient(params, ctx.anchors, ctx.weights, ctx.scale, ctx.form, ctx.idx)
        # On CPU the factor is read (usually exactly 1: no pass at all); on other devices it
        # is applied without reading it back, which would synchronise with the device.
        if buffers and (grad_output.device.type != "cpu" or grad_output.item() != 1.0):
            _scale_(buffers, grad_output)
        for j, i in enumerate(ctx.idx):
            out[i] = buffers[j]
        del buffers
        return (None, None, None, None, *out)


class _TracedAnchoredPenalty(torch.autograd.Function):
    """The same under torch.compile: a functional op returns fresh gradients to save."""

    @staticmethod
    def forward(ctx, scale, form, anchors, weights, *params):
        value, grads = _penalty_with_grad_op(list(params), anchors, weights or [], scale, form)
        ctx.save_for_backward(*grads)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None, None, None, *(g * grad_output for g in ctx.saved_tensors))


def anchored_penalty(
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor] | None = None,
    *,
    scale: float = 1.0,
    form: str = "quadratic",
) -> torch.Tensor:
    """Differentiable ``s·Σ w·φ(θ−a)`` (gradient flows to ``params`` only).

    The forward pass reads θ, a, w once and stores ``s·w·φ'(θ−a)`` for the parameters
    that need a gradient; backward hands those buffers to autograd (no second pass when
    the incoming gradient is 1, one multiply otherwise). Supports ``create_graph=True``
    and ``torch.compile``. For the fastest training step, strategies also offer
    ``add_penalty_grad_()``, which calls :func:`penalty` with ``grads=[p.grad ...]``
    after ``loss.backward()`` (one memory pass, no autograd graph).
    """
    params = list(params)
    anchors = list(anchors)
    weights = None if weights is None else list(weights)
    scale = _checked_scalars(scale, form)
    if not params:
        return torch.zeros((), dtype=torch.float32)
    if not torch.is_grad_enabled() or not any(p.requires_grad for p in params):
        return penalty(params, anchors, weights, scale=scale, form=form)
    if compiling():
        _validate_inputs(params, anchors, weights)
        return _TracedAnchoredPenalty.apply(scale, form, anchors, weights, *params)
    return _AnchoredPenalty.apply(scale, form, anchors, weights, *params)
