r"""Per-sample gradient rules: one per recognised op, from (op input, gradient of its output).

Notation: ``B`` samples; for sample ``b`` the op sees ``x[b]`` and the gradient of the
sum of per-sample losses with respect to its output is ``g[b]``. Because the loss is a
sum of per-sample terms and the model runs in eval mode (no cross-sample coupling),
``g[b]`` is exactly the gradient of sample ``b``'s own loss. Each rule expresses the
per-sample parameter gradient ``∇_θ ℓ_b`` as a *contribution*:

* :class:`Factored` — ``∇ℓ_b = Σ_t g[b,t]ᵀ x[b,t]`` per group (linear, convolution): never
  materialised for a single use, ``Σ_b |∇ℓ_b|^p`` comes from :func:`fastcl.ops.sqgrad`.
* :class:`Dense` — ``∇ℓ_b`` itself, ``[B, numel]`` (biases, norm scales, parameters used
  through a broadcast elementwise product or sum: small).
* :class:`Sparse` — rows ``(b, row, value)`` of ``∇ℓ_b`` for an embedding table
  (only rows touched by sample ``b``; repeated tokens are summed before the power).

A parameter used by several ops in one forward (tied weights, a module called twice)
gets one contribution per use; :func:`accumulate` sums them per sample *before* raising
to the power ``p`` (2: Fisher, 1: MAS), densifying in bounded chunks of samples when the
kinds differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.sqgrad import sqgrad

__all__ = [
    "Dense",
    "Factored",
    "Sparse",
    "accumulate",
    "acc_dtype",
    "contributions",
    "to_sample_major",
]

_BUDGET_BYTES = 64 * 2**20  # ceiling for the per-sample buffers of one chunk ...
_MIN_BUDGET_BYTES = 2**20  # ... which otherwise stay within the layer's own activation size


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 parameters, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pow(t: torch.Tensor, power: int) -> torch.Tensor:
    return t.square() if power == 2 else t.abs()


def to_sample_major(t: torch.Tensor, n_lead: int, layout: tuple, batch: int) -> torch.Tensor:
    """Reshape ``t`` (``[*lead, *feat]``) to ``[B, T, *feat]`` following ``layout``.

    ``layout``: ``("all",)`` every row belongs to the single sample; ``("dim", d)`` lead
    dim ``d`` indexes samples; ``("seq_rows",)`` one flattened lead dim ordered
    ``t * B + b`` (``nn.MultiheadAttention`` internals).
    """
    feat = t.shape[n_lead:]
    if layout[0] == "all":
        return t.reshape(1, -1, *feat)
    if layout[0] == "dim":
        return t.movedim(layout[1], 0).reshape(batch, -1, *feat)
    if layout[0] == "seq_rows":
        return t.reshape(-1, batch, *feat).transpose(0, 1).reshape(batch, -1, *feat)
    raise AssertionError(f"unknown layout {layout!r}")


# --------------------------------------------------------------------------- contributions


class Factored:
    """Per-sample gradient ``[G, O, I]`` (``G`` groups) = ``Σ_t g[b,g,t,:]ᵀ x[b,g,t,:]``."""

    groups: int
    rows: int
    cols: int

    def sample_bytes(self) -> int:
        """Bytes one sample costs in :meth:`take` (for chunking)."""
        raise NotImplementedError

    def take(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [n, G, T, I]`` and ``g [n, G, T, O]`` for samples ``start:stop``."""
        raise NotImplementedError

    def activation_bytes(self) -> int:
        """Bytes of the layer input and output gradient, which exist anyway during backward."""
        return self.x.numel() * self.x.element_size() + self.g.numel() * self.g.element_size()


class LinearFactored(Factored):
    def __init__(self, x: torch.Tensor, g: torch.Tensor):
        self.x, self.g = x, g  # [B, T, I], [B, T, O]
        self.groups, self.rows, self.cols = 1, g.shape[-1], x.shape[-1]

    def sample_bytes(self) -> int:
        return 0

    def take(self, start, stop):
        return self.x[start:stop].unsqueeze(1), self.g[start:stop].unsqueeze(1)


