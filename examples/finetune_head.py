"""Seed example 1, done with fastcl: retrain only the head on new classes.

Train an MLP on digits 0-4, then freeze everything but the last layer and train on 5-9.
The frozen feature extractor keeps what it learned; the head adapts. One thread, about
10 s of CPU time including imports (38 s wall measured on 2 cores shared with other jobs).
"""
import torch
import torch.nn.functional as F

import fastcl
from fastcl.scenarios import load_digits, split


def train(model, dataset, classes, epochs=30, lr=0.01):
    params = fastcl.trainable_parameters(model)
    opt = torch.optim.Adam(params, lr=lr)
    x, y = dataset.tensors
    cols = torch.tensor(classes)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            logits = model(x[idx])[:, cols]  # task-incremental: this task's classes only
            F.cross_entropy(logits, torch.searchsorted(cols, y[idx])).backward()
            opt.step()


@torch.no_grad()
def accuracy(model, dataset, classes):
    x, y = dataset.tensors
    cols = torch.tensor(classes)
    return (cols[model(x)[:, cols].argmax(1)] == y).float().mean().item()


def main():
    torch.set_num_threads(1)  # a small MLP: one thread is fastest (intra-op threads cost more than they bring)
    torch.manual_seed(0)
    train_data, test_data = load_digits()
    old, new = split(train_data, classes_per_task=5, test=test_data)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    train(model, old.train, old.classes)
    print(f"after task A: accuracy on A {accuracy(model, old.test, old.classes):.3f}")

    fastcl.freeze(model)                     # all parameters ...
    changed = fastcl.unfreeze(model, "2.*")  # ... except the head
    print(f"trainable now: {changed}")
    train(model, new.train, new.classes)
    print(f"after task B: accuracy on A {accuracy(model, old.test, old.classes):.3f}, on B {accuracy(model, new.test, new.classes):.3f}")


if __name__ == "__main__":
    main()
