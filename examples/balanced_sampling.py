"""Seed example 3, done with fastcl: retraining on imbalanced new data.

The new data has 10x more of some classes than others. A class-balanced sampler (or
class weights in the loss) keeps the rare classes from being ignored; the example prints
the worst per-class recall with and without it. One thread, about 15 s of CPU time
including imports (43 s wall measured on 2 cores shared with other jobs).
"""
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fastcl
from fastcl.scenarios import load_digits


def make_imbalanced(x, y, rare=(0, 1, 2, 3, 4), keep=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep_mask = torch.ones(len(y), dtype=torch.bool)
    for c in rare:
        idx = torch.nonzero(y == c).flatten()
        drop = idx[torch.randperm(len(idx), generator=g)[int(keep * len(idx)):]]
        keep_mask[drop] = False
    return x[keep_mask], y[keep_mask]


def train(loader, class_weight=None, epochs=15):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y, weight=class_weight).backward()
            opt.step()
    return model


@torch.no_grad()
def worst_recall(model, x, y):
    pred = model(x).argmax(1)
    return min((pred[y == c] == c).float().mean().item() for c in range(10))


def main():
    torch.set_num_threads(1)  # a small MLP: one thread is fastest (intra-op threads cost more than they bring)
    (x, y), (x_test, y_test) = load_digits()
    x, y = make_imbalanced(x, y)
    print(f"class counts: {fastcl.class_counts(y).tolist()}")
    data = TensorDataset(x, y)
    runs = {
        "shuffled": DataLoader(data, batch_size=32, shuffle=True),
        "balanced sampler": DataLoader(data, batch_size=32, sampler=fastcl.balanced_sampler(y)),
    }
    for name, loader in runs.items():
        print(f"{name:>18}: worst per-class recall {worst_recall(train(loader), x_test, y_test):.3f}")
    weights = fastcl.class_weights(y, num_classes=10)
    model = train(runs["shuffled"], class_weight=weights)
    print(f"{'class weights':>18}: worst per-class recall {worst_recall(model, x_test, y_test):.3f}")


if __name__ == "__main__":
    main()
