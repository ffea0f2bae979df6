r"""``F.conv1d/2d/3d``: ``y = W ⋆ x + b`` with ``x [N, C, *spatial]``, ``W [O, C/G, *K]``.

Per sample (``x[b]``: the sample's images, ``[M, C, *spatial]``): ``∇W ℓ_b`` is the weight
gradient of a convolution of those images alone. All of them come from one grouped
convolution per chunk of samples, the images as groups (:class:`~..contributions.ConvGrads`,
the cost of a plain weight gradient), and ``∇b ℓ_b = Σ g[b]`` over images and positions.
Samples must be on dim 0 (merged with other axes is fine: each image belongs to one
sample). Padding modes other than zeros pad the input in ``nn.Conv*d`` before the call, so
the rule sees the padded input; asymmetric ``padding="same"`` pads it here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._dtypes import acc_dtype
from ..contributions import ConvGrads, Dense
from .base import Call, Rule, arg, ntuple


def conv_pads(padding, kernel, dilation) -> list[int]:
    """``F.pad`` argument (last dim first) reproducing the convolution's zero padding."""
    nd = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            left = right = [0] * nd
        elif padding == "same":
            total = [dilation[i] * (kernel[i] - 1) for i in range(nd)]
            left = [t // 2 for t in total]
            right = [t - lo for t, lo in zip(total, left)]
        else:
            raise ValueError(f"unknown convolution padding {padding!r}")
    else:
        left = right = list(padding)
    pads = []
    for i in reversed(range(nd)):
        pads += [left[i], right[i]]
    return pads


class ConvRule(Rule):
    functions = (F.conv1d, F.conv2d, F.conv3d)
    has_forward = True
    _CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    def parse(self, args, kwargs):
        x = arg(args, kwargs, 0, "input")
        w, b = arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
        if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or w.dim() < 3:
            return None
        nd = w.dim() - 2
        kernel = tuple(w.shape[2:])
        dilation = ntuple(arg(args, kwargs, 5, "dilation", 1), nd)
        try:
            pads = conv_pads(arg(args, kwargs, 4, "padding", 0), kernel, dilation)
        except ValueError as exc:
            return str(exc)
        meta = {
            "nd": nd,
            "stride": ntuple(arg(args, kwargs, 3, "stride", 1), nd),
            "pads": pads,
            "dilation": dilation,
            "groups": int(arg(args, kwargs, 6, "groups", 1)),
            "unbatched": x.dim() == nd + 1,
        }
        return Call(x, {"weight": w, "bias": b}, meta)

    def sample_dim_ok(self, call, dim):
        return dim == 0 and not call.meta["unbatched"]

    def _symmetric(self, meta):
        pads = meta["pads"]
        return all(pads[i] == pads[i + 1] for i in range(0, len(pads), 2))

    def forward(self, call):
        m, x = call.meta, call.x
        w, b = call.params["weight"], call.params["bias"]
        if self._symmetric(m):
            padding = tuple(reversed(m["pads"][::2]))
        else:
            x, padding = F.pad(x, m["pads"]), 0
        return self._CONV[m["nd"]](x, w, b, m["stride"], padding, m["dilation"], m["groups"]), ()

    def input_grad(self, call, saved, g):
        m, x, w = call.meta, call.x, call.params["weight"]
        symmetric = self._symmetric(m)
        padding = list(reversed(m["pads"][::2])) if symmetric else [0] * m["nd"]
        xin = x if symmetric else F.pad(x, m["pads"])
        unbatched = m["unbatched"]
        if unbatched:
            xin, g = xin.unsqueeze(0), g.unsqueeze(0)
        grad = torch.ops.aten.convolution_backward(
            g, xin, w.to(g.dtype), None, list(m["stride"]), padding, list(m["dilation"]), False, [0] * m["nd"],
            m["groups"], [True, False, False],
        )[0]
        if not symmetric:
            index = [slice(None), slice(None)]
            pads = m["pads"]
            for i in range(m["nd"]):
                lo, hi = pads[2 * (m["nd"] - 1 - i)], pads[2 * (m["nd"] - 1 - i) + 1]
                index.append(slice(lo, grad.shape[2 + i] - hi))
            grad = grad[tuple(index)]
        return grad.squeeze(0) if unbatched else grad

    def contributions(self, call, x, g, saved, slots):
        m = call.meta
        if m["unbatched"]:  # a shared unbatched input: [B, C, *sp] -> one image per sample
            x, g = x.unsqueeze(1), g.unsqueeze(1)
        out = {}
        if "weight" in slots:
            if self._symmetric(m):
                padding = list(reversed(m["pads"][::2]))
            else:
                b, images = x.shape[:2]
                padded = F.pad(x.reshape(b * images, *x.shape[2:]), m["pads"])
                x, padding = padded.reshape(b, images, *padded.shape[1:]), [0] * m["nd"]
            out["weight"] = ConvGrads(x, g, tuple(call.params["weight"].shape), m["stride"], padding, m["dilation"], m["groups"])
        if "bias" in slots:
            acc = acc_dtype(g.dtype)
            out["bias"] = Dense(g.to(acc).transpose(1, 2).reshape(g.shape[0], g.shape[2], -1).sum(2))
        return out
