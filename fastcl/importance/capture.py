r"""Capture of every use of the tracked parameters during one forward pass.

A :class:`Capture` (a ``TorchFunctionMode``) sees each torch function call; the
:class:`~fastcl.importance.provenance.Tracer` below it tags every tensor with where its
samples are. A call that involves a tracked parameter, or a tensor carrying one
(``Shared`` with deps), becomes one read-only record:

* :class:`Use` — a call of a recognised op (see :mod:`.rules`) with tracked parameters in
  its slots and an input ``x`` that is

  - batched: the op runs as an autograd Function whose backward computes only the input
    gradient and hands ``(x, g)`` to the engine (no weight gradient is ever computed);
  - shared by all samples (``embedding(arange(T))``, ``proj(prototypes)``): the op runs as
    usual and its output is tagged with the use, so that where it meets the batch its
    per-sample gradient can be recovered;

* :class:`Boundary` — any other call where a tensor carrying tracked values meets the
  batch and produces one batched result ``Z`` (``x + pos``, ``w * x``, ``cat([cls, x])``,
  a parameter used directly): a hook on ``Z`` gives the engine ``∂L/∂Z``, from which the
  per-sample gradient of each shared input follows exactly (see :mod:`.engine`).

Anything else (an input of unknown provenance, a call whose result has no provable sample
structure, tracked values mixed into the batch where no call can be followed) marks the
parameters ``unprovable``, with the reason, and they take the exact fallback.
"""
from __future__ import annotations

import functools
import itertools
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .provenance import Batched, Shared, Unknown, tensor_leaves
from .recording import Player
from .rules import Call, Rule, rule_for

__all__ = ["Boundary", "Capture", "Use"]

_REAL_LINEAR = F.linear
_MHA_FORWARD = F.multi_head_attention_forward


@dataclass(frozen=True, eq=False)
class Use:
    """One call of a recognised op on tracked parameters (read-only)."""

    key: int
    rule: Rule
    call: Call
    slots: dict  # {slot: canonical parameter name}
    x_tag: Any  # Batched, Shared, or None (a batch of one sample: everything is that sample)
    out: torch.Tensor | None = None  # shared uses: the output, whose per-sample gradient the boundaries find
    saved: tuple = ()  # shared uses: what the rule's forward saved (aligned with x)


@dataclass(frozen=True, eq=False)
class Boundary:
    """A call where tensors carrying tracked values meet the batch (read-only)."""

    key: int
    func: Any
    leaves: tuple  # the call's flattened arguments, tensors detached (mutated ones cloned before the call)
    spec: Any
    shared: tuple  # positions in ``leaves`` of the inputs carrying tracked values
    sources: tuple  # those inputs as they are in the graph (for pulling their per-sample gradients back)
    deps: tuple  # their deps
    z_tag: Batched
    z_index: Any  # None: the output; int: that output; "mutated:<i>": leaf i, written in place
    op: str | None = None  # "add" (scale) or "mul" (other) when the per-sample gradient has a closed form
    scale: float = 1.0
    other: torch.Tensor | None = None
    versions: tuple = ()  # version counters of ``leaves`` and ``other`` when recorded


# --------------------------------------------------------------------------- autograd Function


class _RuleFunction(torch.autograd.Function):
    """The op of a batched :class:`Use`; backward = input gradient + the rule, no weight gradient."""

    @staticmethod
    def forward(ctx, sink, use, x, *params):
        # The output carries the samples as x does (checked for every rule by the tests), so the
        # tracer need not see the op: it is tagged after the call.
        with torch._C._DisableTorchDispatch():
            out, saved = use.rule.forward(use.call)
        ctx.state = (sink, use, len(params))
        if saved:
            ctx.save_for_backward(x, *[s.detach() for s in saved])
        else:
            ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, g):
        x, *saved = ctx.saved_tensors
        sink, use, n_params = ctx.state
        call = use.call._replace(x=x)
        saved = tuple(saved)
        sink(use, call, saved, g)
        grad_x = use.rule.input_grad(call, saved, g) if ctx.needs_input_grad[2] else None
        return (None, None, grad_x) + (None,) * n_params