class ConvFactored(Factored):
    """Convolution: ``x`` is the im2col of the (padded) input, unfolded lazily per chunk."""

    def __init__(self, x: torch.Tensor, g: torch.Tensor, weight_shape, stride, padding, dilation, groups):
        self.x, self.g = x, g  # [B, C, *spatial], [B, O, *out_spatial]
        self.kernel = tuple(weight_shape[2:])
        self.stride, self.dilation, self.groups = stride, dilation, groups
        self.pads = _conv_pads(padding, self.kernel, dilation)
        self.rows = weight_shape[0] // groups
        self.cols = weight_shape[1] * math.prod(self.kernel)
        self.positions = math.prod(g.shape[2:])

    def sample_bytes(self) -> int:
        return self.cols * self.groups * self.positions * self.x.element_size() * 2

    def take(self, start, stop):
        x = self.x[start:stop]
        if any(self.pads):
            x = F.pad(x, self.pads)
        cols = _unfold(x, self.kernel, self.dilation, self.stride)  # [n, C*K, L]
        n, L = cols.shape[0], cols.shape[-1]
        if L != self.positions:
            raise RuntimeError(f"internal error: unfolded {L} positions, conv output has {self.positions}")
        xg = cols.view(n, self.groups, self.cols, L).transpose(2, 3)
        gg = self.g[start:stop].reshape(n, self.groups, self.rows, L).transpose(2, 3)
        return xg, gg


@dataclass
class Dense:
    values: torch.Tensor  # [B, numel], accumulation dtype


@dataclass
class Sparse:
    sample: torch.Tensor  # [N] long
    row: torch.Tensor  # [N] long
    values: torch.Tensor  # [N, D], accumulation dtype
    num_rows: int


def _conv_pads(padding, kernel, dilation) -> list[int]:
    """``F.pad`` argument (last dim first) reproducing the convolution's zero padding."""
    nd = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            left = right = [0] * nd
        elif padding == "same":
            total = [dilation[i] * (kernel[i] - 1) for i in range(nd)]
            left = [t // 2 for t in total]
            right = [t - l for t, l in zip(total, left)]
        else:
            raise ValueError(f"unknown convolution padding {padding!r}")
    else:
        left = right = list(padding)
    pads = []
    for i in reversed(range(nd)):
        pads += [left[i], right[i]]
    return pads


def _unfold(x: torch.Tensor, kernel, dilation, stride) -> torch.Tensor:
    """im2col: ``[n, C, *spatial]`` -> ``[n, C·K, L]``, rows ordered (channel, kernel offsets)."""
    nd = len(kernel)
    if nd == 2:
        return F.unfold(x, kernel, dilation=dilation, stride=stride)
    if nd == 1:
        return F.unfold(x.unsqueeze(2), (1, kernel[0]), dilation=(1, dilation[0]), stride=(1, stride[0]))
    n, c = x.shape[:2]
    for i in range(nd):
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
    x = x[(Ellipsis, *(slice(None, None, d) for d in dilation))]  # [n, C, *out, *kernel]
    out_sizes = x.shape[2:2 + nd]
    perm = [0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd)]
    return x.permute(perm).reshape(n, c * math.prod(kernel), math.prod(out_sizes))


# --------------------------------------------------------------------------- rules


def _sum_middle(t: torch.Tensor) -> torch.Tensor:
    """``[B, T, *feat]`` -> ``[B, numel(feat)]`` summed over ``T``."""
    if t.shape[1] == 1:  # a plain Linear: summing one position would fill and copy the whole gradient
        return t.reshape(t.shape[0], -1)
    return t.sum(1).reshape(t.shape[0], -1)


def _linear(ev, g, batch):
    x3 = to_sample_major(ev.x, ev.n_lead, ev.layout, batch)
    g3 = to_sample_major(g, ev.n_lead, ev.layout, batch)
    out = {}
    if "weight" in ev.active:
        out["weight"] = LinearFactored(x3, g3)
    if "bias" in ev.active:
        out["bias"] = Dense(_sum_middle(g3.to(acc_dtype(g3.dtype))))
    return out


def _conv(ev, g, batch):
    m = ev.meta
    x, g = ev.x, g
    if m["unbatched"]:
        g = g.unsqueeze(0)
    out = {}
    if "weight" in ev.active:
        out["weight"] = ConvFactored(x, g, m["weight_shape"], m["stride"], m["padding"], m["dilation"], m["groups"])
    if "bias" in ev.active:
        out["bias"] = Dense(g.to(acc_dtype(g.dtype)).reshape(g.shape[0], g.shape[1], -1).sum(2))
    return out


