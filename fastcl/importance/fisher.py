r"""Diagonal Fisher information and MAS importance from one forward/backward per batch.

For parameters ``θ`` and samples ``x_1 … x_N`` (all counted rows of all batches),

* ``diagonal_fisher``: ``F = (1/N) Σ_n (∂ℓ_n/∂θ)²`` (element-wise), where ``ℓ_n`` is

  - ``kind="empirical"``: ``loss_fn(outputs, targets)[n]``; by default the cross-entropy
    ``−log p(y_n | x_n)`` with the given integer label (``-100``: no label, not counted);
  - ``kind="true"``: ``−log p(ŷ_n | x_n)`` with ``ŷ_n ~ softmax(outputs_n)`` drawn once per
    sample (``torch.multinomial``, global torch RNG): an unbiased estimate of ``exact``;
  - ``kind="exact"``: the expectation itself, ``F = (1/N) Σ_n Σ_c p(c|x_n) (∂ log p(c|x_n)/∂θ)²``,
    one backward pass per class. With ``top_k=k`` only the ``k`` most probable classes
    of each sample enter the sum and the kept probabilities are *not* renormalised, so
    the result is a lower bound of the full sum that omits the mass of the other classes.

* ``mas_importance`` (Aljundi et al., 2018): ``Ω = (1/N) Σ_n |∂‖f(x_n)‖²₂/∂θ|`` with ``f(x_n)``
  the model output row(s) of sample ``n``.

``N`` and the losses are defined in :mod:`fastcl.importance.objectives`.

Engine (:mod:`.engine`): one ordinary forward and backward per batch (per class for
``"exact"``). Every tensor is tagged with the dimension that carries the samples, from where
it came from (:mod:`.provenance`), never from its sizes (batches that repeat a traced forward
call for call replay its tags, :mod:`.recording`); every use of a parameter by a
recognised op (:mod:`.rules`: linear, ``addmm`` / ``@`` with a weight, conv1d/2d/3d,
embedding, layer/RMS/group/batch norm, and the projections inside multi-head attention)
runs a rule that turns (input, output gradient) into ``Σ_n |∂ℓ_n/∂θ|^p`` with
:func:`fastcl.ops.sqgrad` without materialising per-sample gradients of weight matrices.
Inputs that all samples share (position tables ``embedding(arange(T))``, a parameter or
buffer passed through a layer) and parameters used directly in Python (``w * x``,
``x + pos``, ``cat([cls, x])``) are followed to where they meet the batch, where each
sample's own gradient is recovered exactly. Parameters whose per-sample structure cannot
be proven are computed exactly by :mod:`.fallback` (``torch.func`` per-sample gradients),
with a one-time :class:`PerSampleFallbackWarning` naming them and why. A parameter used
several times has its per-sample gradients summed over the uses before squaring.

Results are float32 (float64 for float64 parameters), accumulated in that precision even
for bfloat16/float16 models, on each parameter's device, keyed by :func:`canonical_name`.
The model's train/eval modes, ``requires_grad`` flags and ``.grad`` are left as found.

Distributed (see :mod:`fastcl.distributed`): for a DDP-wrapped model, each rank runs the
pass on its own data with the unwrapped module (``autograd.grad``: DDP's gradient
all-reduce never fires), then the per-rank sums and sample counts are all-reduced, so
every rank gets ``(Σ_ranks Σ_n |g_n|^p) / N_total``. For an FSDP2 (``fully_shard``) model
the pass runs through FSDP's own unshard/reshard hooks, the sums are all-reduced and each
rank returns its shard as a DTensor placed like the parameter. Every rank must call with
the same number of batches (FSDP2's forward and backward are collectives), and
``max_samples`` counts per rank.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from torch import nn

from .._dtypes import acc_dtype
from .._names import _canonical_parameters, canonical_name, unwrap_model
from .._validate import check_int
from ..distributed import (
    all_reduce_sum,
    as_dtensor_like,
    collective_device,
    data_parallel_groups,
    is_dtensor,
    local_shard,
)
from .batches import default_forward
from .contributions import Accumulators
from .engine import ImportancePass, PerSampleFallbackWarning
from .objectives import IGNORE_INDEX, FisherObjective, MASObjective

__all__ = ["PerSampleFallbackWarning", "diagonal_fisher", "mas_importance"]

_KINDS = ("empirical", "true", "exact")


# --------------------------------------------------------------------------- public API


def diagonal_fisher(
    model: nn.Module,
    data: Iterable,
    loss_fn=None,
    kind: str = "empirical",
    max_samples: int | None = None,
    *,
    forward=None,
    output_fn=None,
    params: Iterable[str] | None = None,
    top_k: int | None = None,
    verbose: bool | None = None,
    desc: str = "Fisher",
) -> dict[str, torch.Tensor]:
    r"""Diagonal Fisher ``F[θ] = (1/N) Σ_n (∂ℓ_n/∂θ)²`` of ``model`` over the samples of ``data``.

    Args:
        model: the network (DDP / ``torch.compile`` wrappers are unwrapped).
        data: iterable of batches. By default a batch is ``(inputs, targets)`` (``inputs``
            a tensor, a tuple of tensors passed as ``model(*inputs)`` or a dict passed as
            ``model(**inputs)``), or a bare ``inputs`` tensor for ``kind="true"/"exact"``;
            tensors are moved to the model's device. Batches may differ in size. The
            samples of a batch are the rows of every tensor whose dim 0 equals the first
            tensor's.
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` per-sample losses (``kind="empirical"``
            only). Default: cross-entropy of logits ``[B, C]`` with integer labels ``[B]``,
            i.e. ``−log p(y|x)``; label ``-100`` means no label (not counted). Float targets
            need a ``loss_fn`` (e.g. ``lambda out, y: 0.5 * (out - y).square().flatten(1).sum(1)``).
        kind: ``"empirical"``, ``"true"`` or ``"exact"`` (see the module docstring);
            ``"true"`` and ``"exact"`` need categorical logits ``[B, C]`` and ignore targets.
        max_samples: use only the first ``max_samples`` samples (the last batch is cut).
        forward: ``forward(model, batch) -> (outputs, targets)`` replacing the default batch
            handling (dict batches, Hugging Face models...); it moves tensors itself.
        output_fn: ``output_fn(outputs) -> tensor`` applied to what the model (or
            ``forward``) returns, e.g. ``lambda out: out.logits`` for a Hugging Face
            ``ModelOutput`` or ``lambda out: out[0]`` for a tuple.
        params: canonical names of the parameters to compute (default: every parameter
            with ``requires_grad=True``; frozen ones may be named too).
        top_k: ``kind="exact"`` only: keep the ``top_k`` most probable classes per sample,
            without renormalising their probabilities.
        verbose: progress bar over batches; ``None``: only when stderr is a terminal.
        desc: progress-bar label.

    Returns:
        ``{canonical name: tensor shaped like the parameter}`` (float32, float64 for
        float64 parameters) on each parameter's device.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if kind != "empirical" and loss_fn is not None:
        raise ValueError(
            f'kind="{kind}" derives the loss from the model\'s categorical logits (−log p(c|x)); '
            'loss_fn is only accepted with kind="empirical"'
        )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if top_k is not None:
        if kind != "exact":
            raise ValueError(f'top_k is only meaningful with kind="exact", got kind={kind!r}')
        top_k = check_int(top_k, "top_k", low=1)
    _check_output_fn(output_fn)
    objective = FisherObjective(kind, loss_fn, top_k, output_fn)
    return _run(model, data, objective, 2, max_samples, forward, params, verbose, desc)


def mas_importance(
    model: nn.Module,
    data: Iterable,
    max_samples: int | None = None,
    *,
    forward=None,
    output_fn=None,
    params: Iterable[str] | None = None,
    verbose: bool | None = None,
) -> dict[str, torch.Tensor]:
    r"""MAS importance ``Ω[θ] = (1/N) Σ_n |∂‖f(x_n)‖²₂ / ∂θ|`` (Aljundi et al., 2018).

    ``f(x_n)`` is the model output for sample ``n`` (all its output elements; ``output_fn``
    picks the tensor from a tuple or ``ModelOutput``). Batches need no targets: a bare
    tensor, ``(inputs,)`` or ``(inputs, targets)`` (targets ignored). Other arguments and
    the result are as in :func:`diagonal_fisher`.
    """
    _check_output_fn(output_fn)
    return _run(model, data, MASObjective(output_fn), 1, max_samples, forward, params, verbose, "MAS")


def _check_data(data) -> None:
    """``data`` must be an iterable of batches (``TypeError`` naming ``data`` otherwise)."""
    if data is None or isinstance(data, (str, bytes)) or not (isinstance(data, Iterable) or hasattr(data, "__getitem__")):
        raise TypeError(
            f"data must be an iterable of batches (a DataLoader, or a list of (inputs, targets) tuples), "
            f"got {type(data).__name__}"
        )


def _check_output_fn(output_fn) -> None:
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn must be callable (e.g. lambda out: out.logits), got {type(output_fn).__name__}")


# --------------------------------------------------------------------------- the pass


def _show_progress(verbose) -> bool:
    if verbose is None:
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False
    return bool(verbose)


def _select(named, params):
    by_name = dict(named)
    if params is None:
        selected = [n for n, p in named if p.requires_grad]
    else:
        if isinstance(params, str):
            params = [params]
        selected = []
        for raw in params:
            if not isinstance(raw, str):
                raise TypeError(f"params must be parameter names (str), got {type(raw).__name__}")
            name = canonical_name(raw)
            if name not in by_name:
                known = ", ".join(list(by_name)[:8])
                raise ValueError(f"params: the model has no parameter {raw!r} (known: {known}{', ...' if len(by_name) > 8 else ''})")
            if name not in selected:
                selected.append(name)
    if not selected:
        raise ValueError("no parameters to compute: the model has no parameter with requires_grad=True and params is empty")
    return selected


def _model_device(model):
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _run(model, data, objective, power, max_samples, forward, params, verbose, desc):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_data(data)
    if max_samples is not None:
        max_samples = check_int(max_samples, "max_samples", low=1)
    if verbose is not None and not isinstance(verbose, bool):
        raise TypeError(f"verbose must be True, False or None (a progress bar only on a terminal), got {verbose!r}")
    if not isinstance(desc, str):
        raise TypeError(f"desc must be a str (the progress bar's label), got {type(desc).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable, got {type(forward).__name__}")
    # before unwrapping: DDP's group lives on the wrapper (no process group: neither DDP nor DTensors exist)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    groups = data_parallel_groups(model) if distributed else ()
    base = unwrap_model(model)
    named = _canonical_parameters(base)
    by_name = dict(named)
    selected = _select(named, params)
    raw_names = {canonical_name(raw): raw for raw, _ in base.named_parameters()}
    device = _model_device(base)
    # full-size accumulators, also for FSDP2 (DTensor) parameters: see _reduce
    acc = Accumulators({n: torch.empty(by_name[n].shape, dtype=acc_dtype(by_name[n].dtype), device=by_name[n].device)
                        for n in selected})
    sharded = any(is_dtensor(by_name[n]) for n in selected)
    pass_ = ImportancePass(base, selected, by_name, raw_names, acc, objective, power, forward or default_forward,
                           forward is None, device)

    modes = {m: m.training for m in base.modules()}
    flags = {n: by_name[n].requires_grad for n in selected}
    mha = getattr(getattr(torch.backends, "mha", None), "get_fastpath_enabled", None)
    fastpath = mha() if mha is not None else None
    bar = None
    seen = counted = index = 0
    try:
        base.eval()
        for n in selected:
            by_name[n].requires_grad_(True)
        if fastpath is not None:
            torch.backends.mha.set_fastpath_enabled(False)
        pass_.install(sharded, _fsdp_module_types() if sharded else ())
        iterator = data
        if _show_progress(verbose):
            from tqdm import tqdm

            try:
                total = len(data)
            except TypeError:
                total = None
            bar = iterator = tqdm(data, desc=desc, total=total)
        for index, batch in enumerate(iterator):
            size, kept = pass_.batch(index, batch, None if max_samples is None else max_samples - seen)
            seen += size
            counted += kept
            if max_samples is not None and seen >= max_samples:
                break  # before fetching (loading) another batch
    except Exception:
        _agree(groups, 0, 0, failed=True)  # the other ranks raise too instead of waiting in _agree forever
        raise
    finally:
        if bar is not None:
            bar.close()
        pass_.uninstall()
        if fastpath is not None:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        for n, flag in flags.items():
            by_name[n].requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode
    # One rank: the division by the sample count goes into the finiteness pass.
    scaled = pass_.check_finite(index + 1 if seen else 0, scale=counted if not groups and counted else None)
    seen, counted = _agree(groups, seen, counted)
    if seen == 0:
        raise ValueError("data yielded no samples: the importance needs at least one batch with one sample")
    if counted == 0:
        raise ValueError(
            f"every sample's targets are the ignore index {IGNORE_INDEX}: no sample has a label, so the Fisher "
            "is undefined (it would be all zeros)"
        )
    return _reduce(acc, selected, by_name, 1 if scaled else counted, groups)


def _agree(groups, seen: int, counted: int, failed: bool = False) -> tuple[int, int]:
    """Total sample counts over the data-parallel ranks; raises on every rank if one failed.

    One all-reduce of ``[seen, counted, failed]``. Without ``groups`` (no DDP/FSDP2): the local counts.
    """
    if not groups:
        return seen, counted
    status = torch.tensor([seen, counted, int(failed)], dtype=torch.int64)
    try:
        status = all_reduce_sum(status.to(collective_device(groups[0])), groups).cpu()
    except Exception:
        if failed:
            return 0, 0  # already raising the original error
        raise
    if not failed and int(status[2]) > 0:
        raise RuntimeError(f"the importance pass failed on {int(status[2])} other rank(s); see their error")
    return int(status[0]), int(status[1])


def _reduce(acc, selected, by_name, count, groups):
    r"""``Σ_ranks acc / count``; the local shard of it (a DTensor like the parameter) under FSDP2.

    Each rank accumulated ``Σ_{n ∈ its samples} |g_n|^p`` for the *full* parameter (the
    per-sample rules see the unsharded parameters' activations and output gradients).
    The sum over ranks is an all-reduce of those full-size sums, after which an FSDP2 rank
    keeps only its shard (all-reduce then slice: simple and works on every backend; a
    reduce-scatter would move half the bytes but the full-size accumulators already exist
    during the pass, so peak memory is the same). Each full accumulator is freed as soon
    as its shard is taken.
    """
    out = {}
    for n in selected:
        total = all_reduce_sum(acc.pop(n), groups)
        p = by_name[n]
        if is_dtensor(p):
            out[n] = as_dtensor_like(local_shard(total, p).clone().div_(count), p)
        else:
            out[n] = total.div_(count) if count != 1 else total
        del total
    return out


def _fsdp_module_types() -> tuple:
    """The FSDP2 module class (``FSDPModule``) of this torch, as a tuple (empty when absent)."""
    for path in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            module = __import__(path, fromlist=["FSDPModule"])
        except ImportError:
            continue
        cls = getattr(module, "FSDPModule", None)
        if cls is not None:
            return (cls,)
    return ()