# torch.autograd.Function.apply walks its arguments for functorch wrappers before calling the C++
# apply; outside functorch transforms that walk is a no-op costing tens of microseconds per call.
_APPLY = super(torch.autograd.Function, _RuleFunction).apply


def _apply(*args):
    if torch._C._are_functorch_transforms_active():
        return _RuleFunction.apply(*args)
    return _APPLY(*args)


# --------------------------------------------------------------------------- elementwise closed forms


def _elementwise_funcs() -> dict:
    """``{func: (op, sign, in_place)}`` for the spellings of ``a + b``, ``a - b`` and ``a * b``."""
    names = {
        ("add", 1, False): ("add", "__add__", "__radd__"),
        ("add", -1, False): ("sub", "subtract", "__sub__"),
        ("mul", 1, False): ("mul", "multiply", "__mul__", "__rmul__"),
        ("add", 1, True): ("add_", "__iadd__"),
        ("add", -1, True): ("sub_", "__isub__"),
    }
    owners = [torch, torch.Tensor] + [getattr(torch._C, n) for n in ("TensorBase", "_TensorBase") if hasattr(torch._C, n)]
    table = {}
    for op, attrs in names.items():
        for owner in owners:
            for attr in attrs:
                func = getattr(owner, attr, None)
                if func is not None and func not in table:
                    table[func] = op
    return table


_ELEMENTWISE = _elementwise_funcs()
_IN_PLACE_DUNDER = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                    "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__"}


def _func_name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _in_place(func, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.startswith("_")) or name in _IN_PLACE_DUNDER or kwargs.get("out") is not None


def _rebind(fn, namespace):
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


class _Handling:
    def __init__(self, tracer):
        self.tracer = tracer

    def __enter__(self):
        if self.tracer is not None:
            self.tracer.handling += 1

    def __exit__(self, *exc):
        if self.tracer is not None:
            self.tracer.handling -= 1


# --------------------------------------------------------------------------- the capture