def _embedding(ev, g, batch):
    if "weight" not in ev.active:
        return {}
    m = ev.meta
    ids = to_sample_major(ev.x, ev.n_lead, ev.layout, batch).reshape(batch, -1)
    gs = to_sample_major(g, ev.n_lead, ev.layout, batch)
    dim = gs.shape[-1]
    gs = gs.reshape(-1, dim).to(acc_dtype(gs.dtype))
    sample = torch.arange(batch, device=ids.device).repeat_interleave(ids.shape[1])
    ids = ids.reshape(-1).long()
    if m["padding_idx"] is not None:
        keep = ids != m["padding_idx"]
        sample, ids, gs = sample[keep], ids[keep], gs[keep]
    return {"weight": _coalesce(sample, ids, gs, m["num_rows"])}


def _coalesce(sample, row, values, num_rows) -> Sparse:
    """Sum the values of equal ``(sample, row)`` pairs."""
    key = sample * num_rows + row
    uniq, inverse = torch.unique(key, return_inverse=True)
    summed = torch.zeros((uniq.numel(), values.shape[-1]), dtype=values.dtype, device=values.device)
    summed.index_add_(0, inverse, values)
    return Sparse(uniq // num_rows, uniq % num_rows, summed, num_rows)


def _affine_norm(ev, g, batch, xhat):
    """Shared tail of the norm rules: weight gets ``Σ g·x̂``, bias ``Σ g`` per sample."""
    out = {}
    if "weight" in ev.active:
        out["weight"] = Dense(_sum_middle(to_sample_major(g * xhat, ev.n_lead, ev.layout, batch)))
    if "bias" in ev.active:
        out["bias"] = Dense(_sum_middle(to_sample_major(g, ev.n_lead, ev.layout, batch)))
    return out


def _layer_norm(ev, g, batch):
    acc = acc_dtype(ev.x.dtype)
    x = ev.x.to(acc)
    dims = tuple(range(ev.n_lead, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
    xhat = (x - mean) * torch.rsqrt(var + ev.meta["eps"])
    return _affine_norm(ev, g.to(acc), batch, xhat)


def _rms_norm(ev, g, batch):
    acc = acc_dtype(ev.x.dtype)
    x = ev.x.to(acc)
    dims = tuple(range(ev.n_lead, x.dim()))
    eps = ev.meta["eps"]
    if eps is None:
        eps = torch.finfo(ev.x.dtype).eps
    xhat = x * torch.rsqrt(x.square().mean(dim=dims, keepdim=True) + eps)
    return _affine_norm(ev, g.to(acc), batch, xhat)


def _channel_affine(ev, g, batch, xhat):
    """Weight/bias indexed by channel (dim 1 of ``[B, C, *spatial]``)."""
    b, c = g.shape[:2]
    out = {}
    if "weight" in ev.active:
        out["weight"] = Dense((g * xhat).reshape(b, c, -1).sum(2))
    if "bias" in ev.active:
        out["bias"] = Dense(g.reshape(b, c, -1).sum(2))
    return out


def _group_norm(ev, g, batch):
    acc = acc_dtype(ev.x.dtype)
    x = ev.x.to(acc)
    b, c = x.shape[:2]
    grouped = x.reshape(b, ev.meta["num_groups"], -1)
    var, mean = torch.var_mean(grouped, dim=2, unbiased=False, keepdim=True)
    xhat = ((grouped - mean) * torch.rsqrt(var + ev.meta["eps"])).reshape(x.shape)
    return _channel_affine(ev, g.to(acc), batch, xhat)


def _batch_norm(ev, g, batch):
    acc = acc_dtype(ev.x.dtype)
    x = ev.x.to(acc)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = ev.meta["running_mean"].to(acc).reshape(shape)
    var = ev.meta["running_var"].to(acc).reshape(shape)
    xhat = (x - mean) * torch.rsqrt(var + ev.meta["eps"])
    return _channel_affine(ev, g.to(acc), batch, xhat)


def _mul(ev, g, batch):
    """``out = w * x``, ``w`` broadcast along leading dims: ``∇_w ℓ_b = Σ_{t} (g ⊙ x)[b, t]``.

    ``t`` runs over the leading dims of ``x`` other than the sample one (see
    ``_capture._elementwise_handler``); ``g`` is reshaped to ``x``'s shape because ``w`` may
    carry extra leading size-1 dims that ``out`` keeps.
    """
    if "weight" not in ev.active:
        return {}
    acc = acc_dtype(g.dtype)
    prod = g.reshape(ev.x.shape).to(acc) * ev.x.to(acc)
    return {"weight": Dense(_sum_middle(to_sample_major(prod, ev.n_lead, ev.layout, batch)))}


def _add(ev, g, batch):
    """``out = x + scale·w``, ``w`` broadcast along leading dims: ``∇_w ℓ_b = scale · Σ_t g[b, t]``."""
    if "bias" not in ev.active:
        return {}
    values = _sum_middle(to_sample_major(g.reshape(ev.x.shape).to(acc_dtype(g.dtype)), ev.n_lead, ev.layout, batch))
    scale = ev.meta["scale"]
    return {"bias": Dense(values if scale == 1 else values * scale)}


_RULES = {
    "linear": _linear,
    "conv": _conv,
    "embedding": _embedding,
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
    "group_norm": _group_norm,
    "batch_norm": _batch_norm,
    "mul": _mul,
    "add": _add,
}


def contributions(ev, g: torch.Tensor, batch: int) -> dict:
    """``{slot: contribution}`` for the active slots of event ``ev`` given output gradient ``g``."""
    return _RULES[ev.op](ev, g, batch)


# --------------------------------------------------------------------------- accumulation


def accumulate(items: list, out: torch.Tensor, power: int, batch: int) -> None:
    """``out += Σ_b |Σ_items ∇ℓ_b(item)|^power`` (``out`` shaped like the parameter)."""
    if not items:
        return
    kinds = {type(c) for c in items}
    if all(isinstance(c, Factored) for c in items) and len({(c.groups, c.rows, c.cols) for c in items}) == 1:
        _accumulate_factored(items, out, power, batch)
    elif kinds == {Dense}:
        total = items[0].values if len(items) == 1 else sum(c.values for c in items)
        out.view(-1).add_(_pow(total.to(out.dtype), power).sum(0))
    elif kinds == {Sparse}:
        if len(items) == 1:
            sp = items[0]
        else:
            sp = _coalesce(
                torch.cat([c.sample for c in items]),
                torch.cat([c.row for c in items]),
                torch.cat([c.values for c in items]),
                items[0].num_rows,
            )
        out.view(sp.num_rows, -1).index_add_(0, sp.row, _pow(sp.values.to(out.dtype), power))
    else:
        _accumulate_dense(items, out, power, batch)


def _chunk(per_sample_bytes: int, batch: int, activation_bytes: int) -> int:
    """Samples per chunk: per-sample buffers stay within the layer's activation size (1 MiB to 64 MiB)."""
    budget = min(_BUDGET_BYTES, max(_MIN_BUDGET_BYTES, activation_bytes))
    return max(1, min(batch, budget // max(per_sample_bytes, 1)))


def _accumulate_factored(items, out, power, batch):
    first = items[0]
    groups, rows, cols = first.groups, first.rows, first.cols
    per_sample = sum(c.sample_bytes() for c in items)
    if groups > 1:
        per_sample += groups * rows * cols * out.element_size()
    chunk = _chunk(per_sample, batch, sum(c.activation_bytes() for c in items)) if per_sample else batch
    out3 = out.view(groups, rows, cols)
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        parts = [c.take(start, stop) for c in items]
        x = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], dim=2)
        g = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts], dim=2)
        if groups == 1:
            sqgrad(x[:, 0], g[:, 0], out3[0], power=power)
        else:
            per = torch.einsum("bgti,bgto->bgoi", x.to(out.dtype), g.to(out.dtype))
            out3.add_(_pow(per, power).sum(0))


def _accumulate_dense(items, out, power, batch):
    """Mixed contribution kinds: materialise per-sample gradients in bounded chunks."""
    numel = out.numel()
    per_sample = numel * out.element_size() * 2 + sum(
        c.sample_bytes() for c in items if isinstance(c, Factored)
    )
    chunk = _chunk(per_sample, batch, sum(c.activation_bytes() for c in items if isinstance(c, Factored)))
    flat = out.view(-1)
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        n = stop - start
        dense = torch.zeros((n, numel), dtype=out.dtype, device=out.device)
        for c in items:
            if isinstance(c, Factored):
                x, g = c.take(start, stop)
                dense += torch.einsum("bgti,bgto->bgoi", x.to(out.dtype), g.to(out.dtype)).reshape(n, -1)
            elif isinstance(c, Dense):
                dense += c.values[start:stop].to(out.dtype)
            else:
                sel = (c.sample >= start) & (c.sample < stop)
                table = dense.view(n, c.num_rows, -1)
                table.index_put_(
                    (c.sample[sel] - start, c.row[sel]), c.values[sel].to(out.dtype), accumulate=True
                )
        flat.add_(_pow(dense, power).sum(0))
