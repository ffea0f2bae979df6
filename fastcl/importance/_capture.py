"""Capture of every use of the tracked parameters during one forward pass.

A :class:`~torch.overrides.TorchFunctionMode` sees each torch function call. A call that
receives a tracked parameter is either

* a *recognised* op (linear, conv1d/2d/3d, embedding, layer_norm, rms_norm, group_norm,
  batch_norm, the projections inside ``multi_head_attention_forward``, and an elementwise
  ``w * x`` / ``x + w`` / ``x - w`` whose parameter broadcasts along leading dims only, see
  :func:`_elementwise_handler`): an
  :class:`Event` keeps its input and a tensor hook on its output receives the output
  gradient during the backward pass (the gradient *before* any later in-place change of
  the output, as PyTorch documents for tensor hooks), or
* anything else (``_VF.gru``, ``w.t()``, ``torch.cat([bias_k, ...])``...): the parameter is
  marked *unhandled* and goes to the exact per-sample fallback.

Counting uses at the op level (not per module) makes tied weights, modules called twice
and parameters used directly by custom code visible. Only calls whose result carries
gradient count as uses (``w.shape``, ``w.detach()`` do not).
"""
from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["Capture", "Event"]

_REAL_LINEAR = F.linear
_MHA_FORWARD = F.multi_head_attention_forward
_RMS_NORM = getattr(F, "rms_norm", None)


_get_gradient_edge = getattr(torch.autograd.graph, "get_gradient_edge", None)


class Event:
    """One recognised call of an op on tracked parameters."""

    __slots__ = ("op", "x", "meta", "slots", "n_lead", "mha_bsz", "seq_first", "layout", "active", "edge", "out_numel")

    def __init__(self, op, x, meta, slots, n_lead, mha_bsz, seq_first):
        self.op = op  # rule name (see rules._RULES)
        self.x = x  # op input (detached)
        self.meta = meta  # op-specific arguments
        self.slots = slots  # {"weight"/"bias": canonical parameter name}
        self.n_lead = n_lead  # leading (sample/sequence) dims of x
        self.mha_bsz = mha_bsz  # batch size inside multi_head_attention_forward, else None
        self.seq_first = seq_first  # inside a module with batch_first=False
        self.layout = None  # set by resolve_layout
        self.active = ()  # slots whose parameter is computed by the rule this batch
        self.edge = None  # gradient edge of the op's output, a possible target of the rules' backward
        self.out_numel = 0  # size of the op's output (and of its gradient)


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


# Each handler returns (op, x, {slot: tensor}, meta, n_lead) or a str saying why it cannot.


def _linear_handler(args, kwargs):
    x = _arg(args, kwargs, 0, "input")
    w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    return "linear", x, {"weight": w, "bias": b}, {}, x.dim() - 1


def _conv_handler(nd):
    def handler(args, kwargs):
        x = _arg(args, kwargs, 0, "input")
        w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        padding = _arg(args, kwargs, 4, "padding", 0)
        meta = {
            "weight_shape": tuple(w.shape),
            "stride": _tuple(_arg(args, kwargs, 3, "stride", 1), nd),
            "padding": padding if isinstance(padding, str) else _tuple(padding, nd),
            "dilation": _tuple(_arg(args, kwargs, 5, "dilation", 1), nd),
            "groups": int(_arg(args, kwargs, 6, "groups", 1)),
            "unbatched": x.dim() == nd + 1,
        }
        if meta["unbatched"]:
            x = x.unsqueeze(0)
        return "conv", x, {"weight": w, "bias": b}, meta, 1

    return handler


def _embedding_handler(args, kwargs):
    ids, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    if _arg(args, kwargs, 3, "max_norm") is not None:
        return "embedding with max_norm renormalises the table in place"
    if _arg(args, kwargs, 5, "scale_grad_by_freq", False):
        return "embedding with scale_grad_by_freq couples the samples of a batch"
    padding_idx = _arg(args, kwargs, 2, "padding_idx")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += w.shape[0]
    return "embedding", ids, {"weight": w}, {"padding_idx": padding_idx, "num_rows": w.shape[0]}, ids.dim()


