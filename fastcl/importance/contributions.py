r"""Per-sample gradient contributions and their accumulation into ``Σ_b |∇ℓ_b|^p``.

A rule describes the per-sample gradient ``∇_θ ℓ_b`` that one use of a parameter
contributes, in the cheapest form that determines it:

* :class:`Factored` — ``∇ℓ_b = Σ_t g[b,t]ᵀ x[b,t]`` per group (linear maps, convolutions via
  im2col): never materialised for a single use; ``Σ_b |∇ℓ_b|^p`` comes from
  :func:`fastcl.ops.sqgrad`.
* :class:`Dense` — ``∇ℓ_b`` itself, ``[B, numel]`` (biases, norm scales, parameters used
  through elementwise products or sums: small).
* :class:`Sparse` — rows ``(b, row, value)`` of ``∇ℓ_b`` for an embedding table (only rows
  touched by sample ``b``; repeated tokens are summed before the power).

A parameter used several times in one forward (tied weights, a module called twice, a
position table shared by all samples and a direct use) gets one contribution per use;
:func:`accumulate` sums them per sample *before* raising to the power ``p`` (2: Fisher,
1: MAS). Factored uses of one shape are concatenated along ``t``; factored and sparse
uses (a tied embedding and output head) add the sparse rows as a correction
``|A + E|^p − |A|^p`` on the rows each sample touches; other mixes materialise per-sample
gradients in bounded chunks of samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.sqgrad import sqgrad

__all__ = ["ConvFactored", "Dense", "Factored", "LinearFactored", "Sparse", "accumulate", "coalesce", "power_of"]

_BUDGET_BYTES = 64 * 2**20  # ceiling for the per-sample buffers of one chunk ...
_MIN_BUDGET_BYTES = 2**20  # ... which otherwise stay within the layer's own activation size


def power_of(t: torch.Tensor, power: int) -> torch.Tensor:
    """``|t|^power`` for ``power`` 2 (Fisher) or 1 (MAS), as a new tensor."""
    return t.square() if power == 2 else t.abs()


class Factored:
    """Per-sample gradient ``[G, O, I]`` (``G`` groups) = ``Σ_t g[b,g,t,:]ᵀ x[b,g,t,:]``."""

    groups: int
    rows: int
    cols: int
    batch: int

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
    """``x [B, T, I]``, ``g [B, T, O]`` (any strides)."""

    def __init__(self, x: torch.Tensor, g: torch.Tensor):
        self.x, self.g = x, g
        self.groups, self.rows, self.cols, self.batch = 1, g.shape[-1], x.shape[-1], x.shape[0]

    def sample_bytes(self) -> int:
        return 0

    def take(self, start, stop):
        return self.x[start:stop].unsqueeze(1), self.g[start:stop].unsqueeze(1)


class ConvFactored(Factored):
    """Convolution of ``M`` images per sample: ``x [B, M, C, *spatial]``, ``g [B, M, O, *out]``.

    ``x`` is the (padded) input; its im2col is built per chunk of samples, one unfold for the
    whole chunk, laid out ``[n, G, M·L, C/G·K]`` so that ``t`` runs over images and positions.
    """

    def __init__(self, x, g, weight_shape, stride, pads, dilation, groups):
        self.x, self.g = x, g
        self.kernel = tuple(weight_shape[2:])
        self.stride, self.dilation, self.groups, self.pads = stride, dilation, groups, pads
        self.rows = weight_shape[0] // groups
        self.cols = weight_shape[1] * math.prod(self.kernel)
        self.images = x.shape[1]
        self.positions = math.prod(g.shape[3:])
        self.batch = x.shape[0]

    def sample_bytes(self) -> int:
        # the unfolded chunk, plus its transposed copy for the kernel
        return 2 * self.cols * self.groups * self.images * self.positions * self.x.element_size()

    def take(self, start, stop):
        n = stop - start
        x = self.x[start:stop].reshape(n * self.images, *self.x.shape[2:])
        if any(self.pads):
            x = F.pad(x, self.pads)
        cols = unfold(x, self.kernel, self.dilation, self.stride)  # [n·M, C·K, L]
        L = cols.shape[-1]
        if L != self.positions:
            raise RuntimeError(f"internal error: unfolded {L} positions, the convolution output has {self.positions}")
        G, M = self.groups, self.images
        xg = cols.view(n, M, G, self.cols, L).permute(0, 2, 1, 4, 3).reshape(n, G, M * L, self.cols)
        gg = self.g[start:stop].reshape(n, M, G, self.rows, L).permute(0, 2, 1, 4, 3).reshape(n, G, M * L, self.rows)
        return xg, gg


@dataclass
class Dense:
    values: torch.Tensor  # [B, numel], accumulation dtype


@dataclass
class Sparse:
    sample: torch.Tensor  # [N] long, sorted
    row: torch.Tensor  # [N] long
    values: torch.Tensor  # [N, D], accumulation dtype
    num_rows: int


def coalesce(sample, row, values, num_rows) -> Sparse:
    """Sum the values of equal ``(sample, row)`` pairs; the result is sorted by sample, then row."""
    key = sample * num_rows + row
    uniq, inverse = torch.unique(key, return_inverse=True)
    summed = torch.zeros((uniq.numel(), values.shape[-1]), dtype=values.dtype, device=values.device)
    summed.index_add_(0, inverse, values)
    return Sparse(uniq // num_rows, uniq % num_rows, summed, num_rows)


def unfold(x: torch.Tensor, kernel, dilation, stride) -> torch.Tensor:
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


# --------------------------------------------------------------------------- accumulation


def accumulate(items: list, out: torch.Tensor, power: int) -> None:
    """``out += Σ_b |Σ_items ∇ℓ_b(item)|^power`` (``out`` shaped like the parameter)."""
    if not items:
        return
    batch = _batch_of(items)
    factored = [c for c in items if isinstance(c, Factored)]
    dense = [c for c in items if isinstance(c, Dense)]
    sparse = [c for c in items if isinstance(c, Sparse)]
    same_factored = len({(c.groups, c.rows, c.cols) for c in factored}) <= 1
    if factored and not dense and not sparse and same_factored:
        _accumulate_factored(factored, out, power, batch)
    elif dense and not factored and not sparse:
        total = dense[0].values if len(dense) == 1 else sum(c.values for c in dense)
        out.view(-1).add_(power_of(total.to(out.dtype), power).sum(0))
    elif sparse and not factored and not dense:
        sp = sparse[0] if len(sparse) == 1 else _merge(sparse)
        out.view(sp.num_rows, -1).index_add_(0, sp.row, power_of(sp.values.to(out.dtype), power))
    elif (sparse and factored and not dense and same_factored and factored[0].groups == 1
          and all(isinstance(c, LinearFactored) for c in factored)):
        _accumulate_factored(factored, out, power, batch)
        _sparse_correction(factored, _merge(sparse), out, power)
    else:
        _accumulate_dense(items, out, power, batch)


def _batch_of(items) -> int:
    for c in items:
        if isinstance(c, Factored):
            return c.batch
        if isinstance(c, Dense):
            return c.values.shape[0]
    return int(items[0].sample.max()) + 1 if items[0].sample.numel() else 0


def _merge(sparse: list) -> Sparse:
    if len(sparse) == 1:
        return sparse[0]
    return coalesce(
        torch.cat([c.sample for c in sparse]),
        torch.cat([c.row for c in sparse]),
        torch.cat([c.values for c in sparse]),
        sparse[0].num_rows,
    )


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
            sqgrad(x[:, 0], g[:, 0], out3[0], norm="squared" if power == 2 else "abs")
        else:
            per = torch.einsum("bgti,bgto->bgoi", x.to(out.dtype), g.to(out.dtype))
            out3.add_(power_of(per, power).sum(0))


def _sparse_correction(factored, sp: Sparse, out, power):
    r"""Add ``Σ_{(b,r)} |A_b[r] + E_b[r]|^p − |A_b[r]|^p`` over the rows each sample's sparse part touches.

    ``A_b = Σ_t g[b,t]ᵀ x[b,t]`` (the factored part, ``[O, I]`` with ``O`` = table rows) is
    needed only at those rows: ``A_b[r] = Σ_t g[b,t,r] x[b,t]``, one small batched matmul over
    the at most ``R`` rows per sample (padded).
    """
    if sp.sample.numel() == 0:
        return
    acc = out.dtype
    batch = factored[0].batch
    counts = torch.bincount(sp.sample, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(sp.sample.numel(), device=sp.sample.device) - starts[sp.sample]
    width = int(counts.max())
    rows = torch.zeros((batch, width), dtype=torch.long, device=sp.sample.device)
    rows[sp.sample, pos] = sp.row
    a = torch.zeros((batch, width, out.shape[-1] if out.dim() > 1 else 1), dtype=acc, device=out.device)
    for c in factored:
        g = c.g.to(acc)  # [B, T, O]
        picked = torch.gather(g, 2, rows.unsqueeze(1).expand(-1, g.shape[1], -1))  # [B, T, R]
        a.baddbmm_(picked.transpose(1, 2), c.x.to(acc))
    a_rows = a[sp.sample, pos].view(sp.values.shape[0], -1)  # [N, I]
    e = sp.values.to(acc).view_as(a_rows)
    if power == 2:
        delta = e * (2 * a_rows + e)  # (A + E)² − A² without cancellation
    else:
        delta = (a_rows + e).abs() - a_rows.abs()
    out.view(sp.num_rows, -1).index_add_(0, sp.row, delta)


def _accumulate_dense(items, out, power, batch):
    """Mixed contribution kinds: materialise per-sample gradients in bounded chunks."""
    numel = out.numel()
    per_sample = numel * out.element_size() * 2 + sum(c.sample_bytes() for c in items if isinstance(c, Factored))
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
                table.index_put_((c.sample[sel] - start, c.row[sel]), c.values[sel].to(out.dtype), accumulate=True)
        flat.add_(power_of(dense, power).sum(0))
