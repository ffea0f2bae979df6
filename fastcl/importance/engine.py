r"""The per-batch decisions of an importance pass: rule or fallback, and the backward that feeds the rules.

For one batch, :meth:`ImportancePass.batch`

1. runs the forward and the per-sample losses under a :class:`~.capture.Capture` and a
   :class:`~.provenance.Tracer` (the batch tensors whose dim 0 has the batch size ``B``
   are the seeds; a batch of one sample needs no tracer: everything is that sample). A
   batch whose forward repeats, call for call, one already traced (same functions, arguments,
   shapes and tags) replays that record without the tracer (:mod:`.recording`), and reuses its
   plan (step 3);
2. *proves* the per-sample structure: every loss vector must be tagged
   ``Batched(0, B)``, i.e. entry ``b`` depends on sample ``b`` only. Otherwise every
   parameter takes the fallback, with the reason;
3. decides per parameter: a rule covers it when every use is a :class:`~.capture.Use` with
   a provable input, or reaches the batch through a :class:`~.capture.Boundary`; anything
   ``unprovable`` (and anything whose per-sample buffers would exceed the memory budget)
   goes to the exact per-sample fallback (:mod:`.fallback`), with a one-time warning;
4. runs one ordinary backward per loss variant. Batched uses hand ``(x, g)`` to their rule
   from their autograd Function; boundaries turn ``∂L/∂Z`` into each shared input's
   per-sample gradient ``G_s[b] = ∂ℓ_b/∂s``: in closed form for ``x ± s`` and ``x * s``
   with ``s`` broadcast over the samples, otherwise exactly by re-running the call with
   ``∂L/∂Z`` masked to one sample at a time (a batched vector-Jacobian product, in chunks).
   ``G_s`` goes to the parameter it is (a dense per-sample gradient), or to the shared
   uses it came from (pulled back through the shared ops with a batched backward), whose
   rules run after the backward with their per-sample output gradients;
5. sums the contributions of each parameter per sample before raising them to the
   power (:func:`~.contributions.accumulate`).

Why ``∂L/∂Z`` masked to sample ``b`` is ``∂ℓ_b/∂Z``: ``L = Σ_b ℓ_b``, the model runs in eval
mode and ``Z``'s sample slice ``b`` influences ``ℓ_b`` only (that is what the tags prove).
"""
from __future__ import annotations

import warnings
import weakref
from collections import defaultdict

import torch
from torch.utils._pytree import tree_flatten

from .._dtypes import acc_dtype
from ..distributed import is_dtensor
from .batches import default_batch, truncate
from .capture import Capture, rebuild
from .contributions import Dense, Factored, Sparse, accumulate, assign, coalesce, rows_of, sparse_correction
from .fallback import Runner, per_sample_accumulate
from .objectives import check_losses
from .provenance import Batched, Tracer, Unknown, per_sample
from .recording import Diverged, Player, Recorder, batch_key
from .rules.embedding import EmbeddingRule

__all__ = ["ImportancePass", "PerSampleFallbackWarning"]


class _ModelRaised(Exception):
    """``forward(model, batch)`` raised ``original`` (a RuntimeError); :meth:`ImportancePass.batch` names the batch."""

    def __init__(self, original: RuntimeError):
        super().__init__(str(original))
        self.original = original

# Per-sample buffers of shared inputs and directly used parameters, [B, numel] each: above
# this, the parameter takes the fallback (which bounds its memory by chunking samples).
DENSE_LIMIT_BYTES = 256 * 2**20
_VJP_CHUNK_BYTES = 64 * 2**20
_MAX_DIVERGENCES = 2  # replays of one batch shape that left their record before that shape is always traced


class _Records:
    """A model's replay records (:mod:`.recording`) and the plans of their batches, for its next passes."""

    def __init__(self):
        self.scripts: dict = {}  # batch_key -> Script | None (insertion order: oldest first)
        self.divergences: dict = defaultdict(int)
        self.plans: dict = {}  # id(script) -> (script, selected parameters, the plan of its batches)


