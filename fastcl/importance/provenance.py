r"""Which dimension of each tensor carries the samples: known from provenance, never from sizes.

During the importance forward pass a :class:`Tracer` (a ``TorchDispatchMode``) sees every
ATen op and gives each tensor it produces a *tag*:

* :class:`Batched` ``(dim, n, inner)``: along ``dim`` the tensor is split into the ``n``
  samples of the batch; index ``i`` of that dim belongs to sample ``(i // inner) % n``,
  and every element of that slice depends on that sample only (and on shared tensors).
  ``inner > 1`` or a dim larger than ``n · inner`` describe dims that merge the samples
  with other axes, e.g. ``x.view(B * T, F)`` is ``Batched(0, B, T)`` and the
  ``[T * B, ...]`` rows inside ``nn.MultiheadAttention`` are ``Batched(0, B, 1)``.
* :class:`Shared` ``(deps)``: the tensor does not depend on the batch (parameters,
  buffers, position tables such as ``embedding(arange(T))``, constants). ``deps`` names
  the tracked parameters (and captured shared uses, see :mod:`.capture`) whose values
  it carries, so that their per-sample gradients can be followed.
* :class:`Unknown` ``(why)``: no proof either way. Parameters whose per-sample gradient
  would need it go to the exact fallback, with ``why`` in the warning.

The seeds are the batch tensors whose dim 0 has the batch size (the data convention the
exact fallback also uses) and the model's parameters and buffers. Every op has a rule that
derives the tags of its outputs from the tags of its inputs (pointwise ops broadcast,
views and reshapes move or merge the sample dim, reductions and contractions may not
touch it, ...). An op without a rule that receives a batched input produces ``Unknown``,
and a tensor that the traced forward did not create (built from Python data, a NumPy
round trip, a cached tensor) is ``Unknown`` too: nothing is inferred from sizes, so a
sequence length, a table size or a number of rows equal to the batch size changes nothing.

In-place writes retag the written tensor; a write that could make another view of the
same storage stale (batched data into a shared buffer, a new parameter dependency)
turns every older view of that storage ``Unknown``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Batched", "Shared", "Tracer", "Unknown", "per_sample"]

aten = torch.ops.aten


class Batched(NamedTuple):
    dim: int
    n: int
    inner: int = 1


class Shared(NamedTuple):
    deps: frozenset = frozenset()


class Unknown(NamedTuple):
    why: str


SHARED = Shared()


def per_sample(t: torch.Tensor, tag: Batched) -> torch.Tensor:
    """``t`` with its samples first: ``[n, *t.shape]`` where the sample dim keeps ``size / n`` entries.

    ``out[b]`` holds exactly sample ``b``'s part of ``t``, in ``t``'s layout (the sample dim
    keeps the positions of the other axes merged into it). A view where possible.
    """
    d, n, inner = tag
    outer = t.shape[d] // (n * inner)
    if outer == 1 and inner == 1:
        return t.unsqueeze(1) if d == 0 else t.movedim(d, 0).unsqueeze(d + 1)
    return t.unflatten(d, (outer, n, inner)).movedim(d + 1, 0).flatten(d + 1, d + 2)


# --------------------------------------------------------------------------- helpers


def tensor_leaves(args, kwargs) -> list:
    """The tensors among ``args`` and ``kwargs`` values, one level of lists/tuples deep (ATen signatures)."""
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(b for b in a if isinstance(b, torch.Tensor))
    return out


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _wrap(d, ndim):
    return d + ndim if d < 0 else d


def _join(tags, what):
    """Tags of inputs that must agree: ``Unknown`` wins, then one common ``Batched``, else ``Shared``."""
    batched, deps = None, frozenset()
    for t in tags:
        if isinstance(t, Unknown):
            return t
        if isinstance(t, Batched):
            if batched is None:
                batched = t
            elif t != batched:
                return Unknown(f"{what} combines samples laid out as {batched} and {t}")
        else:
            deps |= t.deps
    return batched if batched is not None else (Shared(deps) if deps else SHARED)


def _any_batched(tags):
    return any(isinstance(t, Batched) for t in tags)


def _shared(tags):
    """``Shared`` with the union of deps when every tag is shared, else ``None``."""
    deps = frozenset()
    for t in tags:
        if not isinstance(t, Shared):
            return None
        deps |= t.deps
    return Shared(deps) if deps else SHARED


# --------------------------------------------------------------------------- the tracer


try:  # the frame-evaluation hook of dynamo: off while our handler runs (see Tracer._should_skip_dynamo)
    from torch._C._dynamo.eval_frame import set_eval_frame as _set_eval_frame
except ImportError:  # pragma: no cover - torch without dynamo
    _set_eval_frame = None


class Tracer(TorchDispatchMode):
    """Tags every tensor produced during one forward pass (see the module docstring).

    ``tracked``: ``{id(parameter): name}`` of the parameters whose importance is computed
    (shared, with ``deps = {name}``); it may change during the pass (FSDP2 swaps in
    unsharded parameters). ``constants``: ids of the model's other parameters and buffers.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps __torch_dispatch__ so that dynamo never compiles it, at several microseconds
        # per op; __torch_dispatch__ below switches dynamo's frame hook off itself, for a fraction.
        return _set_eval_frame is None

    def __init__(self, tracked: dict[int, str], constants: set[int]):
        super().__init__()
        self.tracked = tracked
        self.constants = constants
        # Tags live on the tensors (attribute ``_fastcl_tag``: tag, epoch, this tracer's token), so
        # that they die with them; a tag left by another pass is ignored.
        self.token = object()
        self.seeded: list = []
        # storage -> (epoch of the last harmful write of each element, element dtype)
        self.written: dict[int, tuple] = {}
        self.epoch = 0
        # Ops that combine a tensor carrying tracked values (deps) with the batch must run inside
        # a call the capture handles (a rule or a boundary, ``handling > 0``); anywhere else
        # the deps lose their per-sample trail and are recorded here with the reason.
        self.handling = 0
        self.unprovable: dict = {}
        self.premutated: tuple = ()
        self._saw_deps = False

    # ------------------------------------------------------------------ lookups

    def seed(self, t: torch.Tensor, tag) -> None:
        self._store(t, tag)
        self.seeded.append(t)

    def release(self) -> None:
        """Remove the tags from the batch tensors (the only tensors the tracer tags that the caller owns)."""
        for t in self.seeded:
            try:
                del t._fastcl_tag
            except AttributeError:
                pass
        self.seeded.clear()

    def _store(self, t, tag) -> None:
        t._fastcl_tag = (tag, self.epoch, self.token)

    def tag(self, t: torch.Tensor):
        entry = getattr(t, "_fastcl_tag", None)
        if entry is None or entry[2] is not self.token:
            name = self.tracked.get(id(t))
            if name is not None:
                self._saw_deps = True
                return Shared(frozenset((name,)))
            if isinstance(t, torch.nn.Parameter) or id(t) in self.constants or t.dim() == 0:
                return SHARED
            return Unknown(
                f"a tensor of shape {tuple(t.shape)} that the forward did not compute from the batch, the "
                "parameters or buffers (built from Python or NumPy data, or cached from an earlier call)"
            )
        tag, epoch, _ = entry
        if self.written and self._overwritten(t, epoch):
            return Unknown("a view of a tensor that an in-place write changed after the view was taken")
        if tag.__class__ is Shared and tag.deps:
            self._saw_deps = True
        return tag

    def _overwritten(self, t, epoch) -> bool:
        """Whether elements of ``t`` were written harmfully (see :func:`_harmless`) after its tag was set."""
        record = self.written.get(_storage_key(t))
        if record is None or t.numel() == 0:
            return False
        epochs, dtype = record
        if dtype != t.dtype:
            return int(epochs.max()) > epoch
        try:
            region = epochs.as_strided(t.shape, t.stride(), t.storage_offset())
        except RuntimeError:
            return int(epochs.max()) > epoch
        return int(region.max()) > epoch

    def retag(self, t: torch.Tensor, tag) -> None:
        """Set ``t``'s tag from outside an op (the capture's shared uses)."""
        self._store(t, tag)

    # ------------------------------------------------------------------ dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _set_eval_frame is None:
            return self._dispatch(func, args, kwargs or {})
        prior = _set_eval_frame(None)  # never let dynamo compile the tracer's own frames
        try:
            return self._dispatch(func, args, kwargs or {})
        finally:
            _set_eval_frame(prior)

    def _dispatch(self, func, args, kwargs):
        mutated = _mutated_args(func)
        targets = _mutated_tensors(mutated, args, kwargs) if mutated else ()
        before = [self.tag(t) for t in targets]
        position = self._premutation_check(targets, before, args, kwargs) if targets else None
        out = func(*args, **kwargs)
        self._saw_deps = False
        rule_kwargs = kwargs
        if mutated and any(kw for _, _, kw in mutated):  # out= tensors are results, not inputs
            rule_kwargs = {k: v for k, v in kwargs.items() if k not in {n for _, n, kw in mutated if kw}}
        try:
            result = _rule_of(func)(self, func, args, rule_kwargs, out)
        except Exception as exc:  # a gap in a rule must never break the user's forward
            result = Unknown(f"{func} ({type(exc).__name__}: {exc})")
        if position is not None:
            result = position
        self.premutated = ()
        if targets:
            outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)] if isinstance(out, (tuple, list)) else []
            per_out = result if isinstance(result, list) else [result] * len(outs)
            for t, old in zip(targets, before):
                new = next((tg for o, tg in zip(outs, per_out) if o is t), None)
                if new is None:  # written but not returned (running statistics...)
                    new = _default(self, func, args, rule_kwargs, out)
                self._write(func, t, old, new)
        self._assign(func, out, result)
        if self._saw_deps and not self.handling and _leaves_deps(result):
            self._absorbed(func, args, rule_kwargs)
        return out

    def _absorbed(self, func, args, kwargs) -> None:
        """Deps of inputs that flowed into a non-shared result outside a handled call."""
        for tag in _inputs(self, args, kwargs):
            if isinstance(tag, Shared) and tag.deps:
                for dep in tag.deps:
                    self.unprovable.setdefault(dep, f"combined with the batch by {func} inside a call fastcl cannot follow")

    def _premutation_check(self, targets, before, args, kwargs):
        """In-place ops see their shared target's old values only now: check them against the batched inputs.

        Returns ``Unknown`` when a shared target varies along the dim where a batched input
        puts its samples (see :func:`_position_free`), else ``None``; the rules then skip the
        targets in that check (``premutated``), since they see the written values.
        """
        self.premutated = tuple(id(t) for t, tag in zip(targets, before) if isinstance(tag, Shared))
        if not self.premutated:
            return None
        leaves = tensor_leaves(args, kwargs)
        for t, tag in zip(targets, before):
            if not isinstance(tag, Shared):
                continue
            for other in leaves:
                if other is t or not isinstance(other, torch.Tensor):
                    continue
                otag = self.tag(other)
                if isinstance(otag, Batched):
                    d = otag.dim + t.dim() - other.dim()
                    if 0 <= d < t.dim() and not _constant_along(t, d):
                        return Unknown(
                            "an in-place write mixes the batch into a tensor shared by all samples that varies along "
                            "the dim of the samples"
                        )
        return None

    def _assign(self, func, out, result) -> None:
        if isinstance(out, torch.Tensor):
            self._set(func, out, result[0] if isinstance(result, list) else result)
        elif isinstance(out, (tuple, list)):
            tensors = [o for o in out if isinstance(o, torch.Tensor)]
            tags = result if isinstance(result, list) else [result] * len(tensors)
            for o, tg in zip(tensors, tags):
                self._set(func, o, tg)

    def _set(self, func, t, tag) -> None:
        entry = getattr(t, "_fastcl_tag", None)
        if entry is not None and entry[2] is self.token and entry[0] == tag:
            return
        self._store(t, tag)

    def _write(self, func, t, old, new) -> None:
        """In-place write of data tagged ``new`` into ``t`` (tagged ``old``).

        A harmful write stamps its elements with a new epoch: older views that overlap them
        become ``Unknown`` (views of other parts of the storage keep their tags). Ops that
        only change ``t``'s own shape (``transpose_``) write no data.
        """
        if not _harmless(old, new) and func.overloadpacket.__name__ not in _METADATA_IN_PLACE:
            self.epoch += 1
            key = _storage_key(t)
            if key is not None:
                numel = t.untyped_storage().nbytes() // t.element_size()
                record = self.written.get(key)
                if record is None or record[1] != t.dtype or record[0].numel() != numel:
                    record = (torch.full((numel,), -1, dtype=torch.int64, device=t.device), t.dtype)
                    self.written[key] = record
                try:
                    record[0].as_strided(t.shape, t.stride(), t.storage_offset()).fill_(self.epoch)
                except RuntimeError:
                    record[0].fill_(self.epoch)
        self._store(t, new)


