r"""Diagonal Fisher information and MAS importance from one forward/backward per batch.

For parameters ``θ`` and samples ``x_1 … x_N`` (all rows of all batches),

* ``diagonal_fisher``: ``F = (1/N) Σ_n (∂ℓ_n/∂θ)²`` (element-wise), where ``ℓ_n`` is

  - ``kind="empirical"``: ``loss_fn(outputs, targets)[n]``; by default the cross-entropy
    ``−log p(y_n | x_n)`` with the given label;
  - ``kind="true"``: ``−log p(ŷ_n | x_n)`` with ``ŷ_n ~ softmax(outputs_n)`` drawn once per
    sample (``torch.multinomial``, global torch RNG): an unbiased estimate of ``exact``;
  - ``kind="exact"``: the expectation itself, ``F = (1/N) Σ_n Σ_c p(c|x_n) (∂ log p(c|x_n)/∂θ)²``,
    one backward pass per class. With ``top_k=k`` only the ``k`` most probable classes
    of each sample enter the sum and the kept probabilities are *not* renormalised, so
    the result is a lower bound of the full sum that omits the mass of the other classes.

* ``mas_importance`` (Aljundi et al., 2018): ``Ω = (1/N) Σ_n |∂‖f(x_n)‖²₂/∂θ|`` with ``f(x_n)``
  the model output row(s) of sample ``n``.

Engine: during an ordinary forward pass, every use of a tracked parameter by a recognised
op (linear, conv1d/2d/3d, embedding, layer/RMS/group/batch norm, the projections of
multi-head attention, and elementwise products and sums with a parameter broadcast along
leading dims, ``w * x`` and ``x ± w``, as in Hugging Face's RMSNorm) keeps the op input; tensor hooks on the op outputs receive, during
an ordinary backward pass of ``Σ_n ℓ_n``, the output gradient whose rows for sample ``n``
are exactly sample ``n``'s own (the losses are per sample and the model is in eval mode).
A rule per op turns (input, output gradient) into ``Σ_n |∂ℓ_n/∂θ|^p`` with
:func:`fastcl.ops.sqgrad` without materialising per-sample gradients of weight matrices.
Parameters used any other way (recurrent layers, direct use in custom code...) are
computed exactly by :mod:`fastcl.importance.fallback`, with a one-time
:class:`PerSampleFallbackWarning`. A parameter used several times (tied weights, a module
called twice) has its per-sample gradients summed over the uses before squaring.

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
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._names import _canonical_parameters, canonical_name, unwrap_model
from ..distributed import (
    all_reduce_sum,
    as_dtensor_like,
    collective_device,
    data_parallel_groups,
    is_dtensor,
    local_shard,
)
from ._capture import Capture, resolve_layout
from .fallback import Runner, per_sample_accumulate
from .rules import acc_dtype, accumulate, contributions

__all__ = ["PerSampleFallbackWarning", "diagonal_fisher", "mas_importance"]

_KINDS = ("empirical", "true", "exact")
# torch layers whose ``batch_first=False`` means their submodules see [S, B, ...] inputs;
# used only to break ties when a sequence length equals the batch size
_SEQ_FIRST_AWARE = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention)


class PerSampleFallbackWarning(UserWarning):
    """Some parameters have no per-sample rule and use the slower exact fallback."""


# --------------------------------------------------------------------------- public API


def diagonal_fisher(
    model: nn.Module,
    data: Iterable,
    loss_fn=None,
    kind: str = "empirical",
    max_samples: int | None = None,
    *,
    forward=None,
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
            tensors are moved to the model's device. Batches may differ in size.
        loss_fn: ``loss_fn(outputs, targets) -> [B]`` per-sample losses (``kind="empirical"``
            only). Default: cross-entropy on logits ``outputs [B, C]``, i.e. ``−log p(y|x)``.
        kind: ``"empirical"``, ``"true"`` or ``"exact"`` (see the module docstring);
            ``"true"`` and ``"exact"`` need categorical logits ``[B, C]`` and ignore targets.
        max_samples: use only the first ``max_samples`` samples (the last batch is cut).
        forward: ``forward(model, batch) -> (outputs, targets)`` replacing the default batch
            handling (dict batches, Hugging Face models...); it moves tensors itself.
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
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    return _run(model, data, _FisherObjective(kind, loss_fn, top_k), 2, max_samples, forward, params, verbose, desc)


def mas_importance(
    model: nn.Module,
    data: Iterable,
    max_samples: int | None = None,
    *,
    forward=None,
    params: Iterable[str] | None = None,
    verbose: bool | None = None,
) -> dict[str, torch.Tensor]:
    r"""MAS importance ``Ω[θ] = (1/N) Σ_n |∂‖f(x_n)‖²₂ / ∂θ|`` (Aljundi et al., 2018).

    ``f(x_n)`` is the model output for sample ``n`` (all its output elements). Batches
    need no targets: a bare tensor, ``(inputs,)`` or ``(inputs, targets)`` (targets
    ignored). Other arguments and the result are as in :func:`diagonal_fisher`.
    """
    return _run(model, data, _MASObjective(), 1, max_samples, forward, params, verbose, "MAS")


# --------------------------------------------------------------------------- per-sample losses


def _float_logits(outputs: torch.Tensor) -> torch.Tensor:
    return outputs if outputs.dtype == torch.float64 else outputs.float()


def _check_logits(outputs, kind):
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2 or not outputs.is_floating_point():
        got = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise ValueError(f'kind="{kind}" needs categorical logits outputs of shape [B, C]; got {got}')


def _cross_entropy(outputs, targets, extra):
    if targets is None:
        raise ValueError(
            'the empirical Fisher needs targets: batches must be (inputs, targets), or use kind="true"/"exact"'
        )
    return F.cross_entropy(_float_logits(outputs), targets, reduction="none")


def _sampled_cross_entropy(outputs, targets, labels):
    return F.cross_entropy(_float_logits(outputs), labels, reduction="none")


def _weighted_neg_log_prob(outputs, targets, extra):
    classes, weight = extra
    logp = torch.log_softmax(_float_logits(outputs), dim=-1)
    return -(weight * logp.gather(1, classes.unsqueeze(1)).squeeze(1))


def _squared_output_norm(outputs, targets, extra):
    if not isinstance(outputs, torch.Tensor) or outputs.dim() == 0:
        raise ValueError(f"MAS needs model outputs as a tensor [B, ...], got {type(outputs).__name__}")
    return _float_logits(outputs).reshape(outputs.shape[0], -1).square().sum(1)


class _UserLoss:
    def __init__(self, loss_fn):
        self.loss_fn = loss_fn

    def __call__(self, outputs, targets, extra):
        return self.loss_fn(outputs, targets)


class _FisherObjective:
    def __init__(self, kind, loss_fn, top_k):
        self.kind, self.top_k = kind, top_k
        self.empirical = _cross_entropy if loss_fn is None else _UserLoss(loss_fn)

    def variants(self, outputs, targets) -> list:
        """``[(loss, extra)]``: the per-sample losses whose squared gradients add up."""
        if self.kind == "empirical":
            return [(self.empirical, None)]
        _check_logits(outputs, self.kind)
        probs = torch.softmax(_float_logits(outputs.detach()), dim=-1)
        if self.kind == "true":
            return [(_sampled_cross_entropy, torch.multinomial(probs, 1).squeeze(1))]
        # sqrt(p) weights on the per-sample loss give p · (∂ log p)² once squared
        if self.top_k is None:
            values = probs
            classes = torch.arange(probs.shape[1], device=probs.device).expand_as(probs)
        else:
            values, classes = probs.topk(min(self.top_k, probs.shape[1]), dim=1)
        weights = values.sqrt()
        return [(_weighted_neg_log_prob, (classes[:, j].contiguous(), weights[:, j].contiguous()))
                for j in range(classes.shape[1])]


class _MASObjective:
    def variants(self, outputs, targets) -> list:
        return [(_squared_output_norm, None)]


# --------------------------------------------------------------------------- batches


def _default_batch(batch, device):
    """Normalise a default batch to ``(inputs, targets)`` on ``device``."""
    if isinstance(batch, torch.Tensor):
        inputs, targets = batch, None
    elif isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        inputs, targets = batch[0], (batch[1] if len(batch) == 2 else None)
    else:
        raise TypeError(
            "a batch must be (inputs, targets), (inputs,) or an inputs tensor; got "
            f"{type(batch).__name__}{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}. "
            "Pass forward=lambda model, batch: (outputs, targets) for other batch layouts"
        )
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, list):
        inputs = tuple(inputs)
    elif not isinstance(inputs, (tuple, Mapping)):
        raise TypeError(f"inputs must be a tensor, a tuple of tensors or a dict, got {type(inputs).__name__}")

    def move(t):
        return t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t

    return tree_map(move, inputs), tree_map(move, targets)


def _default_forward(model, batch):
    inputs, targets = batch
    outputs = model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)
    return outputs, targets


def _truncate(batch, keep: int):
    """The first ``keep`` samples: every tensor whose dim 0 equals the batch size is cut."""
    leaves, spec = tree_flatten(batch)
    sizes = [l.shape[0] for l in leaves if isinstance(l, torch.Tensor) and l.dim() >= 1]
    if not sizes or sizes[0] <= keep:
        return batch
    size = sizes[0]
    cut = [l[:keep] if isinstance(l, torch.Tensor) and l.dim() >= 1 and l.shape[0] == size else l for l in leaves]
    return tree_unflatten(cut, spec)


def _check_losses(losses, outputs, batch_index):
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
        got = f"shape {tuple(losses.shape)}" if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return per-sample losses of shape [B] (e.g. reduction='none'), got {got} "
            f"in batch {batch_index}: the Fisher needs each sample's own gradient"
        )
    if isinstance(outputs, torch.Tensor) and outputs.dim() >= 1 and losses.shape[0] != outputs.shape[0]:
        raise ValueError(
            f"loss_fn returned {losses.shape[0]} losses for {outputs.shape[0]} samples in batch {batch_index}; "
            "it must return one loss per sample (shape [B])"
        )
    if not losses.is_floating_point():
        raise ValueError(f"per-sample losses must be floating point, got {losses.dtype} in batch {batch_index}")
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()[:5].tolist()
        raise ValueError(f"non-finite per-sample loss in batch {batch_index} (samples {bad})")


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
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable, got {type(forward).__name__}")
    groups = data_parallel_groups(model)  # before unwrapping: DDP's group lives on the wrapper
    base = unwrap_model(model)
    named = _canonical_parameters(base)
    by_name = dict(named)
    selected = _select(named, params)
    raw_names = {canonical_name(raw): raw for raw, _ in base.named_parameters()}
    device = _model_device(base)
    # full-size accumulators, also for FSDP2 (DTensor) parameters: see _reduce
    acc = {n: torch.zeros(by_name[n].shape, dtype=acc_dtype(by_name[n].dtype), device=by_name[n].device)
           for n in selected}
    sharded = any(is_dtensor(by_name[n]) for n in selected)
    pass_ = _Pass(base, selected, by_name, raw_names, acc, objective, power, forward, device, sharded)

    modes = {m: m.training for m in base.modules()}
    flags = {n: by_name[n].requires_grad for n in selected}
    mha = getattr(getattr(torch.backends, "mha", None), "get_fastpath_enabled", None)
    fastpath = mha() if mha is not None else None
    bar = None
    try:
        base.eval()
        for n in selected:
            by_name[n].requires_grad_(True)
        if fastpath is not None:
            torch.backends.mha.set_fastpath_enabled(False)
        pass_.install()
        iterator = data
        if _show_progress(verbose):
            from tqdm import tqdm

            try:
                total = len(data)
            except TypeError:
                total = None
            bar = iterator = tqdm(data, desc=desc, total=total)
        seen = 0
        for index, batch in enumerate(iterator):
            seen += pass_.batch(index, batch, None if max_samples is None else max_samples - seen)
            if max_samples is not None and seen >= max_samples:
                break  # before fetching (loading) another batch
    except Exception:
        _agree(groups, 0, failed=True)  # the other ranks raise too instead of waiting in _agree forever
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
    seen = _agree(groups, seen)
    if seen == 0:
        raise ValueError("data yielded no samples: the importance needs at least one batch with one sample")
    return _reduce(acc, selected, by_name, seen, groups)


def _agree(groups, seen: int, failed: bool = False) -> int:
    """Total sample count over the data-parallel ranks; raises on every rank if one failed.

    One all-reduce of ``[seen, failed]``. Without ``groups`` (no DDP/FSDP2): ``seen``.
    """
    if not groups:
        return seen
    status = torch.tensor([seen, int(failed)], dtype=torch.int64)
    try:
        status = all_reduce_sum(status.to(collective_device(groups[0])), groups).cpu()
    except Exception:
        if failed:
            return 0  # already raising the original error
        raise
    if not failed and int(status[1]) > 0:
        raise RuntimeError(f"the importance pass failed on {int(status[1])} other rank(s); see their error")
    return int(status[0])


def _reduce(acc, selected, by_name, seen, groups):
    r"""``Σ_ranks acc / seen``; the local shard of it (a DTensor like the parameter) under FSDP2.

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
            out[n] = as_dtensor_like(local_shard(total, p).clone().div_(seen), p)
        else:
            out[n] = total.div_(seen)
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


