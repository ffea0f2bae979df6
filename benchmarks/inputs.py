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
    "ARCHITECTURES",
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


class PositionTransformer(nn.Module):
    """Token embedding + learned positions (``nn.Embedding(arange(T))`` or an ``nn.Parameter [T, d]``),
    the blocks of :class:`TinyTransformer`, mean-pooled into a classifier. Input: ``[B, T]`` token ids."""

    def __init__(self, vocab: int = 1000, steps: int = 32, d_model: int = 64, heads: int = 4, layers: int = 2,
                 classes: int = 10, parameter: bool = False):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.parameter = parameter
        self.pos = nn.Parameter(torch.randn(steps, d_model) * 0.02) if parameter else nn.Embedding(steps, d_model)
        self.blocks = nn.Sequential(*[_Block(d_model, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, ids):
        steps = ids.shape[1]
        pos = self.pos[:steps] if self.parameter else self.pos(torch.arange(steps, device=ids.device))
        return self.head(self.norm(self.blocks(self.tok(ids) + pos)).mean(1))


class CausalLMLogits(nn.Module):
    """A Hugging Face causal LM returning its logits ``[B, T, V]`` for ``input_ids [B, T]``."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits


def gpt2_shaped(vocab: int = 2000, d_model: int = 128, layers: int = 2, heads: int = 4, positions: int = 64) -> nn.Module:
    """A small GPT-2 (``transformers.GPT2LMHeadModel``, random weights, no download) behind :class:`CausalLMLogits`."""
    import transformers

    config = transformers.GPT2Config(vocab_size=vocab, n_embd=d_model, n_layer=layers, n_head=heads, n_positions=positions,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return CausalLMLogits(transformers.GPT2LMHeadModel(config))


ARCHITECTURES = ("mlp", "cnn", "transformer", "transformer_emb", "transformer_param", "gpt2")
SEQ_LEN = 32
VOCAB = {"transformer_emb": 1000, "transformer_param": 1000, "gpt2": 2000}


def make_model(arch: str, device, seed: int = 0, *, quick: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    if arch == "mlp":
        model = mlp()
    elif arch == "cnn":
        model = small_cnn(8 if quick else 16)
    elif arch == "transformer":
        model = TinyTransformer(d_model=32 if quick else 64, layers=1 if quick else 2)
    elif arch in ("transformer_emb", "transformer_param"):
        model = PositionTransformer(d_model=32 if quick else 64, layers=1 if quick else 2, parameter=arch == "transformer_param")
    elif arch == "gpt2":
        model = gpt2_shaped(d_model=32 if quick else 128, layers=1 if quick else 2)
    else:
        raise ValueError(f"model architecture must be one of {ARCHITECTURES}, got {arch!r}")
    return model.to(device).eval()


def make_batches(arch: str, n: int, batch: int, device, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` labelled samples shaped for model ``arch``, split into batches of ``batch``.

    Token models get ids ``[n, SEQ_LEN]``; the causal LM (``gpt2``) gets its ids as targets too
    (sequences of ``SEQ_LEN`` tokens: a batch of 32 has batch size = sequence length).
    """
    g = torch.Generator().manual_seed(seed)
    if arch in VOCAB:
        x = torch.randint(0, VOCAB[arch], (n, SEQ_LEN), generator=g).to(device)
        y = x if arch == "gpt2" else torch.randint(0, 10, (n,), generator=g).to(device)
    else:
        shape = {"mlp": (784,), "cnn": (1, 28, 28), "transformer": (SEQ_LEN, 32)}[arch]
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