def _leaves_deps(result) -> bool:
    """Whether a result tag (or list) is not shared, i.e. shared inputs' deps would not survive in it."""
    if isinstance(result, list):
        return any(not isinstance(r, Shared) for r in result)
    return not isinstance(result, Shared)


def _storage_key(t):
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # no storage (sparse, functional wrappers)
        return None


def _harmless(old, new) -> bool:
    """Whether other views of the storage keep true tags after data tagged ``new`` is written.

    Views tagged ``Batched(L)`` stay true when the written data is shared or batched the
    same way; views tagged ``Shared(d)`` stay true only for shared data without new deps.
    """
    if isinstance(old, Unknown):
        return True
    if isinstance(new, Unknown):
        return False
    if isinstance(old, Batched):
        return isinstance(new, Shared) or new == old
    return isinstance(new, Shared) and new.deps <= old.deps


_METADATA_IN_PLACE = {"transpose_", "t_", "squeeze_", "unsqueeze_", "swapdims_", "swapaxes_", "detach_"}
_MUTATED_CACHE: dict = {}
_RULE_CACHE: dict = {}


def _rule_of(func):
    """The rule of an op; an in-place op (``add_``) uses the rule of its functional form (``add``)."""
    rule = _RULE_CACHE.get(id(func))  # ops are long-lived singletons; their own __hash__ is slow Python
    if rule is None:
        rule = _RULES.get(func.overloadpacket)
        if rule is None:
            pointwise = torch.Tag.pointwise in func.tags
            name = func.overloadpacket.__name__
            if name.endswith("_") and not name.startswith("_"):
                functional = getattr(aten, name[:-1], None)
                if functional is not None:
                    rule = _RULES.get(functional)
                    overload = getattr(functional, func._overloadname, None)
                    pointwise = pointwise or (overload is not None and torch.Tag.pointwise in overload.tags)
            if rule is None:
                rule = _pointwise if pointwise else _default
        _RULE_CACHE[id(func)] = rule
    return rule


