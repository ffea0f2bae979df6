r"""Replaying the provenance of a forward pass that repeats one already traced, call for call.

The :class:`~.provenance.Tracer` runs Python for every ATen op of the forward. Data sets are
mostly batches of one shape fed to one forward, so from the second batch on the engine
*replays* the tags of the first instead, without the tracer, when it can prove that the
tracer would give the same tags again.

**What is recorded** (:class:`Recorder`, during a traced batch): one :class:`Step` per call
the :class:`~.capture.Capture` intercepts (every torch function and tensor method the
forward and the losses call), with

* its signature: the function, every non-tensor argument (compared by type and value), and
  for each tensor argument its tag, shape, strides, dtype and ``requires_grad``, which
  arguments are the same tensor, and the grad mode;
* the shape, dtype and tag of each tensor it returns, and whether the capture made a record
  of it (calls it makes none of are replayed as the call alone).

**Why a replay gives the tracer's tags.** A tag is a function of the ATen ops the call runs,
their tensor arguments' tags and metadata, and their non-tensor arguments (the tracer's
rules read nothing else, see the exception below). The ATen ops a torch function runs are
determined by its arguments' metadata and its non-tensor arguments. So a call whose
signature equals the recorded one returns tensors with the recorded tags, and by induction
over the calls (the replayed tags are what the next signatures compare), the whole
forward has the recorded tags: the capture's records (:class:`~.capture.Use`,
:class:`~.capture.Boundary`) and the per-sample structure of the losses are those of the
traced batch, built on this batch's tensors. Anything that happens outside an intercepted
call and changes a tag (a tensor computed with torch functions disabled, a cached tensor, an
op the tracer saw but the capture did not) shows up as a different tag in the next
signature.

**When there is no replay** (the next batch is traced again; :meth:`Recorder.script` is
``None``):

* a tag was derived from tensor values (:data:`~.provenance.VALUE_READS`: a shared tensor
  found constant along the samples, an index found equal to ``arange(n)``): the next batch
  may hold other values;
* an in-place write made older views of a tensor stale (the tracer's epochs);
* a call whose non-tensor arguments cannot be compared (any type but ``None``, ``bool``,
  ``int``, ``float``, ``str``, dtypes, devices, sizes, layouts, memory formats, slices and
  tuples or lists of these and of tensors), or a call the capture follows inside
  (``multi_head_attention_forward`` with tracked weights);
* a call that is not a torch builtin nor a Python function of ``torch.nn.functional``,
  ``torch.functional`` or ``torch.Tensor`` (whose ATen ops could depend on values).

**Divergence.** A replayed call whose signature or results differ from the record (other
shapes, a data-dependent output size, another branch of the model's Python code), or a
forward with more or fewer calls, raises :class:`Diverged` inside the forward: the engine
discards the batch's partial records and traces it again (so the model's forward runs twice
for that batch), then keeps the new record.
"""
from __future__ import annotations

import types
from typing import NamedTuple

import torch

from .provenance import VALUE_READS

__all__ = ["Diverged", "Player", "Recorder", "Script", "batch_key"]

_PLAIN = frozenset({type(None), bool, int, float, str, torch.dtype, torch.device, torch.Size, torch.layout,
                    torch.memory_format, type(Ellipsis)})
_BUILTIN = (types.BuiltinFunctionType, types.BuiltinMethodType, types.MethodDescriptorType,
            types.WrapperDescriptorType, types.MethodWrapperType, types.GetSetDescriptorType,
            types.MemberDescriptorType, types.ClassMethodDescriptorType)
_TORCH_MODULES = frozenset({"torch.nn.functional", "torch.functional", "torch._tensor"})
_TENSOR = object()  # placeholder of a tensor argument in a signature


class Diverged(Exception):
    """A replayed forward left its record: the batch is traced instead."""


class _Opaque(Exception):
    pass


class Step(NamedTuple):
    signature: tuple
    outputs: tuple  # ((shape, dtype, tag), ...) of the tensors the call returned
    plain: bool  # the capture made no record of it (no use, boundary or unprovable parameter): replayed as the call alone


class Script(NamedTuple):
    """A replayable record of one traced forward and its losses."""

    steps: tuple
    phases: tuple  # number of steps at the end of each phase (forward, losses)
    unprovable: dict  # what the tracer itself marked unprovable (the capture re-adds its own)


def batch_key(leaves) -> tuple:
    """Which record a batch may replay: the shapes and dtypes of its tensors (a cheap first filter)."""
    return tuple((t.shape, t.dtype, t.device) for t in leaves)


def _arg_key(a, tensors: list):
    if isinstance(a, torch.Tensor):
        tensors.append(a)
        return _TENSOR
    cls = type(a)
    if cls in _PLAIN:
        return (cls, a)
    if cls is tuple or cls is list:
        return (cls, tuple(_arg_key(b, tensors) for b in a))
    if cls is slice:
        return (slice, _arg_key(a.start, tensors), _arg_key(a.stop, tensors), _arg_key(a.step, tensors))
    raise _Opaque


