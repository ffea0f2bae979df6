"""One EWC training epoch: plain training, what users run instead, and fastcl's EWC.

Rows per case (``cases.E2E``, one per model kind), timed interleaved (one epoch of each per
round, see ``harness.timing.measure_interleaved``): each entry of :data:`BASELINES`, then for
each penalty backend one row per way the penalty's gradient reaches ``.grad`` (:data:`MODES`):
``fastcl[<backend>]`` (``EWC.add_penalty_grad_()`` after ``backward()``),
``fastcl[<backend>] penalty()`` (the differentiable ``EWC.penalty()`` in the loss) and
``fastcl[<backend>] attach`` (``EWC.attach(optimizer)``: the same fused pass in the
optimizer's step pre-hook, the loop unchanged; its row shows the hook's bookkeeping).
**Add a baseline**: write its epoch in ``baselines.py``, add one entry to :data:`BASELINES`.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import baselines as bl
import torch
import torch.nn.functional as F
from cases import ModelCase, cases
from harness.record import Config, Recorder, available_backends, forced, free
from inputs import make_batches, make_model

import fastcl

OP = "e2e"
FASTCL_OP = "penalty"
LAMBDA = 100.0

# name -> epoch(model, batches, optimizer, anchors, fisher): one training epoch.
BASELINES: dict[str, Callable] = {
    "plain": lambda m, batches, opt, anchors, fisher: bl.plain_epoch(m, batches, opt),
    "autograd_loop_ewc": lambda m, batches, opt, anchors, fisher: bl.ewc_autograd_loop_epoch(m, batches, opt, anchors, fisher, LAMBDA),
}
# how the penalty enters fastcl's epoch -> (the row's impl suffix, its note)
MODES = {
    "add_penalty_grad_": ("", "EWC.add_penalty_grad_()"),
    "penalty": (" penalty()", "differentiable EWC.penalty()"),
    "attach": (" attach", "EWC.attach(optimizer): the fused pass in the step pre-hook"),
}


@dataclass
class Inputs:
    """The model (train mode), its batches, and a random Fisher and anchors for the baseline EWC."""

    model: torch.nn.Module
    batches: list
    anchors: dict
    fisher: dict

    def fresh(self):
        """A copy of the model and an SGD optimizer over it."""
        m = copy.deepcopy(self.model)
        return m, torch.optim.SGD(m.parameters(), lr=1e-3)

    def baseline_epoch(self, name: str) -> Callable[[], None]:
        m, opt = self.fresh()
        return lambda: BASELINES[name](m, self.batches, opt, self.anchors, self.fisher)

    def fastcl_epochs(self) -> dict[str, Callable[[], None]]:
        """A consolidated ``fastcl.EWC`` on a fresh copy, and its epoch in each of :data:`MODES`.

        ``add_penalty_grad_`` and ``penalty`` train the same copy in turn; ``attach`` trains a
        second copy with the same EWC state whose optimizer stays attached (an attached
        regularizer leaves the gradient to the hook, so it cannot share the first copy)."""
        m, opt = self.fresh()
        ewc = fastcl.EWC(m, LAMBDA)
        ewc.consolidate(self.batches, verbose=False)
        epochs = {mode: (lambda mode=mode: fastcl_epoch(m, self.batches, opt, ewc, mode)) for mode in MODES if mode != "attach"}
        m2, opt2 = self.fresh()
        attached = fastcl.EWC(m2, LAMBDA)
        attached.load_state_dict(ewc.state_dict())
        attached.attach(opt2)
        epochs["attach"] = lambda: fastcl_epoch(m2, self.batches, opt2, attached, "attach")
        return epochs


def fastcl_epoch(model, batches, optimizer, ewc, mode: str) -> None:
    """One epoch with the penalty's gradient added the :data:`MODES` way ``mode``
    (``attach``: a plain loop; ``ewc`` is attached to ``optimizer``)."""
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        if mode == "penalty":
            (F.cross_entropy(model(x), y) + ewc.penalty()).backward()
        else:
            F.cross_entropy(model(x), y).backward()
            if mode == "add_penalty_grad_":
                ewc.add_penalty_grad_()
        optimizer.step()


def make_inputs(case: ModelCase, device, *, quick: bool = False) -> Inputs:
    model = make_model(case.label, device, quick=quick).train()
    batches = make_batches(case.label, case.samples, case.batch, device, seed=1)
    g = torch.Generator().manual_seed(5)
    fisher = {k: torch.rand(p.shape, generator=g).to(device) for k, p in model.named_parameters()}
    anchors = {k: p.detach().clone() for k, p in model.named_parameters()}
    return Inputs(model, batches, anchors, fisher)


# ---------------------------------------------------------------------------- run.py


def bench(cfg: Config, rec: Recorder) -> None:
    for case in cases(OP, cfg.size):
        _bench_case(cfg, rec, case)
        free(cfg.device)


def _bench_case(cfg: Config, rec: Recorder, case: ModelCase) -> None:
    label = case.label
    inp = make_inputs(case, cfg.device, quick=cfg.quick)
    size = sum(p.numel() for p in inp.model.parameters())
    impls = {name: inp.baseline_epoch(name) for name in BASELINES}
    notes: dict[str, str] = {}
    for b in available_backends(cfg.device, FASTCL_OP, torch.float32, on_skip=lambda b, why: rec.skip(OP, f"fastcl[{b}]", label, why)):
        try:
            # consolidated with the default backends: only the penalty's backend is forced below
            epochs = inp.fastcl_epochs()
        except Exception as exc:  # noqa: BLE001 - a broken consolidate is a skipped row
            rec.skip(OP, f"fastcl[{b}]", label, f"EWC.consolidate failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        for mode, (suffix, note) in MODES.items():
            impls[f"fastcl[{b}]{suffix}"] = forced(b, epochs[mode])
            notes[f"fastcl[{b}]{suffix}"] = note
    rec.measure_group(OP, label, size, impls, notes=notes)