def _layer_norm_handler(args, kwargs):
    x, shape = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape")
    shape = _tuple(shape, 1)
    slots = {"weight": _arg(args, kwargs, 2, "weight"), "bias": _arg(args, kwargs, 3, "bias")}
    return "layer_norm", x, slots, {"eps": _arg(args, kwargs, 4, "eps", 1e-5)}, x.dim() - len(shape)


def _rms_norm_handler(args, kwargs):
    x, shape = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape")
    shape = _tuple(shape, 1)
    slots = {"weight": _arg(args, kwargs, 2, "weight")}
    return "rms_norm", x, slots, {"eps": _arg(args, kwargs, 3, "eps")}, x.dim() - len(shape)


def _group_norm_handler(args, kwargs):
    x = _arg(args, kwargs, 0, "input")
    slots = {"weight": _arg(args, kwargs, 2, "weight"), "bias": _arg(args, kwargs, 3, "bias")}
    meta = {"num_groups": int(_arg(args, kwargs, 1, "num_groups")), "eps": _arg(args, kwargs, 4, "eps", 1e-5)}
    return "group_norm", x, slots, meta, 1


def _batch_norm_handler(args, kwargs):
    x = _arg(args, kwargs, 0, "input")
    slots = {"weight": _arg(args, kwargs, 3, "weight"), "bias": _arg(args, kwargs, 4, "bias")}
    meta = {
        "running_mean": _arg(args, kwargs, 1, "running_mean").detach(),
        "running_var": _arg(args, kwargs, 2, "running_var").detach(),
        "eps": _arg(args, kwargs, 7, "eps", 1e-5),
    }
    return "batch_norm", x, slots, meta, 1


_HANDLERS = {
    F.linear: _linear_handler,
    F.conv1d: _conv_handler(1),
    F.conv2d: _conv_handler(2),
    F.conv3d: _conv_handler(3),
    F.embedding: _embedding_handler,
    F.layer_norm: _layer_norm_handler,
    F.group_norm: _group_norm_handler,
    F.batch_norm: _batch_norm_handler,
}
if _RMS_NORM is not None:
    _HANDLERS[_RMS_NORM] = _rms_norm_handler


def _elementwise_funcs() -> dict:
    """``{func: "mul" | "add" | "sub"}`` for the out-of-place spellings this torch dispatches.

    ``w * x`` reaches the mode as ``TensorBase.mul`` on recent torch; the operator methods
    are listed too for versions that dispatch them as themselves. ``__radd__`` / ``__rmul__``
    compute ``other ∘ self``, equal to ``self ∘ other`` for these two commutative ops. In-place
    variants (``mul_``, ``+=``) and ``__rsub__`` are left out: they go to the fallback.
    """
    names = {
        "mul": ("mul", "multiply", "__mul__", "__rmul__"),
        "add": ("add", "__add__", "__radd__"),
        "sub": ("sub", "subtract", "__sub__"),
    }
    owners = [torch, torch.Tensor] + [getattr(torch._C, n) for n in ("TensorBase", "_TensorBase") if hasattr(torch._C, n)]
    table = {}
    for kind, attrs in names.items():
        for owner in owners:
            for attr in attrs:
                func = getattr(owner, attr, None)
                if func is not None and func not in table:
                    table[func] = kind
    return table


_ELEMENTWISE = _elementwise_funcs()