def _mutated_args(func):
    """``[(position, name, keyword-only)]`` of the arguments ``func`` writes into (in-place and ``out=`` ops)."""
    found = _MUTATED_CACHE.get(id(func))
    if found is None:
        found = tuple(
            (i, a.name, a.kwarg_only)
            for i, a in enumerate(func._schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write
        )
        _MUTATED_CACHE[id(func)] = found
    return found


def _mutated_tensors(mutated, args, kwargs):
    out = []
    for i, name, _ in mutated:
        t = args[i] if i < len(args) else kwargs.get(name)
        if isinstance(t, torch.Tensor):
            out.append(t)
        elif isinstance(t, (tuple, list)):
            out.extend(x for x in t if isinstance(x, torch.Tensor))
    return out


# --------------------------------------------------------------------------- rules
#
# A rule is ``rule(tracer, func, args, kwargs, out) -> tag | [tag per output tensor]``.


def _inputs(tracer, args, kwargs):
    return [tracer.tag(t) for t in tensor_leaves(args, kwargs)]


def _default(tracer, func, args, kwargs, out):
    """No rule: shared inputs give a shared result; any batched input gives ``Unknown``."""
    tags = _inputs(tracer, args, kwargs)
    for t in tags:
        if isinstance(t, Unknown):
            return t
    if _any_batched(tags):
        return Unknown(f"{func} has no rule for where its batched input's samples go")
    return _shared(tags)


def _factory(tracer, func, args, kwargs, out):
    """Values that depend on no input's data (``zeros_like``, ``new_ones``...)."""
    return SHARED


def _align(tag, t_ndim, out_shape, t_shape, what):
    """Tag of a tensor broadcast to ``out_shape`` (right-aligned), or ``Unknown``."""
    if not isinstance(tag, Batched):
        return tag
    d = tag.dim + len(out_shape) - t_ndim
    if t_shape[tag.dim] != out_shape[d]:
        return Unknown(f"{what} broadcasts the sample dim")
    return Batched(d, tag.n, tag.inner)


# How many tags were derived from tensor *values* rather than from metadata and provenance (a
# shared tensor constant along the samples, an index equal to arange(n)). A forward whose tags
# read values is never replayed (:mod:`.recording`): the next batch could read other values.
VALUE_READS = [0]


def _constant_along(t: torch.Tensor, d: int) -> bool:
    """Whether ``t`` is the same along dim ``d`` (size 1, expanded, or equal values)."""
    if d < 0 or t.shape[d] == 1 or t.stride(d) == 0 or t.numel() == 0:
        return True
    VALUE_READS[0] += 1
    return bool(torch.equal(t, t.narrow(d, 0, 1).expand_as(t)))


def _position_free(result, pairs, what):
    """``result`` unless a shared tensor varies along the samples' dim (``pairs``: ``(tensor, its dim there)``).

    Sample ``b`` would then meet row ``b`` of that tensor: its loss would depend on its
    position in the batch, unlike the same sample on its own. No per-sample rule applies.
    """
    if not isinstance(result, Batched):
        return result
    for t, d in pairs:
        if not _constant_along(t, d):
            return Unknown(
                f"{what}: a tensor shared by all samples varies along the dim of the samples, so each sample's "
                "result depends on its position in the batch"
            )
    return result


def _broadcast_tags(tracer, tensors, out_shape, what):
    tags, shared = [], []
    for t in tensors:
        tag = tracer.tag(t)
        tags.append(_align(tag, t.dim(), out_shape, t.shape, what))
        if isinstance(tag, Shared) and t.dim() and t.numel() > 1 and id(t) not in tracer.premutated:
            shared.append(t)
    joined = _join(tags, what)
    if isinstance(joined, Batched) and shared:
        return _position_free(joined, [(t, joined.dim - (len(out_shape) - t.dim())) for t in shared], what)
    return joined


def _pointwise(tracer, func, args, kwargs, out):
    """Elementwise with broadcasting: every batched input must put its samples on the same output dim."""
    tensors = tensor_leaves(args, kwargs)
    first = out if isinstance(out, torch.Tensor) else next((o for o in out if isinstance(o, torch.Tensor)), None)
    if first is None:
        return SHARED
    if len(tensors) == 1 and tensors[0].shape == first.shape:  # unary: nothing to broadcast
        return tracer.tag(tensors[0])
    return _broadcast_tags(tracer, tensors, first.shape, func)


def _same(tracer, func, args, kwargs, out):
    """Same elements as the only tensor input (``detach``, ``alias``, ``clone``, dtype/device copies)."""
    return tracer.tag(args[0])


def _copy_(tracer, func, args, kwargs, out):
    dst, src = args[0], args[1]
    return _align(tracer.tag(src), src.dim(), dst.shape, src.shape, "copy_")


def _reduction_loss(reduction_index, name="reduction"):
    """Losses: pointwise with ``reduction='none'`` (0), a sum over samples otherwise."""

    def rule(tracer, func, args, kwargs, out):
        if _arg(args, kwargs, reduction_index, name, 1) == 0:
            return _pointwise(tracer, func, args, kwargs, out)
        return _default(tracer, func, args, kwargs, out)

    return rule


# ------------------------------------------------------------------ shape and view ops


def _reshape_tag(tag, in_shape, out_shape):
    """Where the samples go under a row-major reshape, or ``Unknown`` when they straddle dims."""
    d, n, inner = tag
    stride = inner * math.prod(in_shape[d + 1:])  # flat-index stride of the sample factor
    for e, m in enumerate(out_shape):
        if m == 1 and n > 1:
            continue
        s_e = math.prod(out_shape[e + 1:])
        if s_e and stride % s_e == 0 and (s_e * m) % (stride * n) == 0:
            return Batched(e, n, stride // s_e)
    return Unknown(f"a reshape from {tuple(in_shape)} to {tuple(out_shape)} splits the samples across dims")


def _view(tracer, func, args, kwargs, out):
    tag = tracer.tag(args[0])
    if not isinstance(tag, Batched):
        return tag
    return _reshape_tag(tag, args[0].shape, out.shape)


def _unknown_if(mixes, why):
    """Rule of ops that keep the input's layout unless ``mixes(tag, args, kwargs, out)`` says they touch the
    sample dim of a batched input (then ``Unknown(why)``, ``{func}`` filled in)."""

    def rule(tracer, func, args, kwargs, out):
        tag = tracer.tag(args[0])
        if isinstance(tag, Batched) and mixes(tag, args, kwargs, out):
            return Unknown(why.format(func=func))
        return tag

    return rule


_view_dtype = _unknown_if(lambda tag, args, kwargs, out: tag.dim == args[0].dim() - 1 and out.shape[-1] != args[0].shape[-1],
                          "a dtype view that resizes the sample dim")


def _permute(tracer, func, args, kwargs, out):
    tag = tracer.tag(args[0])
    if not isinstance(tag, Batched):
        return tag
    dims = [_wrap(d, args[0].dim()) for d in _arg(args, kwargs, 1, "dims")]
    return tag._replace(dim=dims.index(tag.dim))


def _transpose(tracer, func, args, kwargs, out):
    tag = tracer.tag(args[0])
    if not isinstance(tag, Batched):
        return tag
    ndim = args[0].dim()
    if func.overloadpacket is aten.t:
        a, b = 0, 1
    else:
        a, b = _wrap(_arg(args, kwargs, 1, "dim0"), ndim), _wrap(_arg(args, kwargs, 2, "dim1"), ndim)
    return tag._replace(dim=b if tag.dim == a else a if tag.dim == b else tag.dim)


def _unsqueeze(tracer, func, args, kwargs, out):
    tag = tracer.tag(args[0])
    if not isinstance(tag, Batched):
        return tag
    d = _wrap(_arg(args, kwargs, 1, "dim"), args[0].dim() + 1)
    return tag._replace(dim=tag.dim + (d <= tag.dim))


def _squeeze(tracer, func, args, kwargs, out):
    tag = tracer.tag(args[0])
    if not isinstance(tag, Batched):
        return tag
    x = args[0]
    dims = _arg(args, kwargs, 1, "dim", None)
    if dims is None:
        dims = range(x.dim())
    elif isinstance(dims, int):
        dims = [dims]
    removed = {_wrap(d, x.dim()) for d in dims if x.shape[_wrap(d, x.dim())] == 1}
    if tag.dim in removed:
        return Unknown("squeeze of the sample dim")
    return tag._replace(dim=tag.dim - sum(1 for d in removed if d < tag.dim))


def _expand(tracer, func, args, kwargs, out):
    tag = tracer.tag(args[0])
    if not isinstance(tag, Batched):
        return tag
    x = args[0]
    d = tag.dim + out.dim() - x.dim()
    if out.shape[d] != x.shape[tag.dim]:
        return Unknown("expand of the sample dim")
    return tag._replace(dim=d)


def _slice(tracer, func, args, kwargs, out):
    tag = tracer.tag(args[0])
    if not isinstance(tag, Batched):
        return tag
    x = args[0]
    dim = _wrap(_arg(args, kwargs, 1, "dim", 0), x.dim())
    if dim != tag.dim or out.shape[dim] == x.shape[dim]:
        return tag
    return Unknown("a slice of the sample dim")


def _select(tracer, func, args, kwargs, out):
    tag = tracer.tag(args[0])
    if not isinstance(tag, Batched):
        return tag
    dim = _wrap(_arg(args, kwargs, 1, "dim"), args[0].dim())
    if dim == tag.dim:
        return Unknown("selecting one index of the sample dim")
    return tag._replace(dim=tag.dim - (dim < tag.dim))


def _pieces(dim_index, what, keeps_dim):
    """``split`` (pieces keep ``dim``) and ``unbind`` (drops it): fine unless they cut the sample dim."""

    def rule(tracer, func, args, kwargs, out):
        tag = tracer.tag(args[0])
        count = len(out)
        if not isinstance(tag, Batched):
            return [tag] * count
        dim = _wrap(_arg(args, kwargs, dim_index, "dim", 0), args[0].dim())
        if dim == tag.dim and (count > 1 or not keeps_dim):
            return [Unknown(f"{what} of the sample dim")] * count
        return [tag if keeps_dim else tag._replace(dim=tag.dim - (dim < tag.dim))] * count

    return rule


_split = _pieces(2, "a split", keeps_dim=True)
_unbind = _pieces(1, "unbind", keeps_dim=False)


def _keep_unless_dims(dims_index, name="dims"):
    """Ops that act along some dims and keep the shape (flip, roll): fine unless the sample dim is one."""

    def rule(tracer, func, args, kwargs, out):
        tag = tracer.tag(args[0])
        if not isinstance(tag, Batched):
            return _default(tracer, func, args, kwargs, out)
        dims = _arg(args, kwargs, dims_index, name, None)
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            return Unknown(f"{func} over all dims")
        dims = [dims] if isinstance(dims, int) else dims
        if tag.dim in {_wrap(d, args[0].dim()) for d in dims}:
            return Unknown(f"{func} along the sample dim")
        return tag

    return rule


def _along_dim(dim_index, name="dim", default=-1):
    """Ops along one dim that keep the shape (softmax, cumsum, sort...) and may have several outputs."""

    def rule(tracer, func, args, kwargs, out):
        tags = _inputs(tracer, args, kwargs)
        for t in tags:
            if isinstance(t, Unknown):
                return t
        tag = tracer.tag(args[0])
        if not isinstance(tag, Batched):
            return _default(tracer, func, args, kwargs, out)
        if _any_batched(tags[1:]):
            return _default(tracer, func, args, kwargs, out)
        dim = _arg(args, kwargs, dim_index, name, default)
        if dim is None or _wrap(dim, args[0].dim()) == tag.dim:
            return Unknown(f"{func} along the sample dim")
        return tag

    return rule


def _topk(tracer, func, args, kwargs, out):
    tag = tracer.tag(args[0])
    if not isinstance(tag, Batched):
        return tag
    if _wrap(_arg(args, kwargs, 2, "dim", -1), args[0].dim()) == tag.dim:
        return Unknown("topk along the sample dim")
    return tag


def _reduce(dims_index, keepdim_index, dims_name="dim", keepdim_name="keepdim", default=None):
    """Reductions over some dims: never over the sample dim."""

    def rule(tracer, func, args, kwargs, out):
        tag = tracer.tag(args[0])
        if not isinstance(tag, Batched):
            return _default(tracer, func, args, kwargs, out)
        x = args[0]
        dims = _arg(args, kwargs, dims_index, dims_name, default) if dims_index is not None else None
        if (isinstance(dims, bool) or not isinstance(dims, (int, list, tuple))
                or (isinstance(dims, (list, tuple)) and len(dims) == 0)):
            return Unknown(f"{func} reduces over every dim, samples included")
        dims = {_wrap(d, x.dim()) for d in ([dims] if isinstance(dims, int) else dims)}
        if tag.dim in dims:
            return Unknown(f"{func} reduces over the sample dim")
        keepdim = keepdim_index is not None and bool(_arg(args, kwargs, keepdim_index, keepdim_name, False))
        return tag if keepdim else tag._replace(dim=tag.dim - sum(1 for d in dims if d < tag.dim))

    return rule


def _full_reduction(tracer, func, args, kwargs, out):
    tag = tracer.tag(args[0])
    if isinstance(tag, Batched):
        return Unknown(f"{func} reduces over every dim, samples included")
    return _default(tracer, func, args, kwargs, out)


def _cat(tracer, func, args, kwargs, out):
    tensors = [t for t in _arg(args, kwargs, 0, "tensors") if not (t.dim() == 1 and t.numel() == 0)]
    ndim = out.dim()
    dim = _wrap(_arg(args, kwargs, 1, "dim", 0), ndim)
    tags = [tracer.tag(t) for t in tensors]
    joined = _join(tags, "cat")
    if isinstance(joined, Batched) and joined.dim == dim:
        return Unknown("cat along the sample dim")
    if isinstance(joined, Batched):
        return _position_free(joined, [(t, joined.dim) for t, tg in zip(tensors, tags) if isinstance(tg, Shared)], "cat")
    return joined


def _stack(tracer, func, args, kwargs, out):
    tensors = list(_arg(args, kwargs, 0, "tensors"))
    dim = _wrap(_arg(args, kwargs, 1, "dim", 0), out.dim())
    tags = [tracer.tag(t) for t in tensors]
    joined = _join(tags, "stack")
    if isinstance(joined, Batched):
        joined = _position_free(joined, [(t, joined.dim) for t, tg in zip(tensors, tags) if isinstance(tg, Shared)], "stack")
    if isinstance(joined, Batched):
        return joined._replace(dim=joined.dim + (dim <= joined.dim))
    return joined


def _repeat(tracer, func, args, kwargs, out):
    tag = tracer.tag(args[0])
    if not isinstance(tag, Batched):
        return tag
    repeats = list(_arg(args, kwargs, 1, "repeats"))
    d = tag.dim + len(repeats) - args[0].dim()
    if repeats[d] != 1:
        return Unknown("repeat of the sample dim")
    return tag._replace(dim=d)


def _repeat_interleave(tracer, func, args, kwargs, out):
    tag = tracer.tag(args[0])
    if not isinstance(tag, Batched) or not isinstance(args[0], torch.Tensor):
        return _default(tracer, func, args, kwargs, out)
    dim = _arg(args, kwargs, 2, "dim", None)
    repeats = _arg(args, kwargs, 1, "repeats")
    if dim is None or _wrap(dim, args[0].dim()) == tag.dim:
        return Unknown("repeat_interleave over the sample dim")
    if isinstance(repeats, torch.Tensor) and not isinstance(tracer.tag(repeats), Shared):
        return Unknown("repeat_interleave with batched repeats")
    return tag


def _pad(n_padded_index=None):
    """``constant_pad_nd`` (pad list, last dim first) and reflection/replication pads."""

    def rule(tracer, func, args, kwargs, out):
        tag = tracer.tag(args[0])
        if not isinstance(tag, Batched):
            return _default(tracer, func, args, kwargs, out)
        pad = list(_arg(args, kwargs, 1, "pad" if n_padded_index is None else "padding"))
        padded = len(pad) // 2
        if tag.dim >= args[0].dim() - padded and out.shape[tag.dim] != args[0].shape[tag.dim]:
            return Unknown("padding of the sample dim")
        if n_padded_index is not None and tag.dim >= args[0].dim() - padded:
            return Unknown("padding of the sample dim")
        return tag

    return rule


# tril / triu act on the last two dims; unfold on one
_last_two = _unknown_if(lambda tag, args, kwargs, out: tag.dim >= args[0].dim() - 2, "{func} over the sample dim")
_unfold = _unknown_if(lambda tag, args, kwargs, out: _wrap(_arg(args, kwargs, 1, "dimension"), args[0].dim()) == tag.dim,
                      "unfold of the sample dim")


def _diagonal(tracer, func, args, kwargs, out):
    tag = tracer.tag(args[0])
    if not isinstance(tag, Batched):
        return tag
    ndim = args[0].dim()
    a, b = _wrap(_arg(args, kwargs, 2, "dim1", 0), ndim), _wrap(_arg(args, kwargs, 3, "dim2", 1), ndim)
    if tag.dim in (a, b):
        return Unknown("diagonal over the sample dim")
    return tag._replace(dim=tag.dim - (a < tag.dim) - (b < tag.dim))


def _one_hot(tracer, func, args, kwargs, out):
    return tracer.tag(args[0])


def _index_select(tracer, func, args, kwargs, out):
    tag, index = tracer.tag(args[0]), _arg(args, kwargs, 2, "index")
    itag = tracer.tag(index)
    if isinstance(itag, Unknown):
        return itag
    if isinstance(tag, Batched):
        if isinstance(itag, Batched) or _wrap(_arg(args, kwargs, 1, "dim"), args[0].dim()) == tag.dim:
            return Unknown("index_select over the sample dim")
        return tag
    return _default(tracer, func, args, kwargs, out)


def _gather(tracer, func, args, kwargs, out):
    """``out[..] = self[.., index[..], ..]`` along ``dim``: the sample dim is another one, aligned."""
    x, index = args[0], _arg(args, kwargs, 2, "index")
    tag, itag = tracer.tag(x), tracer.tag(index)
    dim = _wrap(_arg(args, kwargs, 1, "dim"), x.dim())
    joined = _join([tag, itag], "gather")
    if not isinstance(joined, Batched):
        return joined
    if joined.dim == dim or index.shape[joined.dim] != x.shape[joined.dim]:
        return Unknown("gather over the sample dim")
    pairs = [(t, joined.dim) for t, tg in ((x, tag), (index, itag)) if isinstance(tg, Shared)]
    return _position_free(joined, pairs, "gather")


def _scatter(tracer, func, args, kwargs, out):
    """``scatter``/``scatter_add``/``index_add`` along a dim other than the (aligned) sample dim."""
    x = args[0]
    dim = _wrap(_arg(args, kwargs, 1, "dim"), x.dim())
    tensors = [t for t in (x, *args[2:], *kwargs.values()) if isinstance(t, torch.Tensor)]
    joined = _join([tracer.tag(t) for t in tensors], func)
    if not isinstance(joined, Batched):
        return joined
    if joined.dim == dim or any(t.dim() == x.dim() and t.shape[joined.dim] != x.shape[joined.dim] for t in tensors):
        return Unknown(f"{func} over the sample dim")
    shared = [(t, joined.dim) for t in tensors
              if isinstance(tracer.tag(t), Shared) and t.dim() == x.dim() and id(t) not in tracer.premutated]
    return _position_free(joined, shared, func)


def _index(tracer, func, args, kwargs, out):
    """Advanced indexing ``self[indices]`` (``aten.index.Tensor``).

    Batched results: the samples sit on a dim that no index tensor touches (all index
    tensors shared), or the index tensors carry the samples (aligned with each other), or
    the sample dim is indexed by exactly ``arange(n)`` along one axis (checked by value),
    as in ``mask[arange(B)[:, None], positions]``.
    """
    x, indices = args[0], list(_arg(args, kwargs, 1, "indices"))
    tag = tracer.tag(x)
    present = [i for i, t in enumerate(indices) if t is not None]
    if not present:
        return tag
    idx = [indices[i] for i in present]
    if any(t.dtype == torch.bool for t in idx):
        return _default(tracer, func, args, kwargs, out)
    itags = [tracer.tag(t) for t in idx]
    for t in (tag, *itags):
        if isinstance(t, Unknown):
            return t
    if not _any_batched([tag, *itags]):
        return _shared([tag, *itags])
    shape = torch.broadcast_shapes(*[t.shape for t in idx])
    k = len(shape)
    adjacent = present == list(range(present[0], present[-1] + 1))
    offset = present[0] if adjacent else 0

    def out_dim_of_x(d):  # output position of a non-indexed dim of x
        if adjacent:
            return d if d < present[0] else d - len(present) + k
        return k + d - sum(1 for p in present if p < d)

    aligned = [_align(t, ix.dim(), shape, ix.shape, "index") for t, ix in zip(itags, idx)]
    joined = _join(aligned, "index")
    if isinstance(joined, Unknown):
        return joined
    if isinstance(tag, Batched) and tag.dim not in present:
        if isinstance(joined, Batched):
            return Unknown("advanced indexing mixes batched indices with a batched tensor")
        return tag._replace(dim=out_dim_of_x(tag.dim))
    if isinstance(tag, Shared):
        return joined._replace(dim=offset + joined.dim) if isinstance(joined, Batched) else joined
    # the sample dim of x is indexed: only by arange(n) along one axis of the index shape
    if tag.inner != 1 or x.shape[tag.dim] != tag.n:
        return Unknown("advanced indexing of a merged sample dim")
    pos = present.index(tag.dim)
    ix, itag = idx[pos], itags[pos]
    if not isinstance(itag, Shared):
        return Unknown("the sample dim indexed by batched indices")
    axis = _arange_axis(ix, tag.n, k)
    if axis is None:
        return Unknown("the sample dim indexed by something other than arange(batch size)")
    if isinstance(joined, Batched) and joined != Batched(axis, tag.n, 1):
        return Unknown("advanced indexing mixes two sample layouts")
    return Batched(offset + axis, tag.n, 1)


def _arange_axis(ix, n, k):
    """The axis (of the ``k``-d broadcast index shape) along which ``ix`` is ``arange(n)``, else None."""
    sizes = [1] * (k - ix.dim()) + list(ix.shape)
    axes = [a for a, s in enumerate(sizes) if s != 1]
    if len(axes) != 1 or sizes[axes[0]] != n:
        return None
    expected = torch.arange(n, device=ix.device, dtype=ix.dtype)
    VALUE_READS[0] += 1
    return axes[0] if torch.equal(ix.reshape(-1), expected) else None


def _embedding(tracer, func, args, kwargs, out):
    weight, indices = args[0], args[1]
    wtag, itag = tracer.tag(weight), tracer.tag(indices)
    if isinstance(itag, Unknown) or isinstance(wtag, Unknown):
        return itag if isinstance(itag, Unknown) else wtag
    if isinstance(wtag, Batched):
        return Unknown("an embedding table that depends on the batch")
    if isinstance(itag, Batched):
        return itag
    return Shared(wtag.deps | itag.deps) if (wtag.deps or itag.deps) else SHARED


# ------------------------------------------------------------------ contractions


def _mm(tracer, func, args, kwargs, out):
    """``mm(a [N,K], b [K,M])``, ``addmm(c, a, b)``, ``bmm``/``baddbmm`` with a leading batch dim."""
    packet = func.overloadpacket
    bias = None
    if packet in (aten.addmm, aten.baddbmm, aten._addmm_activation, aten.addmv):
        bias, a, b = args[0], args[1], args[2]
    else:
        a, b = args[0], args[1]
    ta, tb = tracer.tag(a), tracer.tag(b)
    for t in (ta, tb):
        if isinstance(t, Unknown):
            return t
    batched_dim = a.dim() == 3  # bmm: [Bt, N, K] @ [Bt, K, M]
    cands = []
    if isinstance(ta, Batched):
        if ta.dim == a.dim() - 1:
            return Unknown(f"{func} contracts over the sample dim")
        cands.append(ta)
    if isinstance(tb, Batched):
        if b.dim() == 1 or tb.dim == b.dim() - 2:
            return Unknown(f"{func} contracts over the sample dim")
        if not (batched_dim and tb.dim == 0):
            tb = tb._replace(dim=out.dim() - 1)
        cands.append(tb)
    joined = _join(cands, func) if cands else _shared([ta, tb])
    if isinstance(joined, Unknown):
        return joined
    if isinstance(joined, Batched) and len(cands) == 2 and not (batched_dim and joined.dim == 0):
        return Unknown(f"{func} multiplies two batched operands along different dims")
    if isinstance(joined, Batched) and batched_dim and joined.dim == 0:
        joined = _position_free(joined, [(t, 0) for t, tg in ((a, ta), (b, tb)) if isinstance(tg, Shared)], func)
    if bias is not None:
        btag = tracer.tag(bias)
        aligned = _align(btag, bias.dim(), out.shape, bias.shape, func)
        joined = _join([joined, aligned], func)
        if isinstance(joined, Batched) and isinstance(btag, Shared):
            joined = _position_free(joined, [(bias, joined.dim - (out.dim() - bias.dim()))], func)
    return joined


def _dot(tracer, func, args, kwargs, out):
    tags = _inputs(tracer, args, kwargs)
    if _any_batched(tags):
        return Unknown(f"{func} contracts over the sample dim")
    return _default(tracer, func, args, kwargs, out)


def _attention(tracer, func, args, kwargs, out):
    """Fused scaled-dot-product attention ``[.., L, E]``: samples on a leading dim of q, k, v (and the mask)."""
    q, k, v = args[0], args[1], args[2]
    tags = [tracer.tag(t) for t in (q, k, v)]
    mask = kwargs.get("attn_mask")
    if mask is None and func.overloadpacket is aten._scaled_dot_product_efficient_attention and len(args) > 3:
        mask = args[3]
    lead = q.dim() - 2
    aligned = []
    for t, tg in zip((q, k, v), tags):
        if isinstance(tg, Batched) and tg.dim >= t.dim() - 2:
            return Unknown(f"{func} with samples on a sequence or feature dim")
        aligned.append(_align(tg, t.dim(), q.shape[:lead] + t.shape[-2:], t.shape, func) if isinstance(tg, Batched) else tg)
    pairs = [(t, None) for t, tg in zip((q, k, v), tags) if isinstance(tg, Shared)]
    if isinstance(mask, torch.Tensor):
        mtag = tracer.tag(mask)
        full = q.shape[:lead] + (q.shape[-2], k.shape[-2])
        if isinstance(mtag, Shared):
            pairs.append((mask, len(full) - mask.dim()))
        mtag = _align(mtag, mask.dim(), full, mask.shape, func) if isinstance(mtag, Batched) else mtag
        if isinstance(mtag, Batched) and mtag.dim >= lead:
            return Unknown(f"{func} with a mask batched along a sequence dim")
        aligned.append(mtag)
    joined = _join(aligned, func)
    if isinstance(joined, Batched):
        joined = _position_free(joined, [(t, joined.dim - (off if off is not None else q.dim() - t.dim())) for t, off in pairs],
                                func)
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
    result = []
    for o in outs:
        if isinstance(joined, Batched) and o.dim() > joined.dim and o.shape[: joined.dim + 1] == q.shape[: joined.dim + 1]:
            result.append(joined)
        elif isinstance(joined, Shared):
            result.append(joined)
        else:
            result.append(Unknown(f"an auxiliary output of {func}") if isinstance(joined, Batched) else joined)
    return result


def _leading(n_inner_dims_of, what="mixes the sample dim"):
    """Ops that mix the trailing dims of their first input and keep the leading ones: pooling,
    upsampling (``[N, C, *spatial]``), layer norms (``[*, *normalized_shape]``).

    ``n_inner_dims_of(args, kwargs)``: how many trailing dims the op mixes.
    """

    def rule(tracer, func, args, kwargs, out):
        tags = _inputs(tracer, args, kwargs)
        tag = tags[0]
        if not isinstance(tag, Batched):
            return _default(tracer, func, args, kwargs, out)
        if _any_batched(tags[1:]):
            return _default(tracer, func, args, kwargs, out)
        if tag.dim >= args[0].dim() - n_inner_dims_of(args, kwargs):
            return Unknown(f"{func} {what}")
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [tag for o in outs if isinstance(o, torch.Tensor)]

    return rule


def _spatial(k):
    return lambda args, kwargs: k


def _conv(tracer, func, args, kwargs, out):
    tag = tracer.tag(args[0])
    rest = [tracer.tag(t) for t in args[1:3] if isinstance(t, torch.Tensor)]
    for t in (tag, *rest):
        if isinstance(t, Unknown):
            return t
    if _any_batched(rest):
        return Unknown(f"{func} with batched weights")
    if isinstance(tag, Batched):
        return tag if tag.dim == 0 else Unknown(f"{func} with samples on a channel or spatial dim")
    return _shared([tag, *rest])


def _im2col(tracer, func, args, kwargs, out):
    tag = tracer.tag(args[0])
    if isinstance(tag, Batched) and (tag.dim != 0 or args[0].dim() != 4):
        return Unknown("im2col with samples on a channel or spatial dim")
    return tag if isinstance(tag, Batched) else _default(tracer, func, args, kwargs, out)


def _layer_norm(norm_shape_index):
    return _leading(lambda args, kwargs: len(_arg(args, kwargs, norm_shape_index, "normalized_shape")),
                    "normalises over the sample dim")


def _group_norm(tracer, func, args, kwargs, out):
    tags = _inputs(tracer, args, kwargs)
    tag = tags[0]
    if not isinstance(tag, Batched):
        return _default(tracer, func, args, kwargs, out)
    if _any_batched(tags[1:]) or tag.dim != 0:
        return Unknown(f"{func} with samples on a channel or spatial dim")
    return [tag for o in out if isinstance(o, torch.Tensor)]


def _batch_norm(training_index):
    """Eval mode: elementwise with per-channel constants. Batch statistics: only per-channel samples."""

    def rule(tracer, func, args, kwargs, out):
        tags = _inputs(tracer, args, kwargs)
        tag = tags[0]
        training = training_index is not None and bool(_arg(args, kwargs, training_index, "training", False))
        if packet_is_legit_training(func, args):
            training = True
        if not isinstance(tag, Batched):
            return _default(tracer, func, args, kwargs, out)
        if _any_batched(tags[1:]):
            return _default(tracer, func, args, kwargs, out)
        if training and tag.dim != 1:
            return Unknown(f"{func} with batch statistics couples the samples")
        outs = [o for o in out if isinstance(o, torch.Tensor)]
        return [tag] + [SHARED if not training else tag._replace(dim=0) for _ in outs[1:]]

    return rule


def packet_is_legit_training(func, args) -> bool:
    return func.overloadpacket is aten._native_batch_norm_legit and func._overloadname == "no_stats"


def _nll(tracer, func, args, kwargs, out):
    """``nll_loss_forward(self [N, C] or [N, C, *], target [N, *], ...)`` with reduction 'none'."""
    x, target = args[0], args[1]
    reduction = _arg(args, kwargs, 3, "reduction", 1)
    tags = [tracer.tag(x), tracer.tag(target)]
    weight = _arg(args, kwargs, 2, "weight")
    if isinstance(weight, torch.Tensor):
        tags.append(tracer.tag(weight))
    for t in tags:
        if isinstance(t, Unknown):
            return [t, t]
    if not _any_batched(tags):
        return [_shared(tags)] * 2
    if reduction != 0 or x.dim() < 2:
        return [Unknown("a loss reduced over the samples")] * 2
    xt, tt = tags[0], tags[1]
    if isinstance(xt, Batched) and xt.dim == 1:
        return [Unknown("a loss with samples on the class dim")] * 2
    out_tags = []
    if isinstance(xt, Batched):
        out_tags.append(xt._replace(dim=0 if xt.dim == 0 else xt.dim - 1))
    if isinstance(tt, Batched):
        out_tags.append(tt)
    if len(tags) > 2 and isinstance(tags[2], Batched):
        return [Unknown("batched class weights")] * 2
    joined = _join(out_tags, "nll_loss")
    return [joined, Unknown("the total weight of a loss sums over samples")]


def _multinomial(tracer, func, args, kwargs, out):
    tag = tracer.tag(args[0])
    if isinstance(tag, Batched) and (args[0].dim() != 2 or tag.dim != 0):
        return Unknown("multinomial over the sample dim")
    return tag if isinstance(tag, Batched) else _default(tracer, func, args, kwargs, out)


def _channelwise(tracer, func, args, kwargs, out):
    """``_prelu_kernel(x, w)``: ``w`` per channel (dim 1 of ``x``), elementwise otherwise."""
    tags = _inputs(tracer, args, kwargs)
    tag = tags[0]
    if not isinstance(tag, Batched) or _any_batched(tags[1:]):
        return _default(tracer, func, args, kwargs, out)
    if tag.dim == 1 and args[0].dim() > 1:
        return _position_free(tag, [(args[1], 0)], func) if args[1].dim() == 1 else Unknown(f"{func} over the samples")
    return tag


# glu(x, dim) halves dim: fine unless it is the sample dim
_glu = _unknown_if(lambda tag, args, kwargs, out: _wrap(_arg(args, kwargs, 1, "dim", -1), args[0].dim()) == tag.dim,
                   "glu along the sample dim")


def _rnn(tracer, func, args, kwargs, out):
    """``gru`` / ``lstm`` / ``rnn_*`` (``.input`` overloads): every sequence of the batch runs on its own."""
    if func._overloadname != "input":
        return _default(tracer, func, args, kwargs, out)
    x, hx, params = args[0], args[1], args[2]
    batch_first = bool(args[8]) if len(args) > 8 else bool(kwargs.get("batch_first", False))
    tag = tracer.tag(x)
    states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    others = [tracer.tag(t) for t in (*states, *params) if isinstance(t, torch.Tensor)]
    for t in (tag, *others):
        if isinstance(t, Unknown):
            return t
    if not isinstance(tag, Batched):
        return _default(tracer, func, args, kwargs, out)
    if x.dim() != 3 or tag.dim != (0 if batch_first else 1):
        return Unknown(f"{func} with samples off the batch dim")
    for t, tg in zip(states, others):
        if isinstance(tg, Batched) and tg != Batched(1, tag.n, tag.inner):
            return Unknown(f"{func} with a hidden state laid out differently from its input")
        if isinstance(tg, Shared) and not _constant_along(t, 1):
            return Unknown(f"{func} with an initial state that varies along the samples")
    if any(isinstance(tg, Batched) for tg in others[len(states):]):
        return Unknown(f"{func} with batched weights")
    return [tag] + [Batched(1, tag.n, tag.inner)] * (len(out) - 1)


_RULES: dict = {}


def _register(names, rule):
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            _RULES[packet] = rule


_register(["clone", "_to_copy", "detach", "alias", "lift_fresh", "lift_fresh_copy", "contiguous", "_conj",
           "resolve_conj", "resolve_neg", "positive"], _same)
_register(["native_dropout", "dropout", "feature_dropout",
           "bernoulli", "normal", "masked_fill", "where", "clamp", "_assert_async", "_functional_assert_async",
           "hardswish", "log_sigmoid_forward", "rrelu_with_noise", "polar", "real", "imag", "floor_divide"],
          _pointwise)
_register(["zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
           "new_zeros", "new_ones", "new_empty", "new_full", "new_empty_strided", "empty_strided", "zero_"], _factory)
_register(["fill_", "fill"], lambda tracer, func, args, kwargs, out: (
    tracer.tag(args[1]) if isinstance(args[1], torch.Tensor) else SHARED))
_register(["copy_", "copy"], _copy_)
_register(["view", "_unsafe_view", "reshape", "_reshape_alias", "view_copy", "_reshape_copy"], _view)
_RULES[aten.view] = lambda tracer, func, args, kwargs, out: (
    _view_dtype(tracer, func, args, kwargs, out) if func._overloadname == "dtype" else _view(tracer, func, args, kwargs, out))
_register(["permute", "permute_copy"], _permute)
_register(["transpose", "t", "transpose_copy", "t_copy"], _transpose)
_register(["unsqueeze", "unsqueeze_copy"], _unsqueeze)
_register(["squeeze", "squeeze_copy"], _squeeze)
_register(["expand", "expand_copy"], _expand)
_register(["slice", "slice_copy"], _slice)
_register(["select", "select_copy"], _select)
_register(["split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "split_copy",
           "split_with_sizes_copy"], _split)
_register(["unbind", "unbind_copy"], _unbind)
_register(["flip"], _keep_unless_dims(1))
_register(["roll"], _keep_unless_dims(2))
_register(["_softmax", "_log_softmax", "softmax", "log_softmax", "_safe_softmax", "cumsum", "cumprod",
           "logcumsumexp", "cummax", "cummin", "sort", "argsort"], _along_dim(1))
_register(["kthvalue"], _reduce(2, 3, default=-1))
_register(["mode"], _reduce(1, 2, default=-1))
_register(["topk"], _topk)
_register(["nansum", "nanmean", "amax", "amin", "logsumexp", "any", "all", "count_nonzero", "prod", "argmax",
           "argmin", "median", "nanmedian"], _reduce(1, 2))
_register(["var", "std", "var_mean", "std_mean"], _reduce(1, 3))
_register(["linalg_vector_norm"], _reduce(2, 3))
_register(["norm"], _reduce(2, 3))
_register(["cat", "concat", "concatenate"], _cat)
_register(["stack"], _stack)
_register(["repeat"], _repeat)
_register(["repeat_interleave"], _repeat_interleave)
_register(["constant_pad_nd"], _pad())
_register(["reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d",
           "replication_pad3d"], _pad(1))
_register(["tril", "triu"], _last_two)
_register(["unfold"], _unfold)
_register(["diagonal", "diagonal_copy"], _diagonal)
_register(["one_hot"], _one_hot)
_register(["index_select"], _index_select)
_register(["gather"], _gather)
_register(["scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_", "index_add",
           "index_add_", "index_copy", "index_copy_", "index_fill", "index_fill_"], _scatter)
_register(["index"], _index)
_register(["embedding"], _embedding)
_register(["mm", "addmm", "bmm", "baddbmm", "_addmm_activation", "mv", "addmv"], _mm)
_register(["dot", "vdot", "inner", "addbmm", "outer", "ger"], _dot)
_register(["_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
           "_scaled_dot_product_fused_attention_overrideable"], _attention)
_register(["convolution", "_convolution", "convolution_overrideable", "mkldnn_convolution"], _conv)
for _name, _k in [("max_pool1d", 1), ("max_pool1d_with_indices", 1), ("avg_pool1d", 1), ("adaptive_avg_pool1d", 1),
                  ("adaptive_max_pool1d", 1), ("max_pool2d", 2), ("max_pool2d_with_indices", 2), ("avg_pool2d", 2),
                  ("adaptive_avg_pool2d", 2), ("_adaptive_avg_pool2d", 2), ("adaptive_max_pool2d", 2),
                  ("max_pool3d", 3), ("max_pool3d_with_indices", 3), ("avg_pool3d", 3), ("adaptive_avg_pool3d", 3),
                  ("_adaptive_avg_pool3d", 3), ("adaptive_max_pool3d", 3), ("upsample_nearest1d", 1),
                  ("upsample_nearest2d", 2), ("upsample_nearest3d", 3), ("upsample_linear1d", 1),
                  ("upsample_bilinear2d", 2), ("upsample_bicubic2d", 2), ("upsample_trilinear3d", 3),
                  ("_upsample_nearest_exact1d", 1), ("_upsample_nearest_exact2d", 2), ("_upsample_nearest_exact3d", 3),
                  ("pixel_shuffle", 3), ("pixel_unshuffle", 3), ("channel_shuffle", 3)]:
    _register([_name], _leading(_spatial(_k)))
_register(["im2col"], _im2col)
_register(["native_layer_norm"], _layer_norm(1))
_register(["_fused_rms_norm"], _layer_norm(1))
_register(["native_group_norm"], _group_norm)
_register(["_native_batch_norm_legit_no_training"], _batch_norm(None))
_register(["native_batch_norm", "_native_batch_norm_legit"], _batch_norm(5))
_register(["nll_loss_forward", "nll_loss2d_forward"], _nll)
_register(["mse_loss", "l1_loss", "soft_margin_loss"], _reduction_loss(2))
_register(["huber_loss", "smooth_l1_loss"], _reduction_loss(2))
_register(["binary_cross_entropy"], _reduction_loss(3))
_register(["binary_cross_entropy_with_logits"], _reduction_loss(4))
_register(["multinomial"], _multinomial)
_register(["gru", "lstm", "rnn_tanh", "rnn_relu"], _rnn)
_register(["_prelu_kernel"], _channelwise)
_register(["glu"], _glu)
_DIM_REDUCE = _reduce(1, 2)


def _sum_mean(tracer, func, args, kwargs, out):
    if func._overloadname == "default":
        return _full_reduction(tracer, func, args, kwargs, out)
    return _DIM_REDUCE(tracer, func, args, kwargs, out)


def _max_min(tracer, func, args, kwargs, out):
    """``max``/``min``: elementwise of two tensors, over every dim, or along one dim."""
    if func._overloadname in ("other", "binary", "out"):
        return _pointwise(tracer, func, args, kwargs, out)
    if func._overloadname in ("dim", "dim_max", "dim_min", "names_dim"):
        return _DIM_REDUCE(tracer, func, args, kwargs, out)
    return _full_reduction(tracer, func, args, kwargs, out)


_register(["sum", "mean"], _sum_mean)
_register(["max", "min"], _max_min)
