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