def _comparable(func) -> bool:
    if isinstance(func, _BUILTIN):
        return True
    if isinstance(func, types.FunctionType):
        return func.__module__ in _TORCH_MODULES
    if isinstance(func, property):
        return True
    return False


def signature(tracer, func, args, kwargs):
    """The call's signature (see the module docstring), or ``None`` when it cannot be compared."""
    if not _comparable(func):
        return None
    tensors: list = []
    try:
        a = tuple(_arg_key(x, tensors) for x in args)
        k = tuple((n, _arg_key(v, tensors)) for n, v in kwargs.items()) if kwargs else ()
    except _Opaque:
        return None
    tag = tracer.tag
    metas = tuple((tag(t), t.shape, t.stride(), t.dtype, t.requires_grad) for t in tensors)
    alias = None
    if len(tensors) > 1:
        ids = [id(t) for t in tensors]
        if len(set(ids)) != len(ids):
            alias = tuple(ids.index(i) for i in ids)
    return (func, a, k, torch.is_grad_enabled(), metas, alias)


def tensor_outputs(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, torch.Tensor)]
    return []


class Recorder:
    """Records the steps of a traced batch (the capture calls :meth:`step` for every call)."""

    def __init__(self, tracer):
        self.tracer = tracer
        self.steps: list[Step] = []
        self.phases: list[int] = []
        self.ok = True
        self.reads = VALUE_READS[0]

    def step(self, capture, func, args, kwargs):
        sig = signature(self.tracer, func, args, kwargs) if self.ok else None
        if sig is None:
            self.ok = False
            return capture.dispatch(func, args, kwargs)
        records = (len(capture.uses), len(capture.boundaries), len(capture.unprovable))
        out = capture.dispatch(func, args, kwargs)
        plain = records == (len(capture.uses), len(capture.boundaries), len(capture.unprovable))
        tag = self.tracer.tag
        self.steps.append(Step(sig, tuple((o.shape, o.dtype, tag(o)) for o in tensor_outputs(out)), plain))
        return out

    def unreplayable(self) -> None:
        """The capture followed a call from inside (its records are not one per step)."""
        self.ok = False

    def end_phase(self) -> None:
        self.phases.append(len(self.steps))

    def script(self) -> Script | None:
        """The record, or ``None`` when it cannot be replayed (see the module docstring)."""
        if not self.ok or self.tracer.written or VALUE_READS[0] != self.reads:
            return None
        return Script(tuple(self.steps), tuple(self.phases), dict(self.tracer.unprovable))


class Player:
    """Replays a :class:`Script`: checks each call against its step and tags its results."""

    def __init__(self, script: Script, tracer):
        self.script, self.tracer = script, tracer
        self.pos = 0
        self.phase = 0
        self.pending = None  # the current step's recorded outputs until the capture runs the call
        self.diverged = False
        tracer.unprovable.update(script.unprovable)

    def _diverge(self):
        self.diverged = True
        raise Diverged

    def step(self, capture, func, args, kwargs):
        steps = self.script.steps
        if self.diverged or self.pos >= len(steps):
            self._diverge()
        rec = steps[self.pos]
        if signature(self.tracer, func, args, kwargs) != rec.signature:
            self._diverge()
        self.pos += 1
        self.pending = rec.outputs
        if rec.plain:  # the capture would only run the call
            out = func(*args, **kwargs)
            self.ran(out)
            return out
        out = capture.dispatch(func, args, kwargs)
        if self.pending is not None:  # the capture ran the op itself (a rule's autograd Function): compare tags
            self.pending = None
            outs = tensor_outputs(out)
            tag = self.tracer.tag
            if len(outs) != len(rec.outputs) or any(
                    o.shape != shape or o.dtype != dtype or tag(o) != t for o, (shape, dtype, t) in zip(outs, rec.outputs)):
                self._diverge()
        return out

    def unreplayable(self) -> None:
        self._diverge()

    def ran(self, out) -> None:
        """The capture ran the current call: check its results against the record and tag them."""
        rec = self.pending
        if rec is None:  # a second op inside one call: not a replayable step
            self._diverge()
        self.pending = None
        outs = tensor_outputs(out)
        if len(outs) != len(rec):
            self._diverge()
        store = self.tracer.retag
        for o, (shape, dtype, tag) in zip(outs, rec):
            if o.shape != shape or o.dtype != dtype:
                self._diverge()
            store(o, tag)

    def end_phase(self) -> None:
        phases = self.script.phases
        if self.diverged or self.phase >= len(phases) or self.pos != phases[self.phase]:
            self._diverge()
        self.phase += 1
