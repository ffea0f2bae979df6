"""Seed example 2, done right: EWC with a real diagonal Fisher.

The seed's sketch used a Fisher of all ones and compared each parameter with itself (so
its penalty was always 0). Here the Fisher is the mean of squared per-sample gradients,
the anchors are the weights after task A, and task B is a pixel permutation of task A.
One thread, about 15 s of CPU time including imports (58 s wall measured on 2 cores
shared with other jobs).
"""
import copy

import torch
import torch.nn.functional as F

import fastcl
from fastcl.scenarios import load_digits, permuted


def train(model, dataset, epochs, reg=None, lr=0.01):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = dataset.tensors
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if reg is not None:
                loss = loss + reg.penalty()  # exactly 0 until the first consolidate()
            loss.backward()
            opt.step()


@torch.no_grad()
def accuracy(model, dataset):
    x, y = dataset.tensors
    return (model(x).argmax(1) == y).float().mean().item()


def main():
    torch.set_num_threads(1)  # a small MLP: one thread is fastest (intra-op threads cost more than they bring)
    torch.manual_seed(0)
    train_data, test_data = load_digits()
    task_a, task_b = permuted(train_data, num_tasks=2, test=test_data, seed=1)
    base = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    train(base, task_a.train, epochs=20)
    print(f"after A: accuracy on A {accuracy(base, task_a.test):.3f}")

    loader = torch.utils.data.DataLoader(task_a.train, batch_size=128)
    for name, make in [("fine-tuning", lambda m: None), ("EWC", lambda m: fastcl.EWC(m, strength=100.0))]:
        model = copy.deepcopy(base)
        reg = make(model)
        if reg is not None:
            reg.consolidate(loader, verbose=False)
            f = reg.fisher["0.weight"]
            print(f"Fisher of layer 0: mean {f.mean():.2e}, max {f.max():.2e}, zeros {(f == 0).float().mean():.0%}")
        train(model, task_b.train, epochs=20, reg=reg)
        print(f"{name:>12}: after B, accuracy on A {accuracy(model, task_a.test):.3f}, on B {accuracy(model, task_b.test):.3f}")


if __name__ == "__main__":
    main()