_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MAX_SCRIPTS = 16  # batch shapes remembered per model (the oldest record is dropped)


class PerSampleFallbackWarning(UserWarning):
    """Some parameters have no per-sample rule and use the slower exact fallback."""


class _Failed(Exception):
    pass


class _Modes:
    """Enter the capture (function mode) and the tracer (dispatch mode) together."""

    def __init__(self, modes):
        self.modes = modes

    def __enter__(self):
        for m in self.modes:
            m.__enter__()

    def __exit__(self, *exc):
        for m in reversed(self.modes):
            m.__exit__(*exc)


def _names(dep, uses_by_key) -> list[str]:
    """Parameter names behind one dep: a name itself, or the parameters of a shared use."""
    if isinstance(dep, str):
        return [dep]
    use = uses_by_key.get(dep[1])
    return list(use.slots.values()) if use is not None else []


class ImportancePass:
    """State of one importance pass (all batches): accumulators, fallback bookkeeping, hooks."""

    def __init__(self, model, selected, by_name, raw_names, acc, objective, power, forward, default_batches, device):
        self.model, self.selected, self.by_name = model, selected, by_name
        self.acc, self.objective, self.power, self.device = acc, objective, power, device
        self.forward = forward
        self.default_batches = default_batches
        self.tracked = {id(by_name[n]): n for n in selected}
        self.objects = {n: by_name[n] for n in selected}  # the tensors the forward uses (FSDP2 swaps them)
        self.constants = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
        self.runner = None  # the fallback's functional model, made when a parameter first needs it
        self.runner_path = {n: "model." + raw_names[n] for n in selected}
        self.fallback_state: dict = {}
        self.warned: set[str] = set()
        self.handles = []
        self.replay = True  # off under FSDP2 (see install)
        records = _RECORDS.get(model)
        if records is None:
            records = _RECORDS[model] = _Records()
        # batch_key -> replay.Script (None: trace every batch of that key), kept with the model
        # across passes: a replay checks every call against the record whatever pass made it
        self.scripts, self.divergences, self.plans = records.scripts, records.divergences, records.plans
        self.script = None  # the record the current batch replays (or just recorded)
        self.selection = tuple(selected)
        self.capture = Capture(self.tracked, self._on_use_grad, self._on_boundary)
        self._reset()

    def _reset(self):
        self.capture.begin(None)
        self.live = False  # a backward of this batch is feeding the rules
        self.active: dict[int, tuple] = {}
        self.immediate: set[str] = set()
        self.fallback: set[str] = set()
        self.stash: dict[str, list] = defaultdict(list)
        self.buffers: dict[int, torch.Tensor] = {}
        self.uses_by_key: dict = {}
        self.failed: dict[str, str] = {}
        self.tied: dict[str, list] = {}  # parameter -> its embedding uses, when a linear use shares it
        self.tied_rows: dict[str, tuple] = {}
        self.size = 0

    # ------------------------------------------------------------------ install

    def install(self, sharded: bool, fsdp_types: tuple) -> None:
        self.replay = not sharded
        if sharded:
            self._track_unsharded(fsdp_types)

    def _track_unsharded(self, fsdp_types):
        """FSDP2: also capture the unsharded parameters the forward actually uses.

        ``fully_shard`` registers DTensor shards as the module parameters and, in the
        pre-forward hook of each FSDP module, swaps in all-gathered unsharded
        ``nn.Parameter`` s, which the ops then receive. The capture is keyed by
        ``id(tensor)``, so forward pre-hooks (which run after FSDP's, as FSDP prepends its
        own) add ``id(current parameter) → name`` for the parameters of the module being
        called, and of the whole subtree for an FSDP module (whose group was just unsharded).
        """
        tracked = self.tracked
        direct = {}
        for m in self.model.modules():
            entries = [(m, pname, tracked[id(p)]) for pname, p in m._parameters.items() if p is not None and id(p) in tracked]
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
                        self.objects[name] = current
                        self.constants.add(id(current))

            self.handles.append(m.register_forward_pre_hook(refresh))

    def uninstall(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._reset()

    # ------------------------------------------------------------------ one batch

    def batch(self, index, batch, remaining) -> tuple[int, int]:
        """Process one batch; return ``(samples, counted samples)``."""
        if self.default_batches:
            batch = default_batch(batch, self.device)
        if remaining is not None:
            batch = truncate(batch, remaining)
        leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor) and t.dim() >= 1]
        seed = leaves[0].shape[0] if leaves else None
        tracer = None
        try:
            try:
                tracer, outputs, targets, variants, losses = self._forward(batch, leaves, seed)
            except _ModelRaised as raised:
                error = raised.original
                where = "the first batch" if index == 0 else f"batch {index} (counting from 0)"
                raise ValueError(
                    f"data: the model's forward failed on {where}; do the batches match the model's inputs "
                    f"(shape, dtype, device)? {type(error).__name__}: {error}"
                ) from error
            for value in losses:
                check_losses(value, outputs, index)
            size = losses[0].shape[0] if losses else 0
            if remaining is not None and size > remaining:
                raise ValueError(
                    f"batch {index} gave {size} per-sample losses after cutting it to {remaining} samples for "
                    "max_samples; cutting cuts every tensor whose dim 0 equals the first tensor's"
                )
            counted = self.objective.counted(outputs, targets, size)
            del outputs  # the backward needs only the graph: a plain backward would not hold them either
            if size == 0:
                return 0, 0
            self.size = size
            reasons = self._plan(losses, tracer, seed, size)
            if self.fallback and any(is_dtensor(self.by_name[n]) for n in self.fallback):
                why = "; ".join(f"{n} ({reasons[n]})" for n in sorted(self.fallback))
                raise NotImplementedError(
                    "fastcl.importance: under FSDP2 (fully_shard) every parameter needs a per-sample rule; the exact "
                    f"fallback does not support sharded parameters. No rule for: {why}"
                )
            if len(self.fallback) < len(self.selected):
                self.live = True
                self._rules(losses)
            reasons.update(self.failed)
            fallback = [n for n in self.selected if n in self.fallback or n in self.failed]
            del losses
            self.live = False
            self.capture.begin(None)
            if fallback:
                self._fallback({n: reasons[n] for n in fallback}, batch, size, variants)
        finally:
            if tracer is not None:
                tracer.release()
            self._reset()
        return size, counted

    def _forward(self, batch, leaves, seed) -> tuple:
        """The forward and the per-sample losses under the capture: ``(tracer, outputs, targets, variants, losses)``.

        A batch of one sample needs no tracer (everything is that sample). Otherwise the tracer
        tags the batch's tensors, or, when an earlier batch of the same shapes left a record, the
        record is replayed without it (:mod:`.recording`); a replay that diverges is traced again.
        """
        self.script = None
        if seed in (None, 1):
            return (None, *self._phases(batch, None, None))
        key = (self.selection, batch_key(leaves)) if self.replay else None  # tags name the selected parameters
        script = self.scripts.get(key) if key is not None else None
        if script is not None:
            tracer = self._tracer(leaves, seed)
            player = Player(script, tracer)
            try:
                result = self._phases(batch, tracer, player)
                if not player.diverged:
                    self.script = script
                    return (tracer, *result)
            except Diverged:
                pass
            except BaseException:
                tracer.release()
                raise
            tracer.release()
            self._reset()
            self.divergences[key] += 1
            del self.scripts[key]
            if self.divergences[key] >= _MAX_DIVERGENCES:
                self.scripts[key] = None  # this forward does not repeat itself: trace every batch
        tracer = self._tracer(leaves, seed)
        recorder = Recorder(tracer) if key is not None and key not in self.scripts else None
        try:
            result = self._phases(batch, tracer, recorder)
        except BaseException:
            tracer.release()
            raise
        if recorder is not None:
            self.scripts[key] = self.script = recorder.script()
            while len(self.scripts) > _MAX_SCRIPTS:
                old = next(iter(self.scripts))
                dropped = self.scripts.pop(old)
                self.divergences.pop(old, None)
                if dropped is not None:
                    self.plans.pop(id(dropped), None)
        return (tracer, *result)

    def _tracer(self, leaves, seed) -> Tracer:
        tracer = Tracer(self.tracked, self.constants)
        for t in leaves:
            if t.shape[0] == seed:
                tracer.seed(t, Batched(0, seed, 1))
        return tracer

    def _phases(self, batch, tracer, steps) -> tuple:
        """Run the forward, check the outputs, run the losses: ``(outputs, targets, variants, losses)``."""
        self._reset()
        capture = self.capture
        capture.begin(tracer, steps)
        modes = (capture, tracer) if tracer is not None and not isinstance(steps, Player) else (capture,)
        with torch.enable_grad(), _Modes(modes):
            try:
                outputs, targets = self.forward(self.model, batch)
            except RuntimeError as error:
                raise _ModelRaised(error) from error
            outputs = self.objective.outputs(outputs)
            if steps is not None:
                steps.end_phase()
        self.objective.check(outputs, targets)  # outside the modes: its tensor queries would all be intercepted
        with torch.enable_grad(), _Modes(modes):
            variants = self.objective.variants(outputs, targets)
            losses = [loss(outputs, targets, extra) for loss, extra in variants]
            if steps is not None:
                steps.end_phase()
        return outputs, targets, variants, losses

    def check_finite(self, batches: int, scale: int | None = None) -> bool:
        """Raise, naming the parameters, if an importance is not finite (one pass over each).

        ``scale``: the sample count, when the caller divides by it next. For float32 accumulators
        on one device the pass divides too (one fused ``x · (1/scale)`` per element, within an ulp of
        ``x / scale``); returns whether it did.
        """
        tensors = [self.acc[n] for n in self.selected]
        if (scale is not None and all(t.dtype == torch.float32 for t in tensors)
                and len({t.device for t in tensors}) == 1):
            found = torch.zeros(1, device=tensors[0].device)
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.full((1,), 1.0 / scale, device=found.device))
            if bool(found):
                self._find_non_finite(batches)  # raises, naming them
            return True
        self._find_non_finite(batches)
        return False

    def _find_non_finite(self, batches: int) -> None:
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
                raise ValueError(f"non-finite importance after {batches} batch(es) for parameter(s) {bad}")

    # ------------------------------------------------------------------ plan

    def _plan(self, losses, tracer, seed, size) -> dict[str, str]:
        capture = self.capture
        self.uses_by_key = {u.key: u for u in capture.uses}
        script = self.script
        cached = self.plans.get(id(script)) if script is not None else None
        if cached is not None and cached[0] is script and cached[1] == self.selected:
            # A replayed batch: the records, tags and sizes the plan derives from are the recorded ones.
            _, _, reasons, self.fallback, self.active, self.immediate, tied = cached
            self.tied = {n: [self.uses_by_key[k] for k in keys] for n, keys in tied.items()}
            return dict(reasons)
        reasons = self._decide(losses, tracer, seed, size)
        if script is not None:
            self.plans[id(script)] = (script, list(self.selected), dict(reasons), self.fallback, self.active, self.immediate,
                                      {n: [u.key for u in uses] for n, uses in self.tied.items()})
        return reasons

    def _decide(self, losses, tracer, seed, size) -> dict[str, str]:
        capture = self.capture
        reasons: dict[str, str] = {}
        if tracer is None:
            if size != 1:
                why = f"the loss has {size} entries for a batch whose tensors have {seed} rows"
                reasons = {n: why for n in self.selected}
        else:
            for value in losses:
                tag = tracer.tag(value)
                if size != seed or tag != Batched(0, size, 1):
                    why = tag.why if isinstance(tag, Unknown) else (
                        f"the per-sample losses are not provably one per sample of the batch ({tag}, batch size {seed})")
                    reasons = {n: f"the per-sample structure of the loss cannot be proven: {why}" for n in self.selected}
                    break
        if not reasons:
            for dep, why in capture.unprovable.items():
                for name in _names(dep, self.uses_by_key):
                    reasons.setdefault(name, why)
            self._guard_memory(reasons, size)
        self.fallback = {n for n in self.selected if n in reasons}
        sources: dict[str, int] = defaultdict(int)
        batched_only = defaultdict(lambda: True)
        for use in capture.uses:
            active = tuple(s for s, n in use.slots.items() if n not in self.fallback)
            self.active[use.key] = active
            for s in active:
                sources[use.slots[s]] += 1
                if use.x_tag is not None and not isinstance(use.x_tag, Batched):
                    batched_only[use.slots[s]] = False
        for b in capture.boundaries:
            for deps in b.deps:
                for dep in deps:
                    if isinstance(dep, str):
                        sources[dep] += 2  # always stashed
        if tracer is None:
            self.immediate = set()  # one sample: plain gradients join the rules' contributions
        else:
            self.immediate = {n for n, c in sources.items() if c == 1 and batched_only[n]}
            self._find_tied(sources)
        return reasons

    def _find_tied(self, sources) -> None:
        """Parameters used by one batched linear map and batched embeddings only (a tied LM head)."""
        if not any(isinstance(u.rule, EmbeddingRule) for u in self.capture.uses):
            return
        uses = defaultdict(list)
        for use in self.capture.uses:
            for slot in self.active.get(use.key, ()):
                uses[use.slots[slot]].append((use, slot))
        for name, found in uses.items():
            embeddings = [u for u, _ in found if isinstance(u.rule, EmbeddingRule)]
            others = [(u, s) for u, s in found if not isinstance(u.rule, EmbeddingRule)]
            if (embeddings and len(others) == 1 and others[0][1] == "weight" and sources[name] == len(found)
                    and all(isinstance(u.x_tag, Batched) for u, _ in found)
                    and type(others[0][0].rule).__name__ in ("LinearRule", "MatmulRule")):
                self.tied[name] = embeddings

    def _guard_memory(self, reasons, size) -> None:
        """Dense per-sample buffers above :data:`DENSE_LIMIT_BYTES` send their parameters to the fallback."""
        for use in self.capture.uses:
            if use.out is not None:
                nbytes = size * use.out.numel() * 4
                if nbytes > DENSE_LIMIT_BYTES:
                    for name in use.slots.values():
                        reasons.setdefault(name, f"its per-sample output gradients would need {nbytes / 2**20:.0f} MiB")
        for b in self.capture.boundaries:
            for src, deps in zip(b.sources, b.deps):
                for dep in deps:
                    if isinstance(dep, str):
                        numel = max(src.numel(), self.objects[dep].numel())
                        nbytes = size * numel * 4
                        if nbytes > DENSE_LIMIT_BYTES:
                            reasons.setdefault(dep, f"its per-sample gradients would need {nbytes / 2**20:.0f} MiB")

    # ------------------------------------------------------------------ backward

    def _rules(self, losses):
        covered = [n for n in self.selected if n not in self.fallback]
        inputs = [self.objects[n] for n in covered]
        snapshot = {}
        if len(losses) > 1:  # a later variant may fail after earlier ones accumulated: keep what to restore
            fragile = {n for b in self.capture.boundaries for deps in b.deps for dep in deps
                       for n in _names(dep, self.uses_by_key)}
            snapshot = {n: self.acc[n].clone() for n in covered if n in fragile}
        single = self.capture.tracer is None
        for k, value in enumerate(losses):
            total = value.sum()
            if not total.requires_grad:
                continue
            self.stash.clear()
            self.buffers.clear()
            grads = torch.autograd.grad(total, inputs, retain_graph=k < len(losses) - 1, allow_unused=True)
            if single:  # the plain gradient of every non-rule path is the one sample's gradient
                for n, g in zip(covered, grads):
                    if g is not None:
                        self._collect(n, Dense(g.detach().reshape(1, -1).to(self.acc[n].dtype)))
            del grads
            self._shared_uses()
            for name, items in self.stash.items():
                if name in self.failed:
                    continue
                if name in self.tied_rows:
                    self._finish_tied(name, items)
                else:
                    self._accumulate(name, items)
            self.stash.clear()
            self.buffers.clear()
            self.tied_rows.clear()
        for name in self.failed:
            if name in snapshot:
                self.acc[name].copy_(snapshot[name])

    def _accumulate(self, name, items) -> None:
        """``acc[name] += Σ_b |Σ_items ∇ℓ_b|^p``; the first write into an accumulator assigns (no zero-fill)."""
        out, fresh = self.acc.take_fresh(name)
        if fresh and assign(items, out, self.power):
            return
        if fresh:
            out.zero_()
        accumulate(items, out, self.power)

    def _collect(self, name, contribution) -> None:
        if name in self.fallback or name in self.failed:
            return
        if isinstance(contribution, torch.Tensor):
            contribution = Dense(contribution.reshape(contribution.shape[0], -1).to(self.acc[name].dtype))
        if name in self.immediate:
            self._accumulate(name, [contribution])
        elif name in self.tied and type(contribution) is Factored and not self.stash.get(name):
            self._fold_tied(name, contribution)
        else:
            self.stash[name].append(contribution)

    def _fold_tied(self, name, factored) -> None:
        """A tied head's per-sample gradient ``A_b``: add ``Σ_b |A_b|^p`` now and keep ``A_b`` only at the
        rows the sample's tokens touch, so the head's output gradient is not held until the embedding's
        contribution arrives (see :func:`~.contributions.rows_of`)."""
        acc = self.acc[name]
        pairs = [use.rule.touched(use.call, per_sample(use.call.x, use.x_tag)) for use in self.tied[name]]
        if len(pairs) == 1:
            sample, row = pairs[0]
        else:
            num_rows = acc.shape[0]
            key = torch.unique(torch.cat([s * num_rows + r for s, r in pairs]))
            sample, row = key // num_rows, key % num_rows
        accumulate([factored], acc, self.power)
        self.tied_rows[name] = (sample, row, rows_of([factored], sample, row, acc.dtype))

    def _finish_tied(self, name, items) -> None:
        sample, row, a_rows = self.tied_rows[name]
        if not all(isinstance(c, Sparse) for c in items):
            raise AssertionError(f"internal error: unexpected contributions for the tied parameter {name}")
        sp = items[0] if len(items) == 1 else coalesce(torch.cat([c.sample for c in items]), torch.cat([c.row for c in items]),
                                                       torch.cat([c.values for c in items]), items[0].num_rows)
        if not (torch.equal(sp.sample, sample) and torch.equal(sp.row, row)):
            raise AssertionError(f"internal error: the embedding rows of {name} changed between forward and backward")
        sparse_correction(self.acc[name], row, a_rows, sp.values, self.power)

    def _on_use_grad(self, use, call, saved, g) -> None:
        """From a batched use's backward: per-sample views of ``x`` and ``g`` to the rule."""
        active = self.active.get(use.key)
        if not active or not self.live:
            return
        tag = use.x_tag
        if tag is None:
            x, gg, saved = call.x.unsqueeze(0), g.unsqueeze(0), tuple(s.unsqueeze(0) for s in saved)
        else:
            x, gg, saved = per_sample(call.x, tag), per_sample(g, tag), tuple(per_sample(s, tag) for s in saved)
        for slot, c in use.rule.contributions(call, x, gg, saved, active).items():
            self._collect(use.slots[slot], c)

    def _shared_uses(self) -> None:
        """Shared uses, after the backward: their rules with the per-sample output gradients found at the boundaries."""
        size = self.size
        for use in self.capture.uses:
            if use.out is None:
                continue
            active = self.active.get(use.key)
            buffer = self.buffers.get(use.key)
            if not active or buffer is None:
                continue
            x = use.call.x.unsqueeze(0).expand(size, *use.call.x.shape)
            saved = tuple(s.unsqueeze(0).expand(size, *s.shape) for s in use.saved)
            for slot, c in use.rule.contributions(use.call, x, buffer, saved, active).items():
                self._collect(use.slots[slot], c)

    # ------------------------------------------------------------------ boundaries

    def _on_boundary(self, b, grad) -> None:
        if not self.live:
            return
        names = {n for deps in b.deps for dep in deps for n in _names(dep, self.uses_by_key)}
        if not names or names <= (self.fallback | set(self.failed)):
            return
        try:
            for j, per in enumerate(self._cotangents(b, grad.detach())):
                if per is not None:
                    self._route(b.sources[j], b.deps[j], per)
        except Exception as exc:  # exact but unsupported here (vmap gap, a later in-place change): the fallback
            why = str(exc) if isinstance(exc, _Failed) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            for n in names:
                self.failed.setdefault(n, f"its per-sample gradient could not be followed through {b.func} ({why})")

    def _cotangents(self, b, grad) -> list:
        """``[G_s]``, ``G_s[b] = ∂ℓ_b/∂s`` ``[B, *s.shape]``, for each shared input ``s`` of the boundary."""
        for leaf, version in zip(b.leaves, b.versions):
            if isinstance(leaf, torch.Tensor) and version is not None and leaf._version != version:
                raise _Failed("an input was modified in place after the call")
        if b.op == "add":
            return [_sum_to(grad * b.scale if b.scale != 1 else grad, b.z_tag, b.sources[0].shape)]
        if b.op == "mul":
            return [_sum_to(grad * b.other, b.z_tag, b.sources[0].shape)]
        return self._vjp(b, grad)

    def _vjp(self, b, grad) -> list:
        """Re-run the call and differentiate it with ``∂L/∂Z`` masked to each sample (chunks of samples)."""
        size, tag = self.size, b.z_tag
        positions = torch.arange(grad.shape[tag.dim], device=grad.device)
        owner = (positions // tag.inner) % tag.n
        view = [1] * grad.dim()
        view[tag.dim] = -1
        owner = owner.view(view)
        chunk = max(1, min(size, _VJP_CHUNK_BYTES // max(grad.numel() * grad.element_size(), 1)))
        parts: list[list] = [[] for _ in b.shared]
        for start in range(0, size, chunk):
            stop = min(size, start + chunk)
            ids = torch.arange(start, stop, device=grad.device).view(-1, *[1] * grad.dim())
            masked = grad.unsqueeze(0) * (owner.unsqueeze(0) == ids).to(grad.dtype)
            inputs = {i: b.leaves[i].detach().requires_grad_() for i in b.shared}
            replace = dict(inputs)
            if isinstance(b.z_index, str):
                mutated = int(b.z_index.split(":")[1])
                replace[mutated] = b.leaves[mutated].clone()
            args, kwargs = rebuild(b, replace)
            with torch.enable_grad():
                out = b.func(*args, **kwargs)
                if isinstance(b.z_index, str):
                    z = replace[int(b.z_index.split(":")[1])]
                elif b.z_index is None:
                    z = out
                else:
                    z = out[b.z_index]
                if z.shape != grad.shape:
                    raise _Failed(f"re-running the call gave shape {tuple(z.shape)}, not {tuple(grad.shape)}")
                srcs = [inputs[i] for i in b.shared]
                try:
                    got = torch.autograd.grad(z, srcs, masked, is_grads_batched=True, allow_unused=True)
                except Exception:  # no batching rule: one sample at a time
                    got = [[] for _ in srcs]
                    for j in range(stop - start):
                        one = torch.autograd.grad(z, srcs, masked[j], retain_graph=True, allow_unused=True)
                        for k, g in enumerate(one):
                            got[k].append(torch.zeros_like(srcs[k]) if g is None else g)
                    got = [torch.stack(g) for g in got]
            for k, (g, s) in enumerate(zip(got, srcs)):
                parts[k].append(torch.zeros((stop - start, *s.shape), dtype=s.dtype, device=s.device) if g is None else g)
        return [torch.cat(p) for p in parts]

    def _route(self, source, deps, per) -> None:
        """Hand ``G_s`` to the parameters and shared uses ``s`` carries (pulled back through shared ops)."""
        targets = []
        for dep in deps:
            if isinstance(dep, str):
                if dep in self.fallback or dep in self.failed:
                    continue
                targets.append((self.objects[dep], dep))
            else:
                use = self.uses_by_key.get(dep[1])
                if use is not None and self.active.get(use.key):
                    targets.append((use.out, dep[1]))
        if not targets:
            return
        if len(targets) == 1 and targets[0][0] is source:
            grads = [per]
        else:
            tensors = [t for t, _ in targets]
            per = per.to(source.dtype)
            try:
                grads = torch.autograd.grad(source, tensors, per, is_grads_batched=True, retain_graph=True, allow_unused=True)
            except Exception:  # no batching rule for some shared op: one sample at a time
                rows = [torch.autograd.grad(source, tensors, per[i], retain_graph=True, allow_unused=True) for i in range(per.shape[0])]
                grads = [None if all(r[k] is None for r in rows) else torch.stack(
                    [torch.zeros_like(tensors[k]) if r[k] is None else r[k] for r in rows]) for k in range(len(tensors))]
        for (tensor, key), g in zip(targets, grads):
            if g is None:
                continue
            if isinstance(key, str):
                self._collect(key, Dense(g.detach().reshape(g.shape[0], -1).to(self.acc[key].dtype)))
            else:
                acc = acc_dtype(g.dtype)
                if key in self.buffers:
                    self.buffers[key] += g.detach().to(acc)
                else:
                    self.buffers[key] = g.detach().to(acc)

    # ------------------------------------------------------------------ fallback

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
                stacklevel=6,
            )
        params = {self.runner_path[n]: self.by_name[n] for n in names}
        acc = {self.runner_path[n]: self.acc[n] for n in names}
        had_loop = self.fallback_state.get("use_loop", False)
        if self.runner is None:
            self.runner = Runner(self.model, self.forward)
        per_sample_accumulate(self.runner, params, batch, size, variants, acc, self.power, self.fallback_state,
                              self.objective.output_fn)
        if self.fallback_state.get("use_loop") and not had_loop:
            warnings.warn(
                "fastcl.importance: torch.func.vmap could not run the model "
                f"({self.fallback_state.get('vmap_error')}); the fallback parameters use a per-sample loop",
                PerSampleFallbackWarning,
                stacklevel=6,
            )


def _sum_to(grad, tag: Batched, shape) -> torch.Tensor:
    """``[B, *shape]``: per sample, ``grad`` summed over the dims along which ``shape`` was broadcast."""
    per = per_sample(grad, tag)  # [B, *z.shape with the sample dim reduced]
    zs = per.shape[1:]
    target = [1] * (len(zs) - len(shape)) + list(shape)
    dims = [i + 1 for i, (a, t) in enumerate(zip(zs, target)) if t == 1 and a != 1]
    if dims:
        per = per.sum(dims, keepdim=True)
    return per.reshape(per.shape[0], *shape).to(acc_dtype(grad.dtype))
