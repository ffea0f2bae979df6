"""Backend kernels. They know nothing of nn.Module or strategies.

* :mod:`fastcl.kernels.triton` — Triton kernels (GPU; CPU under ``TRITON_INTERPRET=1``).
* :mod:`fastcl.kernels.cpp`    — wrappers over the compiled CPU extension ``fastcl._C``.
* :mod:`fastcl.kernels.cuda`   — wrappers over the compiled CUDA extension ``fastcl._cuda``.

Each is a backend module in the sense of :mod:`fastcl.ops._dispatch`.
"""
