"""What users run today, re-implemented faithfully so that fastcl is timed against it.

Every function names, in its docstring, the library or code base whose algorithm it
reproduces. None of them is fastcl code: they use only ``torch`` (and, where noted,
optional third-party libraries that are imported lazily and may be missing).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# ===================================================================== anchored penalty


def autograd_loop_penalty(params, anchors, weights, lam: float) -> torch.Tensor:
    """EWC penalty as Avalanche's ``EWCPlugin.before_backward`` (and most EWC code) writes it:
    a Python loop over the parameters accumulating ``(F·(θ−θ*)²).sum()``, scaled by λ/2 and
    differentiated by autograd. (Avalanche scales by λ, not λ/2; the cost is identical and
    λ/2 keeps the value equal to fastcl's ``scale=λ``.) Returns the value; call
    ``.backward()`` to add the gradient into ``p.grad``."""
    total = 0.0
    for p, a, w in zip(params, anchors, weights):
        total = total + (w * (p - a).pow(2)).sum()
    return total * (lam / 2)


def autograd_loop_step(params, anchors, weights, lam: float) -> torch.Tensor:
    """Value and gradient (accumulated into ``p.grad``) with the autograd loop."""
    value = autograd_loop_penalty(params, anchors, weights, lam)
    value.backward()
    return value.detach()


def foreach_penalty(params, anchors, weights, grads, lam: float) -> torch.Tensor:
    """Best hand-written PyTorch formulation without autograd, using the multi-tensor
    ``torch._foreach_*`` kernels that ``torch.optim``'s ``foreach=True`` optimizers use:
    ``d = θ−a``; ``wd = w·d``; ``grad += λ·wd``; ``value = λ/2·Σ‖wd·d‖₁``. The last step
    uses ``_foreach_norm(·, 1)``, which is the sum because ``w·d² ≥ 0`` (``w ≥ 0``)."""
    with torch.no_grad():
        params = [p.detach() for p in params]
        d = torch._foreach_sub(params, anchors)
        wd = torch._foreach_mul(d, weights)
        torch._foreach_add_(grads, wd, alpha=lam)
        torch._foreach_mul_(wd, d)
        norms = torch._foreach_norm(wd, 1)
        return torch.stack(norms).float().sum() * (lam / 2)


def compiled_loop_penalty(lam: float) -> Callable:
    """``torch.compile`` applied to :func:`autograd_loop_penalty` (the "just compile it"
    answer); the gradient still comes from ``.backward()`` on the compiled graph."""
    def loop(params, anchors, weights):
        return autograd_loop_penalty(params, anchors, weights, lam)

    compiled = torch.compile(loop, dynamic=False)

    def step(params, anchors, weights):
        value = compiled(params, anchors, weights)
        value.backward()
        return value.detach()

    return step


def copy_same_bytes(n_bytes: int, device, dtype=torch.float32) -> Callable[[], object]:
    """The bandwidth limit: ``dst.copy_(src)`` moving ``n_bytes`` in total (half read,
    half written), the same traffic as reading θ, a, w, grad and writing grad."""
    elt = torch.tensor([], dtype=dtype).element_size()
    n = max(1, n_bytes // (2 * elt))
    src = torch.ones(n, dtype=dtype, device=device)
    dst = torch.empty(n, dtype=dtype, device=device)
    return lambda: dst.copy_(src)


# ========================================================================= Fisher


def _zero_like_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters() if p.requires_grad}


def fisher_per_sample_loop(model: nn.Module, batches, loss_fn=F.cross_entropy) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher by one backward pass per sample (batch size 1), as in the
    original EWC code bases (e.g. ``estimate_fisher`` in G. van de Ven's
    ``continual-learning`` repository, ``moskomule/ewc.pytorch``):
    ``F = mean_i (∂ℓ(x_i, y_i)/∂θ)²``."""
    fisher = _zero_like_params(model)
    n = 0
    for x, y in batches:
        for i in range(x.shape[0]):
            model.zero_grad(set_to_none=True)
            loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
            for name, p in model.named_parameters():
                if p.grad is not None:
                    fisher[name] += p.grad.detach().float().pow(2)
            n += 1
    for f in fisher.values():
        f /= max(n, 1)
    return fisher


def fisher_vmap(model: nn.Module, batches, loss_fn=F.cross_entropy) -> dict[str, torch.Tensor]:
    """Per-sample gradients with ``torch.func.vmap(grad(...))`` over ``functional_call``
    (the PyTorch "per-sample gradients" tutorial / Opacus' functorch path), squared,
    summed, divided by the sample count. Materialises ``[B, *θ.shape]`` per batch."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_one(prm, x, y):
        out = functional_call(model, (prm, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    fisher = _zero_like_params(model)
    n = 0
    for x, y in batches:
        g = per_sample(params, x, y)
        for name, gi in g.items():
            fisher[name] += gi.float().pow(2).sum(0)
        n += x.shape[0]
    for f in fisher.values():
        f /= max(n, 1)
    return fisher


def fisher_squared_minibatch(model: nn.Module, batches, loss_fn=F.cross_entropy) -> dict[str, torch.Tensor]:
    """**Not the Fisher** (fast but wrong): the square of each mini-batch's mean gradient,
    averaged over batches, as Avalanche's ``EWCPlugin.compute_importances`` does. It
    estimates ``E[g]²/B``-like quantities, not ``E[g²]``; timed only because it is common."""
    fisher = _zero_like_params(model)
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float().pow(2)
    for f in fisher.values():
        f /= max(len(batches), 1)
    return fisher


def plain_forward_backward(model: nn.Module, batches, loss_fn=F.cross_entropy) -> None:
    """One ordinary training-style pass (mean loss, backward) over the same data: the
    yardstick for what a Fisher pass costs in time and memory."""
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()


def _cross_entropy_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def fisher_backpack_factory(model: nn.Module, loss_sum=_cross_entropy_sum) -> Callable | None:
    """BackPACK's ``SumGradSquared`` extension (Dangel et al.), if ``backpack`` is importable:
    ``Σ_i g_i²`` per parameter from one extended backward pass of ``loss_sum`` (the sum of the
    per-sample losses), divided by the sample count. A model with a layer BackPACK has no
    extension for leaves parameters without ``sum_grad_squared``: that raises, and the row is
    skipped with the reason."""
    try:
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared
    except Exception:
        return None
    ext_model = extend(model)

    def run(batches):
        fisher = _zero_like_params(ext_model)
        n = 0
        for x, y in batches:
            ext_model.zero_grad(set_to_none=True)
            with backpack(SumGradSquared()):
                loss_sum(ext_model(x), y).backward()
            for name, p in ext_model.named_parameters():
                if not hasattr(p, "sum_grad_squared"):
                    raise RuntimeError(f"BackPACK computed no sum_grad_squared for {name} (no extension for its layer)")
                fisher[name] += p.sum_grad_squared.float()
            n += x.shape[0]
        for f in fisher.values():
            f /= max(n, 1)
        return fisher

    return run


def fisher_opacus_factory(model: nn.Module, loss_sum=_cross_entropy_sum) -> Callable | None:
    """Opacus' ``GradSampleModule`` (per-sample gradients via module hooks), if importable:
    ``p.grad_sample`` of ``loss_sum`` (the sum of the per-sample losses), squared and averaged.
    Constructing it raises for a layer Opacus has no grad sampler for (the row is skipped).
    Opacus records activations in training mode only: the module is put in training mode, which
    changes nothing for models without dropout or batch norm (the benchmark's)."""
    try:
        from opacus import GradSampleModule
    except Exception:
        return None
    gsm = GradSampleModule(model, loss_reduction="sum").train()

    def run(batches):
        fisher = _zero_like_params(model)
        n = 0
        for x, y in batches:
            gsm.zero_grad(set_to_none=True)
            loss_sum(gsm(x), y).backward()
            for name, p in model.named_parameters():
                fisher[name] += p.grad_sample.float().pow(2).sum(0)
                p.grad_sample = None
            n += x.shape[0]
        for f in fisher.values():
            f /= max(n, 1)
        return fisher

    return run


# ===================================================================== distillation


def kl_div_distill(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KD loss as written in most code (torchdistill, HF examples, LwF repos):
    ``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True, reduction="batchmean")·T²``
    on ``[R, V]`` logits."""
    T = temperature
    return F.kl_div(F.log_softmax(student / T, dim=-1), F.log_softmax(teacher / T, dim=-1), log_target=True, reduction="batchmean") * (T * T)


def chunked_kl_div_distill_backward(student: torch.Tensor, teacher: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
    """Memory-conscious PyTorch: the same loss over ``chunk`` rows at a time, each chunk's
    backward run immediately (gradients accumulate into ``student.grad``), so only one
    chunk's intermediates live at once. Returns the (detached) total loss."""
    R = student.shape[0]
    total = torch.zeros((), device=student.device, dtype=torch.float32)
    T = temperature
    for start in range(0, R, chunk):
        s = student[start:start + chunk]
        t = teacher[start:start + chunk]
        loss = F.kl_div(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1), log_target=True, reduction="sum") * (T * T / R)
        loss.backward()
        total += loss.detach().float()
    return total


def liger_kl_div_factory() -> Callable | None:
    """Liger-Kernel's Triton ``LigerKLDIVLoss`` (batchmean, log-target), GPU only, if importable."""
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except Exception:
        return None
    loss_mod = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def run(student, teacher, temperature):
        T = temperature
        return loss_mod(F.log_softmax(student / T, dim=-1), F.log_softmax(teacher / T, dim=-1)) * (T * T)

    return run


def liger_jsd_factory() -> Callable | None:
    """Liger-Kernel's ``LigerJSD`` (a different divergence, β=0.5; listed for cost only), GPU only."""
    try:
        from liger_kernel.transformers import LigerJSD
    except Exception:
        return None
    loss_mod = LigerJSD()

    def run(student, teacher, temperature):
        T = temperature
        return loss_mod(F.log_softmax(student.float() / T, dim=-1), F.log_softmax(teacher.float() / T, dim=-1))

    return run


def unfused_linear_distill(hidden, weight, teacher_hidden, teacher_weight, temperature: float) -> torch.Tensor:
    """The unfused LM-head distillation everyone writes: full student logits ``h Wᵀ`` and
    teacher logits ``h_t W_tᵀ`` (no grad), then :func:`kl_div_distill`."""
    with torch.no_grad():
        t = teacher_hidden @ teacher_weight.t()
    return kl_div_distill(hidden @ weight.t(), t, temperature)


# ========================================================================= training


def ewc_autograd_loop_epoch(model, batches, optimizer, anchors: dict, fisher: dict, lam: float) -> None:
    """One EWC training epoch as Avalanche's ``EWCPlugin`` runs it: task loss plus the
    autograd-loop penalty over ``named_parameters()``, one backward, one optimizer step."""
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        penalty = 0.0
        for name, p in model.named_parameters():
            penalty = penalty + (fisher[name] * (p - anchors[name]).pow(2)).sum()
        (loss + penalty * (lam / 2)).backward()
        optimizer.step()


def plain_epoch(model, batches, optimizer) -> None:
    """One ordinary training epoch (no regulariser): the floor for any EWC epoch."""
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def rel_err(a: dict, b: dict) -> float:
    """``max |a−b| / max |b|`` over all entries of two ``{name: tensor}`` dicts."""
    num = max(float((a[k].float() - b[k].float()).abs().max()) for k in b)
    den = max(float(b[k].float().abs().max()) for k in b)
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)
