"""The single-process float64 oracle of the scenario in ``_workers``, on ALL the data.

Importance from per-sample gradient loops (batch size 1, ``torch.autograd.grad``); the
penalty and its gradient from the separate-task formula
``(λ/2) Σ_t Σ F_t (θ − θ*_t)²`` (not from fastcl's merged O(P) state); the training
gradient as DDP/FSDP2 average it: the mean over ranks of each rank's mean cross-entropy
gradient, plus the penalty gradient. A single-process ``fastcl.EWC`` on all the data is
computed too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastcl
from fastcl._names import named_parameters

from ..importance.reference import cross_entropy_loss, per_sample_importance, split
from ._workers import STRENGTH, TASK_SIZES, make_model, move_, rank_share, task


def _snapshot(model):
    return {n: p.detach().clone() for n, p in named_parameters(model).items()}


def reference() -> dict:
    model = make_model()
    (x1, y1), (x2, y2), train = task(1), task(2), task(3)
    out = {"mas": per_sample_importance(model, split(x1), lambda m, x: m(x).square().sum(), power=1)}
    single = fastcl.EWC(model, STRENGTH)
    f1, a1 = per_sample_importance(model, split(x1, y1), cross_entropy_loss), _snapshot(model)
    single.consolidate([(x1, y1)])
    move_(model, 1)
    f2, a2 = per_sample_importance(model, split(x2, y2), cross_entropy_loss), _snapshot(model)
    single.consolidate([(x2, y2)])
    move_(model, 2)
    theta = _snapshot(model)
    initial = _snapshot(make_model())
    out["l2sp"] = sum(float((0.5 * STRENGTH * (theta[n] - initial[n]).square()).sum()) for n in theta)
    out["fisher1"] = f1
    out["fisher_sum"] = {n: f1[n] + f2[n] for n in f1}
    out["anchor_mean"] = {
        n: torch.where(out["fisher_sum"][n] > 0, (f1[n] * a1[n] + f2[n] * a2[n]) / out["fisher_sum"][n], a2[n]) for n in f1
    }
    out["penalty"] = sum(
        float((0.5 * STRENGTH * f[n] * (theta[n] - a[n]).square()).sum()) for f, a in ((f1, a1), (f2, a2)) for n in f
    )
    penalty_grad = {n: STRENGTH * (f1[n] * (theta[n] - a1[n]) + f2[n] * (theta[n] - a2[n])) for n in f1}
    params = named_parameters(model)
    ce_grad = {n: torch.zeros_like(p) for n, p in params.items()}
    for rank in range(len(TASK_SIZES)):
        x, y = rank_share(train, rank)
        for n, g in zip(params, torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))):
            ce_grad[n] += g / len(TASK_SIZES)
    out["grad"] = {n: ce_grad[n] + penalty_grad[n] for n in params}
    out["single_process_penalty"] = single.penalty().item()
    out["single_process_fisher"] = {n: t.clone() for n, t in single.fisher.items()}
    return out
