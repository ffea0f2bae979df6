"""Porting an Avalanche (or tutorial) EWC loop to fastcl: the strength conversion, measured.

Avalanche's ``EWCPlugin(ewc_lambda)`` and most tutorials estimate importance from squared
*mini-batch* gradients, ``I = mean_batches (∂ mean_b ℓ_b / ∂θ)²``, and add
``ewc_lambda · Σ I (θ − θ*)²``. fastcl's Fisher is the per-sample one,
``F = mean_n (∂ℓ_n/∂θ)²``, and its penalty is ``(λ/2) · Σ F (θ − θ*)²``. The mini-batch
mean averages B per-sample gradients whose cross terms nearly cancel after training,
so ``I ≈ F / B`` and the same penalty needs ``strength = 2 · ewc_lambda / B``.

This script (Avalanche itself needs torchvision, so its importance and penalty are
re-implemented here from its documented algorithm, in plain PyTorch):

1. measures ``F / I`` on one trained network for several batch sizes B;
2. trains the same 5 permuted-digits tasks with the Avalanche-style loop at several
   ``ewc_lambda`` and with fastcl at ``strength = 2·ewc_lambda/B``, and prints both
   final average accuracies side by side.

    python examples/port_from_avalanche.py            # 1 thread: ~40 s of CPU (4.3 min wall on 2 busy cores)
    python examples/port_from_avalanche.py --quick    # 2 tasks, 1 epoch: ~12 s of CPU
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import fastcl
from fastcl.scenarios import load_digits, permuted


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))


def avalanche_importance(model, dataset, batch_size: int) -> dict[str, torch.Tensor]:
    """EWCPlugin's importance: mean over mini-batches (unshuffled, last one partial) of squared grads of the mean CE."""
    model.eval()
    imp = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    loader = DataLoader(dataset, batch_size=batch_size)
    for x, y in loader:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                imp[n] += p.grad.detach() ** 2
    model.zero_grad()
    return {n: v / len(loader) for n, v in imp.items()}


class AvalancheEWC:
    """EWCPlugin(ewc_lambda, mode="separate"): ewc_lambda · Σ_experiences Σ I_e (θ − θ*_e)² added to the loss."""

    def __init__(self, model, ewc_lambda: float, batch_size: int):
        self.model, self.ewc_lambda, self.batch_size = model, ewc_lambda, batch_size
        self.saved: list[tuple[dict, dict]] = []

    def penalty(self) -> torch.Tensor:
        total = torch.zeros(())
        for anchors, imp in self.saved:
            for n, p in self.model.named_parameters():
                total = total + (imp[n] * (p - anchors[n]) ** 2).sum()
        return self.ewc_lambda * total

    def after_experience(self, dataset) -> None:
        imp = avalanche_importance(self.model, dataset, self.batch_size)
        self.saved.append(({n: p.detach().clone() for n, p in self.model.named_parameters()}, imp))


@torch.no_grad()
def accuracy(model, dataset) -> float:
    model.eval()
    x, y = dataset.tensors
    return float((model(x).argmax(1) == y).float().mean())


def train(tasks, *, seed, epochs, batch_size, lr, avalanche_lambda=None, fastcl_strength=None):
    """Sequential training on ``tasks``; returns the final average accuracy (None if it diverged)."""
    model = mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    ava = AvalancheEWC(model, avalanche_lambda, batch_size) if avalanche_lambda is not None else None
    ewc = fastcl.EWC(model, strength=fastcl_strength) if fastcl_strength is not None else None
    for t, task in enumerate(tasks):
        model.train()
        for epoch in range(epochs):
            g = torch.Generator().manual_seed(seed * 1000 + t * 10 + epoch)
            for x, y in DataLoader(task.train, batch_size=batch_size, shuffle=True, generator=g):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                if ava is not None:
                    loss = loss + ava.penalty()
                loss.backward()
                if ewc is not None:
                    ewc.add_penalty_grad_()
                opt.step()
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            return None
        if ava is not None:
            ava.after_experience(task.train)
        if ewc is not None:
            ewc.consolidate(DataLoader(task.train, batch_size=256), verbose=False)  # fisher="empirical", like Avalanche
    return sum(accuracy(model, task.test) for task in tasks) / len(tasks)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 tasks, 1 epoch, 2 lambdas")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this small MLP)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_data, test_data = load_digits(seed=args.seed)
    tasks = permuted(train_data, 2 if args.quick else 5, test=test_data, seed=args.seed)
    epochs = 1 if args.quick else 3

    # 1. the batch-size relation, on a network trained on task 0
    model = mlp(args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    for _ in range(epochs):
        for x, y in DataLoader(tasks[0].train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    fisher = fastcl.diagonal_fisher(copy.deepcopy(model), DataLoader(tasks[0].train, batch_size=256), verbose=False)
    total_f = sum(float(v.sum()) for v in fisher.values())
    print("fastcl Fisher / Avalanche importance on the same weights (sums over all parameters):")
    for b in (16, 32, 64, 256):
        imp = avalanche_importance(copy.deepcopy(model), tasks[0].train, b)
        ratio = total_f / sum(float(v.sum()) for v in imp.values())
        print(f"  batch {b:>3}: ratio {ratio:6.1f}  (ratio / B = {ratio / b:.2f})")

    # 2. the same training, Avalanche-style at ewc_lambda and fastcl at 2·ewc_lambda/B
    lambdas = (10.0, 1000.0) if args.quick else (1.0, 10.0, 100.0, 1000.0, 10000.0)
    b = args.batch_size
    print(f"\nfinal average accuracy on {len(tasks)} permuted-digits tasks (batch {b}, SGD lr {args.lr}):")
    print(f"  {'ewc_lambda':>10} {'strength':>9} {'Avalanche-style':>16} {'fastcl':>8} {'difference':>11}")
    for lam in lambdas:
        strength = 2 * lam / b
        ava = train(tasks, seed=args.seed, epochs=epochs, batch_size=b, lr=args.lr, avalanche_lambda=lam)
        fcl = train(tasks, seed=args.seed, epochs=epochs, batch_size=b, lr=args.lr, fastcl_strength=strength)
        show = lambda v: "diverged" if v is None else f"{v:.3f}"  # noqa: E731
        diff = "" if ava is None or fcl is None else f"{fcl - ava:+.3f}"
        print(f"  {lam:>10g} {strength:>9g} {show(ava):>16} {show(fcl):>8} {diff:>11}")
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
