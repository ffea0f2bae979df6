"""Inputs for the benchmarks: parameter lists, models, logits and synthetic data.

Everything is built from a seeded generator so that two runs (and the pytest suites)
time the same thing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "PenaltySet",
    "param_shapes",
    "make_penalty_set",
    "penalty_bytes",
    "mlp",
    "small_cnn",
    "TinyTransformer",
    "make_model",
    "make_batches",
    "MODEL_KINDS",
    "make_logits",
    "make_lm_head",
]


def param_shapes(n_tensors: int, total: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Shapes of a network-like parameter list: weight matrices of log-uniform sizes
    alternating with their bias vectors, ``n_tensors`` tensors summing to about ``total``."""
    if n_tensors < 2:
        return [(total,)]
    g = torch.Generator().manual_seed(seed)
    n_mat = (n_tensors + 1) // 2
    rel = torch.exp(torch.rand(n_mat, generator=g, dtype=torch.float64) * math.log(64.0))
    targets = (rel / rel.sum() * total).tolist()
    shapes: list[tuple[int, ...]] = []
    for t in targets:
        rows = max(1, int(math.sqrt(t) / 2))
        cols = max(1, int(round(t / rows)))
        shapes.append((rows, cols))
        if len(shapes) < n_tensors:
            shapes.append((rows,))
    return shapes[:n_tensors]


@dataclass
class PenaltySet:
    """θ (leaves with ``.grad`` already present, as after ``loss.backward()``), anchors a,
    importances w, and ``grads``: the list of those ``.grad`` tensors (updated in place)."""

    params: list[torch.Tensor]
    anchors: list[torch.Tensor]
    weights: list[torch.Tensor]
    grads: list[torch.Tensor]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def make_penalty_set(shapes, dtype: torch.dtype, device, seed: int = 0) -> PenaltySet:
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)  # generate in place: the GPU case is 1B parameters

    def randn(shape, scale=1.0):
        return torch.randn(shape, generator=g, device=device).mul_(scale)

    params, anchors, weights = [], [], []
    for shape in shapes:
        a = randn(shape).to(dtype)
        p = (a.float() + randn(shape, 0.01)).to(dtype).requires_grad_(True)
        p.grad = randn(shape, 0.001).to(dtype)
        params.append(p)
        anchors.append(a)
        weights.append(torch.rand(shape, generator=g, device=device).to(dtype))
    return PenaltySet(params, anchors, weights, [p.grad for p in params])


def penalty_bytes(numel: int, dtype: torch.dtype) -> int:
    """Minimal traffic of value + gradient: read θ, a, w, grad and write grad (5 arrays)."""
    return 5 * numel * torch.tensor([], dtype=dtype).element_size()


# ---------------------------------------------------------------------------- models

def mlp(hidden: int = 400, depth: int = 2, d_in: int = 784, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    width = d_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def small_cnn(channels: int = 16, classes: int = 10) -> nn.Module:
    """Two 3×3 conv blocks and a linear head on 1×28×28 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * channels * 7 * 7, classes),
    )


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // self.heads), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Pre-norm encoder whose weights all live in ``nn.Linear`` / ``nn.LayerNorm`` layers
    applied over a sequence (so per-sample gradients sum over ``T`` positions), mean-pooled
    into a classifier. Input: ``[B, T, d_in]`` float features."""

    def __init__(self, d_in: int = 32, d_model: int = 64, heads: int = 4, layers: int = 2, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(d_in, d_model)
        self.blocks = nn.Sequential(*[_Block(d_model, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.inp(x))).mean(1))


MODEL_KINDS = ("mlp", "cnn", "transformer")
SEQ_LEN = 32


def make_model(kind: str, device, seed: int = 0, *, quick: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        model = mlp()
    elif kind == "cnn":
        model = small_cnn(8 if quick else 16)
    elif kind == "transformer":
        model = TinyTransformer(d_model=32 if quick else 64, layers=1 if quick else 2)
    else:
        raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
    return model.to(device).eval()


def make_batches(kind: str, n: int, batch: int, device, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` labelled samples shaped for model ``kind``, split into batches of ``batch``."""
    g = torch.Generator().manual_seed(seed)
    shape = {"mlp": (784,), "cnn": (1, 28, 28), "transformer": (SEQ_LEN, 32)}[kind]
    x = torch.randn((n, *shape), generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]



# ---------------------------------------------------------------------------- logits


def make_logits(rows: int, vocab: int, dtype: torch.dtype, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Student logits (a leaf that requires grad) and teacher logits, both ``3·N(0, 1)``, ``[rows, vocab]``."""
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(rows, vocab, generator=g)).to(device=device, dtype=dtype).requires_grad_(True)
    t = (3 * torch.randn(rows, vocab, generator=g)).to(device=device, dtype=dtype)
    return s, t


def make_lm_head(rows: int, vocab: int, hidden: int, dtype: torch.dtype, device, seed: int = 0):
    """``(h, W, h_t, W_t)``: student hidden states and LM-head weight (leaves that require grad),
    teacher hidden states and weight; weights scaled by ``1/√hidden``."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    W = (torch.randn(vocab, hidden, generator=g) / math.sqrt(hidden)).to(device=device, dtype=dtype).requires_grad_(True)
    ht = torch.randn(rows, hidden, generator=g).to(device=device, dtype=dtype)
    Wt = (torch.randn(vocab, hidden, generator=g) / math.sqrt(hidden)).to(device=device, dtype=dtype)
    return h, W, ht, Wt
