r"""Per-sample gradient contributions and their accumulation into ``Σ_b |∇ℓ_b|^p``.

A rule describes the per-sample gradient ``∇_θ ℓ_b`` that one use of a parameter
contributes, in the cheapest form that determines it:

* :class:`Factored` — ``∇ℓ_b = Σ_t g[b,t]ᵀ x[b,t]`` (linear maps): never materialised for a
  single use; ``Σ_b |∇ℓ_b|^p`` comes from :func:`fastcl.ops.sqgrad`.
* :class:`ConvGrads` — convolutions: per-sample weight gradients from one grouped
  convolution per chunk of samples (small: ``|W|`` per sample), raised to ``p`` and summed.
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

from ..ops.sqgrad import sqgrad_into

__all__ = ["Accumulators", "ConvGrads", "Dense", "Factored", "Sparse", "accumulate", "assign", "coalesce", "power_of",
           "rows_of", "sparse_correction"]

_BUDGET_BYTES = 64 * 2**20  # ceiling for the per-sample buffers of one chunk ...
_MIN_BUDGET_BYTES = 2**20  # ... which otherwise stay within the layer's own activation size


def power_of(t: torch.Tensor, power: int) -> torch.Tensor:
    """``|t|^power`` for ``power`` 2 (Fisher) or 1 (MAS), as a new tensor."""
    return t.square() if power == 2 else t.abs()


class Factored:
    """Per-sample gradient ``[O, I]`` = ``Σ_t g[b,t,:]ᵀ x[b,t,:]`` with ``x [B, T, I]``, ``g [B, T, O]`` (any strides)."""

    def __init__(self, x: torch.Tensor, g: torch.Tensor):
        self.x, self.g = x, g
        self.rows, self.cols, self.batch = g.shape[-1], x.shape[-1], x.shape[0]
        self._g_power = None

    def g_power(self, power: int, dtype: torch.dtype) -> torch.Tensor:
        """``|g[b, 0, :]|^p`` ``[B, O]`` in ``dtype`` for a single position (``T = 1``), computed once:
        the ``Σ_b |g_b|^p`` of a bias on the same output (a :class:`Dense` with ``of=`` this) reuses it."""
        cached = self._g_power
        if cached is None or cached[0] != power or cached[1].dtype != dtype:
            cached = (power, power_of(self.g.reshape(self.batch, self.rows).to(dtype), power))
            self._g_power = cached
        return cached[1]

    def accumulate_single(self, out: torch.Tensor, power: int) -> None:
        """``out += Σ_b |g_bᵀ x_b|^p``: for ``T = 1`` one matmul ``|g|^pᵀ |x|^p`` (``|g|^p`` shared, see
        :meth:`g_power`), otherwise :func:`fastcl.ops.sqgrad`'s kernel."""
        x = self.x
        if x.shape[1] != 1 or self.batch == 0 or self.rows == 0 or self.cols == 0:
            sqgrad_into(x, self.g, out, power)
            return
        out.addmm_(self.g_power(power, out.dtype).t(), power_of(x.reshape(self.batch, self.cols).to(out.dtype), power))

    def sample_bytes(self) -> int:
        """Bytes one sample costs in :meth:`take` (for chunking): views only."""
        return 0

    def take(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[start:stop], self.g[start:stop]

    def activation_bytes(self) -> int:
        """Bytes of the layer input and output gradient, which exist anyway during backward."""
        return self.x.numel() * self.x.element_size() + self.g.numel() * self.g.element_size()


class ConvGrads:
    """Per-sample convolution weight gradients, produced in chunks of samples, never all at once.

    ``x [B, M, C, *spatial]`` (``M`` images per sample, zero padding already applied where it is
    asymmetric), ``g [B, M, O, *out]``. For samples ``start:stop`` the per-image gradients are the
    weight gradient of one grouped convolution whose groups are the images (``groups = n·M·G``):
    ``[n·M·O, C/G, *K]``, summed over each sample's ``M`` images. Same cost as a plain weight
    gradient; memory ``n·|W|`` per chunk.
    """

    def __init__(self, x, g, weight_shape, stride, padding, dilation, groups):
        self.x, self.g = x, g
        self.weight_shape, self.stride, self.padding = tuple(weight_shape), list(stride), list(padding)
        self.dilation, self.groups = list(dilation), groups
        self.batch, self.images = x.shape[0], x.shape[1]
        self.numel = math.prod(self.weight_shape)

    def sample_bytes(self) -> int:
        return 2 * self.images * self.numel * 4

    def activation_bytes(self) -> int:
        return self.x.numel() * self.x.element_size() + self.g.numel() * self.g.element_size()

    def dense(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """``[n, |W|]`` per-sample gradients of samples ``start:stop`` in ``dtype``."""
        n, m = stop - start, self.images
        x = self.x[start:stop].to(dtype)
        g = self.g[start:stop].to(dtype)
        images = n * m
        x = x.reshape(1, images * x.shape[2], *x.shape[3:])
        g = g.reshape(1, images * g.shape[2], *g.shape[3:])
        o, c_per_group = self.weight_shape[0], self.weight_shape[1]
        weight = x.new_empty(()).expand(images * o, c_per_group, *self.weight_shape[2:])
        grads = torch.ops.aten.convolution_backward(
            g, x, weight, None, self.stride, self.padding, self.dilation, False, [0] * len(self.stride),
            images * self.groups, [False, True, False],
        )[1]
        grads = grads.reshape(n, m, self.numel)
        return grads[:, 0] if m == 1 else grads.sum(1)


@dataclass
class Dense:
    values: torch.Tensor  # [B, numel], accumulation dtype
    of: Factored | None = None  # values = Σ_t of.g[b, t] (a linear map's bias): |values|^p comes from of.g_power


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


# --------------------------------------------------------------------------- accumulation


class Accumulators(dict):
    """``{name: Σ_b |∇ℓ_b|^p so far}``, allocated uninitialised.

    Indexing zero-fills an accumulator the first time; :meth:`take_fresh` hands it over
    unfilled once, so that the first contribution can be written with :func:`assign` instead
    of added to zeros (one pass over the parameter's size less).
    """

    def __init__(self, tensors: dict):
        super().__init__(tensors)
        self.fresh = set(tensors)

    def __getitem__(self, name):
        t = dict.__getitem__(self, name)
        if name in self.fresh:
            self.fresh.discard(name)
            t.zero_()
        return t

    def pop(self, name):
        self[name]  # zero-filled if never written
        return dict.pop(self, name)

    def take_fresh(self, name) -> tuple[torch.Tensor, bool]:
        """``(accumulator, whether it was never written)``; afterwards it counts as written."""
        fresh = name in self.fresh
        if fresh:
            self.fresh.discard(name)
        return dict.__getitem__(self, name), fresh


@torch.no_grad()
def assign(items: list, out: torch.Tensor, power: int) -> bool:
    """``out = Σ_b |∇ℓ_b|^power`` for the common single contributions; ``False`` (``out`` untouched) otherwise."""
    if len(items) != 1:
        return False
    c = items[0]
    if type(c) is Factored:
        x = c.x
        if x.shape[1] != 1 or c.batch == 0 or c.rows == 0 or c.cols == 0:
            return False
        torch.mm(c.g_power(power, out.dtype).t(), power_of(x.reshape(c.batch, c.cols).to(out.dtype), power), out=out)
        return True
    if type(c) is Dense and c.values.shape[0] > 0:
        torch.sum(_dense_power(c, out.dtype, power), 0, out=out.view(-1))
        return True
    return False


def _dense_power(c, dtype, power) -> torch.Tensor:
    of = c.of
    if of is not None and of.x.shape[1] == 1:
        return of.g_power(power, dtype)
    return power_of(c.values.to(dtype), power)


def accumulate(items: list, out: torch.Tensor, power: int) -> None:
    """``out += Σ_b |Σ_items ∇ℓ_b(item)|^power`` (``out`` shaped like the parameter)."""
    if not items:
        return
    if len(items) == 1:  # the common case, without the classification below
        c = items[0]
        if type(c) is Factored:
            c.accumulate_single(out, power)
            return
        if type(c) is Dense:
            out.view(-1).add_(_dense_power(c, out.dtype, power).sum(0))
            return
    batch = _batch_of(items)
    factored = [c for c in items if isinstance(c, Factored)]
    dense = [c for c in items if isinstance(c, Dense)]
    sparse = [c for c in items if isinstance(c, Sparse)]
    lazy = [c for c in items if isinstance(c, ConvGrads)]
    same_factored = len({(c.rows, c.cols) for c in factored}) <= 1
    if lazy:
        _accumulate_dense(items, out, power, batch)
    elif factored and not dense and not sparse and same_factored:
        _accumulate_factored(factored, out, power, batch)
    elif dense and not factored and not sparse:
        total = dense[0].values if len(dense) == 1 else sum(c.values for c in dense)
        out.view(-1).add_(power_of(total.to(out.dtype), power).sum(0))
    elif sparse and not factored and not dense:
        sp = sparse[0] if len(sparse) == 1 else _merge(sparse)
        out.view(sp.num_rows, -1).index_add_(0, sp.row, power_of(sp.values.to(out.dtype), power))
    elif sparse and factored and not dense and same_factored:
        _accumulate_factored(factored, out, power, batch)
        _sparse_correction(factored, _merge(sparse), out, power)
    else:
        _accumulate_dense(items, out, power, batch)


def _batch_of(items) -> int:
    for c in items:
        if isinstance(c, (Factored, ConvGrads)):
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
    if len(items) == 1:
        sqgrad_into(items[0].x, items[0].g, out, power)
        return
    sqgrad_into(torch.cat([c.x for c in items], dim=1), torch.cat([c.g for c in items], dim=1), out, power)


def _sparse_correction(factored, sp: Sparse, out, power):
    r"""Add ``Σ_{(b,r)} |A_b[r] + E_b[r]|^p − |A_b[r]|^p`` over the rows each sample's sparse part touches.

    ``A_b = Σ_t g[b,t]ᵀ x[b,t]`` is the factored part (``[O, I]``, ``O`` = table rows).
    """
    if sp.sample.numel():
        sparse_correction(out, sp.row, rows_of(factored, sp.sample, sp.row, out.dtype), sp.values, power)


def rows_of(factored: list, sample: torch.Tensor, row: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    r"""``A_b[r] = Σ_items Σ_t g[b,t,r] x[b,t]`` for the pairs ``(sample, row)`` (sorted by sample): ``[N, I]``.

    One small batched matmul over at most ``R`` rows per sample (padded), never ``A_b`` whole.
    """
    batch = factored[0].batch
    counts = torch.bincount(sample, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(sample.numel(), device=sample.device) - starts[sample]
    width = int(counts.max()) if sample.numel() else 0
    rows = torch.zeros((batch, width), dtype=torch.long, device=sample.device)
    rows[sample, pos] = row
    a = torch.zeros((batch, width, factored[0].cols), dtype=dtype, device=sample.device)
    for c in factored:
        g = c.g.to(dtype)  # [B, T, O]
        picked = torch.gather(g, 2, rows.unsqueeze(1).expand(-1, g.shape[1], -1))  # [B, T, R]
        a.baddbmm_(picked.transpose(1, 2), c.x.to(dtype))
    return a[sample, pos]


def sparse_correction(out, row, a_rows, values, power) -> None:
    """``out[r] += |a + e|^p − |a|^p`` at the listed rows (``a``: the factored part there, ``e``: the sparse values)."""
    e = values.to(a_rows.dtype).view_as(a_rows)
    if power == 2:
        delta = e * (2 * a_rows + e)  # (A + E)² − A² without cancellation
    else:
        delta = (a_rows + e).abs() - a_rows.abs()
    out.view(out.shape[0], -1).index_add_(0, row, delta)


def _accumulate_dense(items, out, power, batch):
    """Mixed contribution types (or convolutions): per-sample gradients in bounded chunks of samples."""
    numel = out.numel()
    lazy = (Factored, ConvGrads)
    per_sample = numel * out.element_size() * 2 + sum(c.sample_bytes() for c in items if isinstance(c, lazy))
    chunk = _chunk(per_sample, batch, sum(c.activation_bytes() for c in items if isinstance(c, lazy)))
    flat = out.view(-1)
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        n = stop - start
        dense = torch.zeros((n, numel), dtype=out.dtype, device=out.device)
        for c in items:
            if isinstance(c, ConvGrads):
                if len(items) == 1:
                    flat.add_(power_of(c.dense(start, stop, out.dtype), power).sum(0))
                    continue
                dense += c.dense(start, stop, out.dtype)
            elif isinstance(c, Factored):
                x, g = c.take(start, stop)
                dense += torch.einsum("bti,bto->boi", x.to(out.dtype), g.to(out.dtype)).reshape(n, -1)
            elif isinstance(c, Dense):
                dense += c.values[start:stop].to(out.dtype)
            else:
                sel = (c.sample >= start) & (c.sample < stop)
                table = dense.view(n, c.num_rows, -1)
                table.index_put_((c.sample[sel] - start, c.row[sel]), c.values[sel].to(out.dtype), accumulate=True)
        if not (len(items) == 1 and isinstance(items[0], ConvGrads)):
            flat.add_(power_of(dense, power).sum(0))