class _Pass:
    """State of one importance pass: capture, accumulators, fallback bookkeeping."""

    def __init__(self, model, selected, by_name, raw_names, acc, objective, power, forward, device, sharded=False):
        self.model, self.selected, self.by_name = model, selected, by_name
        self.sharded = sharded  # FSDP2: the tracked parameters are DTensors swapped for unsharded ones in forward
        self.acc, self.objective, self.power, self.device = acc, objective, power, device
        self.forward = forward or _default_forward
        self.default_batches = forward is None
        self.capture = Capture({id(by_name[n]): n for n in selected})
        self.runner = Runner(model, self.forward)
        self.runner_path = {n: "model." + raw_names[n] for n in selected}
        self.fallback_state: dict = {}
        self.warned: set[str] = set()
        self.handles = []

    def install(self):
        stack = self.capture.seq_first

        def push(module, args):
            flag = getattr(module, "batch_first", None)
            if flag is None:  # Transformer*Layer keeps it on its attention
                flag = getattr(getattr(module, "self_attn", None), "batch_first", True)
            stack.append(not flag)

        def pop(module, args, output):
            if stack:
                stack.pop()

        for m in self.model.modules():
            if isinstance(m, _SEQ_FIRST_AWARE):
                self.handles.append(m.register_forward_pre_hook(push))
                self.handles.append(m.register_forward_hook(pop))
        if self.sharded:
            self._track_unsharded()

    def _track_unsharded(self):
        """FSDP2: also capture the unsharded parameters the forward actually uses.

        ``fully_shard`` registers DTensor shards as the module parameters and, in the
        pre-forward hook of each FSDP module, swaps in all-gathered unsharded
        ``nn.Parameter`` s (via ``setattr`` on the owning modules), which the ops then
        receive. The capture is keyed by ``id(tensor)``, so forward pre-hooks (which run
        after FSDP's, as FSDP prepends its own) add ``id(current parameter) → name`` for
        the parameters of the module being called, and of the whole subtree for an FSDP
        module (whose group was just unsharded). FSDP keeps one unsharded parameter object
        per parameter, so the map stays small. Memory: that of ordinary FSDP2 forward and
        backward passes (parameters are unsharded group by group, as in training), plus
        the full-size accumulators (see ``_reduce``).
        """
        tracked = self.capture.tracked
        fsdp_types = _fsdp_module_types()
        direct = {}
        for m in self.model.modules():
            entries = [(m, pname, tracked[id(p)]) for pname, p in m._parameters.items()
                       if p is not None and id(p) in tracked]
            if entries:
                direct[m] = entries
        for m in self.model.modules():
            if fsdp_types and isinstance(m, fsdp_types):
                entries = [e for sub in m.modules() for e in direct.get(sub, ())]
            else:
                entries = direct.get(m, [])
            if not entries:
                continue

            def refresh(module, args, entries=entries):
                for owner, pname, name in entries:
                    current = owner._parameters.get(pname)
                    if current is not None:
                        tracked[id(current)] = name

            self.handles.append(m.register_forward_pre_hook(refresh))

    def uninstall(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.capture.on_grad = None
        self.capture.reset()

    def batch(self, index, batch, remaining) -> int:
        """Process one batch; return its number of samples."""
        if self.default_batches:
            batch = _default_batch(batch, self.device)
        if remaining is not None:
            batch = _truncate(batch, remaining)
        capture = self.capture
        capture.reset()
        try:
            with torch.enable_grad(), capture:
                outputs, targets = self.forward(self.model, batch)
                variants = self.objective.variants(outputs, targets)
                losses = [loss(outputs, targets, extra) for loss, extra in variants]
            for value in losses:
                _check_losses(value, outputs, index)
            size = losses[0].shape[0] if losses else 0
            if remaining is not None and size > remaining:
                raise ValueError(
                    f"batch {index} gave {size} per-sample losses after cutting it to {remaining} samples for "
                    "max_samples; cutting cuts every tensor whose dim 0 equals the first tensor's"
                )
            if size == 0:
                return 0
            fallback = self._plan(size)
            if fallback and self.sharded:
                why = "; ".join(f"{n} ({capture.unhandled[n]})" for n in fallback)
                raise NotImplementedError(
                    "fastcl.importance: under FSDP2 (fully_shard) every parameter needs a per-sample rule; the exact "
                    f"fallback does not support sharded parameters. No rule for: {why}"
                )
            reasons = {n: capture.unhandled[n] for n in fallback}
            self._rules(losses, size)
            del outputs, losses
            capture.reset()
            if fallback:
                self._fallback(reasons, batch, size, variants)
        finally:
            capture.on_grad = None
            capture.reset()
        self._check_finite(index)
        return size

    def _plan(self, size) -> list[str]:
        """Decide rule vs fallback per parameter; return the fallback names."""
        capture = self.capture
        for ev in capture.events:
            ev.layout = resolve_layout(ev, size)
            if ev.layout is None:
                for name in ev.slots.values():
                    capture.unhandled.setdefault(
                        name,
                        f"cannot tell which dimension of the {ev.op} input {tuple(ev.x.shape)} indexes the {size} samples",
                    )
        fallback = [n for n in self.selected if n in capture.unhandled]
        excluded = set(fallback)
        self.uses: dict[str, int] = defaultdict(int)
        for ev in capture.events:
            ev.active = tuple(s for s, n in ev.slots.items() if n not in excluded)
            for s in ev.active:
                self.uses[ev.slots[s]] += 1
        return fallback

    def _rules(self, losses, size):
        if not self.uses:
            return
        multi = {n for n, c in self.uses.items() if c > 1}
        # The hooks need only ∂loss/∂output. Differentiating with respect to the parameters
        # makes autograd compute every weight gradient (a third of the backward) just to
        # discard it, but targeting the op outputs holds all output gradients until the
        # call returns. Target whichever set is smaller: the extra memory then never
        # exceeds the parameter gradients an ordinary backward would hold.
        inputs = [self.by_name[n] for n in self.uses]
        active = [ev for ev in self.capture.events if ev.active]
        if active and all(ev.edge is not None for ev in active):
            if sum(ev.out_numel for ev in active) <= sum(p.numel() for p in inputs):
                inputs = [ev.edge for ev in active]
        stash: dict[str, list] = defaultdict(list)
        acc, power = self.acc, self.power

        def on_grad(ev, grad):
            if not ev.active:
                return
            for slot, contribution in contributions(ev, grad, size).items():
                name = ev.slots[slot]
                if name in multi:
                    stash[name].append(contribution)
                else:
                    accumulate([contribution], acc[name], power, size)

        self.capture.on_grad = on_grad
        for k, value in enumerate(losses):
            total = value.sum()
            if not total.requires_grad:
                continue
            stash.clear()
            torch.autograd.grad(total, inputs, retain_graph=k < len(losses) - 1, allow_unused=True)
            for name, items in stash.items():
                accumulate(items, acc[name], power, size)
            stash.clear()
        self.capture.on_grad = None

    def _fallback(self, reasons, batch, size, variants):
        """Exact per-sample gradients for ``reasons`` (``{name: why it has no rule}``)."""
        names = list(reasons)
        new = [n for n in names if n not in self.warned]
        if new:
            self.warned.update(new)
            why = "; ".join(f"{n} ({reasons[n]})" for n in new)
            warnings.warn(
                f"fastcl.importance: no per-sample rule for {len(new)} parameter(s), computing them with the exact "
                f"(slower) per-sample fallback: {why}",
                PerSampleFallbackWarning,
                stacklevel=5,
            )
        params = {self.runner_path[n]: self.by_name[n] for n in names}
        acc = {self.runner_path[n]: self.acc[n] for n in names}
        had_loop = self.fallback_state.get("use_loop", False)
        per_sample_accumulate(self.runner, params, batch, size, variants, acc, self.power, self.fallback_state)
        if self.fallback_state.get("use_loop") and not had_loop:
            warnings.warn(
                "fastcl.importance: torch.func.vmap could not run the model "
                f"({self.fallback_state.get('vmap_error')}); the fallback parameters use a per-sample loop",
                PerSampleFallbackWarning,
                stacklevel=5,
            )

    def _check_finite(self, index):
        by_device = defaultdict(list)
        for n in self.selected:
            by_device[self.acc[n].device].append(n)
        for names in by_device.values():
            # One summing pass per accumulator carries any NaN/inf (isfinite().all() takes
            # four); only a non-finite total pays for the per-parameter search.
            total = torch.stack([self.acc[n].sum() for n in names]).sum()
            if bool(torch.isfinite(total)):
                continue
            ok = torch.stack([torch.isfinite(self.acc[n]).all() for n in names])
            if not bool(ok.all()):
                bad = [n for n, flag in zip(names, ok.tolist()) if not flag]
                raise ValueError(f"non-finite importance after batch {index} for parameter(s) {bad}")