class Capture(TorchFunctionMode):
    """Records the :class:`Use` s and :class:`Boundary` s of one forward pass.

    ``tracked``: ``{id(parameter): canonical name}``; ``sink(use, call, saved, g)``: called
    from the backward of batched uses; ``on_boundary(boundary, grad)``: called by the hooks on
    boundary results. :meth:`begin` starts each batch with its provenance tracer (``None``
    for a batch of one sample, where every tensor belongs to that sample).
    """

    def __init__(self, tracked: dict[int, str], sink, on_boundary):
        super().__init__()
        self.tracked = tracked
        self.sink, self.on_boundary = sink, on_boundary
        self._mha_impl = False  # built on first use (see _instrumented_mha)
        self.begin(None)

    def begin(self, tracer, steps=None) -> None:
        """Start a batch with ``tracer`` (``None``: one sample, or between batches); forget the last one.

        ``steps``: a :class:`~.recording.Recorder` (the tracer runs; its calls are recorded) or a
        :class:`~.recording.Player` (the tracer is not running: the calls replay a record).
        """
        self.tracer = tracer
        self.steps = steps
        self.player = steps if isinstance(steps, Player) else None
        self.uses: list[Use] = []
        self.boundaries: list[Boundary] = []
        self.unprovable: dict = {} if tracer is None else tracer.unprovable
        self._keys = itertools.count()
        self._handling = _Handling(tracer)

    # ------------------------------------------------------------------ helpers

    def _tag(self, t):
        if self.tracer is None:
            name = self.tracked.get(id(t))
            return Shared(frozenset((name,))) if name is not None else Shared()
        return self.tracer.tag(t)

    def _unprovable(self, deps, reason: str) -> None:
        for dep in deps:
            self.unprovable.setdefault(dep, reason)

    # ------------------------------------------------------------------ interception

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.steps is not None:
            return self.steps.step(self, func, args, kwargs)
        return self.dispatch(func, args, kwargs)

    def _call(self, func, args, kwargs):
        """Run the intercepted call itself (a replay tags its results from the record)."""
        out = func(*args, **kwargs)
        if self.player is not None:
            self.player.ran(out)
        return out

    def dispatch(self, func, args, kwargs):
        """Handle one intercepted call (a use, a boundary, or a plain call)."""
        if func is _MHA_FORWARD:
            return self._mha(func, args, kwargs)
        if func is F.batch_norm and torch.is_grad_enabled() and (
            kwargs.get("training", args[5] if len(args) > 5 else False)
            or (len(args) > 1 and args[1] is None and kwargs.get("running_mean", None) is None)
        ):
            raise ValueError(
                "a batch norm layer normalises with batch statistics during the importance pass "
                "(track_running_stats=False, or a forward that puts it in training mode); the samples of "
                "a batch are then coupled and per-sample gradients are undefined"
            )
        return self.handle(func, args, kwargs)

    def handle(self, func, args, kwargs):
        if not torch.is_grad_enabled():
            return self._call(func, args, kwargs)
        carrying_tensors = []
        for t in tensor_leaves(args, kwargs):
            tag = self._tag(t)
            if isinstance(tag, Shared) and tag.deps:
                carrying_tensors.append((t, tag))
        if not carrying_tensors:
            return self._call(func, args, kwargs)
        rule = rule_for(func)
        if rule is not None:
            out = self._use(rule, func, args, kwargs, carrying_tensors)
            if out is not NotImplemented:
                return out
        leaves, spec = tree_flatten((args, kwargs))
        carrying = []
        for i, t in enumerate(leaves):
            if isinstance(t, torch.Tensor):
                tag = self._tag(t)
                if isinstance(tag, Shared) and tag.deps:
                    carrying.append((i, tag))
        return self._boundary(func, args, kwargs, leaves, spec, carrying)

    # ------------------------------------------------------------------ recognised ops

    def _use(self, rule, func, args, kwargs, carrying):
        call = rule.parse(args, kwargs)
        if call is None:
            return NotImplemented
        if isinstance(call, str):
            out = self._call(func, args, kwargs)
            self._unprovable(set().union(*(tag.deps for _, tag in carrying)), call)
            return out
        slots = {}
        slot_ids = set()
        for slot, t in call.params.items():
            if isinstance(t, torch.Tensor):
                slot_ids.add(id(t))
                name = self.tracked.get(id(t))
                if name is not None:
                    slots[slot] = name
        if not slots:
            return NotImplemented
        for t, tag in carrying:
            if t is call.x:
                continue  # a shared input carrying tracked values: its deps follow the output
            if id(t) not in slot_ids or self.tracked.get(id(t)) is None:
                return NotImplemented  # tracked values elsewhere in the call: a boundary covers every input
        for t in call.params.values():
            if isinstance(t, torch.Tensor) and not isinstance(self._tag(t), Shared):
                return NotImplemented  # weights that depend on the batch
        if self.tracer is None:
            return self._batched_use(rule, func, args, kwargs, call, slots, None)
        x_tag = self.tracer.tag(call.x)
        if isinstance(x_tag, Unknown):
            out = self._call(func, args, kwargs)
            self._unprovable(slots.values(), f"the input of {rule.name} has no provable sample dimension: {x_tag.why}")
            return out
        if isinstance(x_tag, Batched):
            if not rule.sample_dim_ok(call, x_tag.dim):
                out = self._call(func, args, kwargs)
                self._unprovable(slots.values(), f"{rule.name} mixes the dimension that carries the samples (dim {x_tag.dim})")
                return out
            return self._batched_use(rule, func, args, kwargs, call, slots, x_tag)
        return self._shared_use(rule, func, args, kwargs, call, slots, x_tag)

    def _batched_use(self, rule, func, args, kwargs, call, slots, x_tag):
        use = Use(next(self._keys), rule, call, slots, x_tag)
        with self._handling:
            if rule.has_forward:
                names = [k for k, v in call.params.items() if isinstance(v, torch.Tensor)]
                out = _apply(self.sink, use, call.x, *[call.params[k] for k in names])
                if self.tracer is not None:
                    self.tracer.retag(out, x_tag)
            else:
                out = self._call(func, args, kwargs)
                if isinstance(out, torch.Tensor) and out.requires_grad:
                    out.register_hook(functools.partial(self._hook, use))
                if self.tracer is not None and self.tracer.tag(out) != x_tag:
                    self._unprovable(slots.values(), f"the output of {rule.name} does not carry the samples as its input does")
        self.uses.append(use)
        return out

    def _hook(self, use, grad):
        self.sink(use, use.call, (), grad)

    def _shared_use(self, rule, func, args, kwargs, call, slots, x_tag):
        if rule.has_forward:
            with torch._C._DisableTorchDispatch():  # shared in, shared out: tagged below
                out, saved = rule.forward(call)
        else:
            out, saved = self._call(func, args, kwargs), ()
        use = Use(next(self._keys), rule, call._replace(x=call.x.detach()), slots, x_tag, out, tuple(s.detach() for s in saved))
        self.uses.append(use)
        self.tracer.retag(out, Shared(frozenset((("use", use.key),)) | x_tag.deps))
        return out

    # ------------------------------------------------------------------ boundaries

    def _boundary(self, func, args, kwargs, leaves, spec, carrying):
        deps = set().union(*(t.deps for _, t in carrying))
        if self.tracer is None:  # one sample: the plain gradient is the per-sample gradient
            return self._call(func, args, kwargs)
        name = _func_name(func)
        in_place = _in_place(func, kwargs)
        if in_place and any(i == 0 for i, _ in carrying):
            out = self._call(func, args, kwargs)
            self._unprovable(deps, f"written into in place by {name} (mixing the batch into it)")
            return out
        closed = self._closed_form(func, args, kwargs, carrying)
        snapshot = []
        for i, t in enumerate(leaves):
            if not isinstance(t, torch.Tensor):
                snapshot.append(t)
            elif in_place and i == 0 and closed is None:
                snapshot.append(t.detach().clone())  # the generic path re-runs the call on the old value
            else:
                snapshot.append(t.detach())
        versions = [t._version if isinstance(t, torch.Tensor) else None for t in leaves]
        with self._handling:
            out = self._call(func, args, kwargs)
        results = []
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for j, o in enumerate(outs):
            if isinstance(o, torch.Tensor):
                results.append((o, None if not isinstance(out, (tuple, list)) else j))
        for i, t in enumerate(leaves):
            if isinstance(t, torch.Tensor) and t._version != versions[i] and not any(t is r for r, _ in results):
                results.append((t, f"mutated:{i}"))
        tags = [self.tracer.tag(r) for r, _ in results]
        if all(isinstance(t, Shared) for t in tags):
            return out
        batched = [(r, where, t) for (r, where), t in zip(results, tags) if isinstance(t, Batched)]
        unknown = [t for t in tags if isinstance(t, Unknown)]
        if unknown or len(batched) != 1:
            why = unknown[0].why if unknown else "several results carry the samples"
            self._unprovable(deps, f"used by {name}, whose result has no provable sample dimension ({why})")
            return out
        z, where, z_tag = batched[0]
        if in_place and where is None and z is leaves[0]:
            where = "mutated:0"
        if not z.requires_grad:
            return out
        op, scale, other = None, 1.0, None
        if closed is not None:
            op, scale, other = closed
            s = leaves[carrying[0][0]]
            d = z_tag.dim - (z.dim() - s.dim())
            if d >= 0 and s.shape[d] != 1:
                op = None  # the shared tensor is not broadcast over the samples: the general path
                if in_place:
                    self._unprovable(deps, f"added in place by {name} without broadcasting over the samples")
                    return out
        record_versions = tuple(t._version if isinstance(t, torch.Tensor) else None for t in snapshot)
        b = Boundary(
            next(self._keys), func, tuple(snapshot), spec, tuple(i for i, _ in carrying),
            tuple(leaves[i] for i, _ in carrying), tuple(t.deps for _, t in carrying), z_tag, where,
            op, scale, other, record_versions,
        )
        self.boundaries.append(b)
        z.register_hook(functools.partial(self.on_boundary, b))
        return out

    def _closed_form(self, func, args, kwargs, carrying):
        """``(op, scale, other)`` for ``x ± α·s``, ``s ± α·x`` and ``x * s``, else ``None``.

        ``op="add"``: ``∂z/∂s = scale``; ``op="mul"``: ``∂z/∂s = other`` (the batched operand).
        """
        entry = _ELEMENTWISE.get(func)
        if entry is None or len(carrying) != 1 or len(args) != 2 or set(kwargs) - {"alpha"}:
            return None
        op, sign, _ = entry
        alpha = kwargs.get("alpha", 1)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or (op == "mul" and "alpha" in kwargs):
            return None
        pos = carrying[0][0]
        if pos > 1 or not isinstance(args[1 - pos], torch.Tensor) or not isinstance(args[pos], torch.Tensor):
            return None
        if op == "add":
            return "add", (1.0 if pos == 0 else float(sign * alpha)), None
        return "mul", 1.0, args[1 - pos].detach()

    # ------------------------------------------------------------------ multi-head attention

    def _instrumented_mha(self):
        """``multi_head_attention_forward`` whose projections go through :meth:`_linear_tap`.

        Re-created from its code object with a namespace in which ``linear`` is the tap (no
        global state is patched). ``None`` when this torch's implementation does not have
        the expected structure.
        """
        try:
            namespace = dict(vars(F))
            namespace["linear"] = self._linear_tap
            if "linear" not in _MHA_FORWARD.__code__.co_names:
                return None
            for helper in ("_in_projection_packed", "_in_projection"):
                fn = namespace.get(helper)
                if isinstance(fn, types.FunctionType):
                    namespace[helper] = _rebind(fn, namespace)
            return _rebind(_MHA_FORWARD, namespace)
        except Exception:  # an unexpected torch layout: fall back, never fail
            return None

    def _linear_tap(self, input, weight, bias=None):
        return self.handle(_REAL_LINEAR, (input, weight, bias), {})

    def _mha(self, func, args, kwargs):
        carrying = set()
        for t in tensor_leaves(args, kwargs):
            tag = self._tag(t)
            if isinstance(tag, Shared):
                carrying |= tag.deps
        if not carrying or not torch.is_grad_enabled():
            return self._call(func, args, kwargs)
        if self.steps is not None:
            self.steps.unreplayable()  # the projections inside are separate records: no step of its own
        if self._mha_impl is False:
            self._mha_impl = self._instrumented_mha()
        if self._mha_impl is None:
            out = self._call(func, args, kwargs)
            self._unprovable(carrying, "multi_head_attention_forward could not be instrumented")
            return out
        # every use inside goes through the taps; anything else is caught by the tracer
        return self._mha_impl(*args, **kwargs)


def rebuild(boundary: Boundary, replace: dict) -> tuple:
    """The boundary call's ``(args, kwargs)`` with leaves ``replace[i]`` substituted."""
    leaves = [replace.get(i, l) for i, l in enumerate(boundary.leaves)]
    args, kwargs = tree_unflatten(leaves, boundary.spec)
    return args, kwargs
