"""Integrations with other libraries, each in its own module and imported on demand.

* :mod:`fastcl.integrations.hf` — Hugging Face ``transformers``: a ``Trainer`` that adds
  any fastcl regularizer (and LwF for causal LMs) to the loss, the per-sequence Fisher of
  a causal LM, and fused LwF on hidden states. Needs ``pip install "fastcl[hf]"``.
* :mod:`fastcl.integrations.lightning` — PyTorch Lightning: ``ContinualCallback`` adds any
  regularizer's fused penalty gradient at each optimizer step, LwF's distillation gradient,
  and consolidates at the end of each ``fit``. Needs ``pip install "fastcl[lightning]"``.

This package imports nothing itself, so ``import fastcl.integrations`` stays cheap and
works without the optional dependencies.
"""

__all__: list[str] = []
