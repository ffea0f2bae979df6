"""Small models for the importance tests (random weights, randomised norm statistics)."""
from __future__ import annotations

import torch
from torch import nn


def randomise_norm_stats(model, generator=None):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.normal_(0, 0.5, generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)
        if getattr(m, "weight", None) is not None and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=generator)
                if m.bias is not None:
                    m.bias.normal_(0, 0.2, generator=generator)
    return model


def mlp(d_in=7, hidden=9, classes=4):
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, classes)
    )


class CNN(nn.Module):
    """Conv2d with stride/padding/groups/dilation/'same', BatchNorm2d (eval), in-place ReLU, pooling."""

    def __init__(self, classes=5):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=(1, 2), groups=2, bias=False)
        self.c3 = nn.Conv2d(6, 4, (2, 3), dilation=(2, 1), padding="same", padding_mode="reflect")
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        x = torch.relu_(self.bn(self.c1(x)))
        x = nn.functional.max_pool2d(self.c2(x), 2)
        x = torch.tanh(self.c3(x))
        return self.head(x.mean((2, 3)))


class Conv1dNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2)
        self.gn = nn.GroupNorm(2, 6)
        self.c2 = nn.Conv1d(6, 6, 3, groups=3, padding="same")
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        x = torch.relu(self.gn(self.c1(x)))
        x = self.bn(self.c2(x))
        return self.head(x.mean(2))


class Conv3dNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.c = nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=1, dilation=(1, 1, 2))
        self.fc = nn.Linear(3, classes)

    def forward(self, x):
        return self.fc(torch.tanh(self.c(x)).mean((2, 3, 4)))


class TinyTransformer(nn.Module):
    """Embedding (padding_idx) + TransformerEncoderLayer + RMS/LayerNorm + mean pooling + head."""

    def __init__(self, vocab=13, d=16, classes=4, batch_first=True, norm_first=False):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.layer = nn.TransformerEncoderLayer(
            d, nhead=2, dim_feedforward=24, dropout=0.1, batch_first=batch_first, norm_first=norm_first
        )
        self.norm = nn.RMSNorm(d) if hasattr(nn, "RMSNorm") else nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):  # ids [B, S]
        h = self.emb(ids)
        if not self.batch_first:
            h = self.layer(h.transpose(0, 1)).transpose(0, 1)
        else:
            h = self.layer(h)
        return self.head(self.norm(h).mean(1))


class Recurrent(nn.Module):
    def __init__(self, cell="gru", classes=3):
        super().__init__()
        self.rnn = {"gru": nn.GRU, "rnn": nn.RNN, "lstm": nn.LSTM}[cell](4, 5, batch_first=True)
        self.head = nn.Linear(5, classes)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TiedLM(nn.Module):
    """Embedding shared with the output head, a Linear called twice, a directly used parameter."""

    def __init__(self, vocab=11, d=6, direct=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.scale = nn.Parameter(torch.rand(d) + 0.5) if direct else None

    def forward(self, ids):
        h = self.emb(ids).mean(1)
        h = torch.tanh(self.mix(torch.tanh(self.mix(h))))
        if self.scale is not None:
            h = h * self.scale.exp()  # exp of a parameter has no per-sample rule: the fallback
        return self.head(h)


# --------------------------------------------------------------------------- sample-dimension collisions


class PositionTable(nn.Module):
    """Tokens plus a learned position table, ``nn.Embedding(arange(T))`` or an ``nn.Parameter [T, d]``."""

    def __init__(self, vocab=11, steps=6, d=8, classes=3, parameter=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.parameter = parameter
        if parameter:
            self.pos = nn.Parameter(torch.randn(steps, d) * 0.5)
        else:
            self.pos = nn.Embedding(steps, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):  # ids [B, T]
        steps = ids.shape[-1]
        pos = self.pos[:steps] if self.parameter else self.pos(torch.arange(steps, device=ids.device))
        return self.head(torch.tanh(self.ln(self.tok(ids) + pos)).mean(-2))


class SharedTable(nn.Module):
    """A ``[T, d]`` buffer shared by all samples, fed to a Linear and added to the batch."""

    def __init__(self, steps=6, d=5, classes=3):
        super().__init__()
        self.register_buffer("table", torch.randn(steps, d))
        self.inp = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x [B, T, d]
        return self.head(torch.tanh(self.inp(x) + self.proj(self.table)).mean(-2))


class Prototypes(nn.Module):
    """A parameter passed through a layer: ``features @ proj(prototypes)ᵀ`` (as many rows as classes)."""

    def __init__(self, rows=6, d_in=4, d=5):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(rows, d))
        self.proj = nn.Linear(d, d)
        self.enc = nn.Linear(d_in, d)

    def forward(self, x):  # x [B, d_in]
        return torch.tanh(self.enc(x)) @ self.proj(self.prototypes).t()


class SequenceFirst(nn.Module):
    """Custom code that works on ``[T, B, F]``: transpose, Linear, bias parameter, LayerNorm, mean over T."""

    def __init__(self, d=5, classes=3):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.bias = nn.Parameter(torch.randn(d) * 0.3)
        self.ln = nn.LayerNorm(d)
        self.b = nn.Linear(d, classes)

    def forward(self, x):  # x [B, T, d]
        h = self.a(x.transpose(0, 1)) + self.bias  # [T, B, d]
        return self.b(torch.tanh(self.ln(h)).mean(0))


def tiny_gpt2(vocab=40, d=16, layers=2, positions=16):
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab, n_embd=d, n_layer=layers, n_head=2, n_positions=positions,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def tiny_llama(vocab=40, d=16, layers=1):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config)