def _elementwise_handler(kind, tracked, args, kwargs):
    r"""``out = w * x`` (op ``"mul"``), ``out = x + α·w`` / ``w + α·x`` (op ``"add"``, with ``sub`` as ``α → −α``).

    Recognised only when exactly one operand ``w`` is a tracked parameter, the other ``x``
    is a tensor that is not an ``nn.Parameter``, and ``w`` broadcasts against ``x`` along
    leading dims only: with ``s`` = ``w.shape`` without its leading size-1 dims,
    ``x.shape[-len(s):] == s`` (``s`` empty for a scalar-like ``w``). Then ``out`` has
    ``x``'s elements and the per-sample gradient of ``w`` is ``Σ g ⊙ x`` (mul) or
    ``scale · Σ g`` (add/sub; ``scale`` is the factor ``w`` enters with) summed over the
    ``len(x.shape) − len(s)`` leading dims of ``x`` except the sample one, which
    :func:`resolve_layout` finds as for the other ops. For add/sub only ``x``'s shape is
    kept (a stride-0 stand-in), not the activation itself.
    """
    if kwargs.get("out") is not None:
        return f"{kind} with out= writes into an existing tensor"
    if len(args) > 2 or set(kwargs) - {"input", "other", "alpha"}:
        return f"{kind} called with arguments other than (input, other, alpha)"
    alpha = kwargs.get("alpha", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return f"{kind} with an alpha that is not a Python number"
    first, second = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other")
    is_first = isinstance(first, torch.Tensor) and id(first) in tracked
    is_second = isinstance(second, torch.Tensor) and id(second) in tracked
    if is_first and is_second:
        return f"{kind} of two tracked parameters"
    if not (is_first or is_second):
        return f"{kind} with the parameter in an unexpected argument"
    w, x = (first, second) if is_first else (second, first)
    if not isinstance(x, torch.Tensor):
        return f"{kind} with a Python number (its result has no sample dimension)"
    if isinstance(x, nn.Parameter):
        return f"{kind} with another parameter (its result has no sample dimension)"
    if w.is_complex() or x.is_complex():
        return f"{kind} of complex tensors"
    shape = tuple(w.shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    k = len(shape)
    if x.dim() < k or tuple(x.shape[x.dim() - k:]) != shape:
        return (
            f"{kind} broadcasting the parameter {tuple(w.shape)} against {tuple(x.shape)} "
            "other than along leading dimensions"
        )
    n_lead = x.dim() - k
    if kind == "mul":
        return "mul", x, {"weight": w}, {}, n_lead
    scale = 1 if is_first else (alpha if kind == "add" else -alpha)
    stand_in = x.detach().new_zeros(()).expand(x.shape)
    return "add", stand_in, {"bias": w}, {"scale": scale}, n_lead


def _needs_grad(out) -> bool:
    if isinstance(out, torch.Tensor):
        return out.requires_grad
    if isinstance(out, (tuple, list)):
        return any(isinstance(o, torch.Tensor) and o.requires_grad for o in out)
    return False


def _func_name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _rebind(fn, namespace):
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


class Capture(TorchFunctionMode):
    """Records :class:`Event` s and unhandled parameter uses for one forward pass.

    ``tracked``: ``{id(parameter): canonical name}``. ``on_grad(event, grad)`` is called by
    the output hooks during backward passes.
    """

    def __init__(self, tracked: dict[int, str]):
        super().__init__()
        self.tracked = tracked
        self.on_grad = None
        self.seq_first: list[bool] = []
        self._mha_impl = self._instrumented_mha()
        self.reset()

    def reset(self) -> None:
        for ev in getattr(self, "events", ()):
            # An event is reachable from its output's autograd node (through the hook) and
            # its edge points back at that node: a cycle through C++ that Python's garbage
            # collector cannot see, which would keep each batch's whole graph alive.
            ev.edge = None
            ev.x = None
        self.events: list[Event] = []
        self.unhandled: dict[str, str] = {}
        self.seq_first.clear()
        self.mha_bsz = None

    # ------------------------------------------------------------------ interception

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _MHA_FORWARD:
            return self._mha(func, args, kwargs)
        if func is F.batch_norm and _arg(args, kwargs, 5, "training", False) and torch.is_grad_enabled():
            raise ValueError(
                "a batch norm layer normalises with batch statistics during the importance pass "
                "(track_running_stats=False, or a forward that puts it in training mode); the samples of "
                "a batch are then coupled and per-sample gradients are undefined"
            )
        found = self._find(args, kwargs)
        out = func(*args, **kwargs)
        if found and torch.is_grad_enabled() and _needs_grad(out):
            self._record(self._handler(func), func, args, kwargs, out, found)
        return out

    def _handler(self, func):
        handler = _HANDLERS.get(func)
        if handler is None:
            kind = _ELEMENTWISE.get(func)
            if kind is not None:
                handler = functools.partial(_elementwise_handler, kind, self.tracked)
        return handler

    def _find(self, args, kwargs) -> list[str]:
        tracked, names = self.tracked, []
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                name = tracked.get(id(a))
                if name is not None:
                    names.append(name)
            elif isinstance(a, (list, tuple)):
                for b in a:
                    if isinstance(b, torch.Tensor):
                        name = tracked.get(id(b))
                        if name is not None:
                            names.append(name)
        return names

    def _record(self, handler, func, args, kwargs, out, found) -> None:
        if handler is None:
            for name in found:
                self.unhandled.setdefault(name, f"used directly by {_func_name(func)}")
            return
        spec = handler(args, kwargs)
        if isinstance(spec, str):
            for name in found:
                self.unhandled.setdefault(name, spec)
            return
        op, x, slot_tensors, meta, n_lead = spec
        slots = {}
        for slot, t in slot_tensors.items():
            if isinstance(t, torch.Tensor) and id(t) in self.tracked:
                slots[slot] = self.tracked[id(t)]
        for name in found:
            if name not in slots.values():
                self.unhandled.setdefault(name, f"passed to {_func_name(func)} as something other than its weight/bias")
        if not slots or not isinstance(out, torch.Tensor):
            return
        ev = Event(op, x.detach(), meta, slots, n_lead, self.mha_bsz, bool(self.seq_first and self.seq_first[-1]))
        if _get_gradient_edge is not None:
            # Taken now, before any in-place op (e.g. ReLU(inplace=True)) rebases ``out``.
            ev.edge = _get_gradient_edge(out)
        ev.out_numel = out.numel()
        self.events.append(ev)
        out.register_hook(functools.partial(self._hook, ev))

    def _hook(self, ev, grad):
        if self.on_grad is not None:
            self.on_grad(ev, grad)

    # ------------------------------------------------------------------ multi-head attention

    def _instrumented_mha(self):
        """``multi_head_attention_forward`` whose projections go through :meth:`_linear_tap`.

        The function is re-created from its code object with a namespace in which
        ``linear`` is the tap (no global state is patched). ``None`` when this torch's
        implementation does not have the expected structure.
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
        out = _REAL_LINEAR(input, weight, bias)
        found = self._find((input, weight, bias), {})
        if found and torch.is_grad_enabled() and out.requires_grad:
            self._record(_linear_handler, _REAL_LINEAR, (input, weight, bias), {}, out, found)
        return out

    def _mha(self, func, args, kwargs):
        found = self._find(args, kwargs)
        if not found:
            return func(*args, **kwargs)
        if self._mha_impl is None:
            out = func(*args, **kwargs)
            if torch.is_grad_enabled() and _needs_grad(out):
                for name in found:
                    self.unhandled.setdefault(name, "multi_head_attention_forward could not be instrumented")
            return out
        query = _arg(args, kwargs, 0, "query")
        start = len(self.events)
        previous, self.mha_bsz = self.mha_bsz, (query.shape[1] if query.dim() == 3 else 1)
        try:
            out = self._mha_impl(*args, **kwargs)
        finally:
            self.mha_bsz = previous
        if torch.is_grad_enabled() and _needs_grad(out):
            covered = {n for ev in self.events[start:] for n in ev.slots.values()}
            for name in found:
                if name not in covered:
                    self.unhandled.setdefault(name, "used inside multi_head_attention_forward other than as a projection")
        return out


def resolve_layout(ev: Event, batch: int):
    """Which part of the op input indexes the ``batch`` samples (see rules.to_sample_major).

    ``None`` when it cannot be told from the shapes; the parameters then go to the fallback.
    """
    lead = tuple(ev.x.shape[: ev.n_lead])
    if ev.op in ("conv", "group_norm", "batch_norm"):
        return ("dim", 0) if lead and lead[0] == batch else None
    if batch == 1:
        return ("all",)
    if ev.mha_bsz is not None:
        if ev.mha_bsz != batch:
            return None
        if len(lead) >= 2 and lead[1] == batch:
            return ("dim", 1)
        if len(lead) == 1 and lead[0] % batch == 0:
            return ("seq_rows",)
        return None
    candidates = [i for i, s in enumerate(lead) if s == batch]
    if not candidates:
        return None
    if len(candidates) > 1 and ev.seq_first and 1 in candidates:
        return ("dim", 1)
    return ("dim", candidates[0])
