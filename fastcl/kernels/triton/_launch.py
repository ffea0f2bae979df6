"""How the Triton kernels are launched: one plan per launch, the device helpers it needs.

Each launcher (``penalty``, ``sqgrad``, ``distill``) first builds a :class:`Launch` —
the kernel, its grid, its arguments and its compile-time options (constexprs,
``num_warps``, ``num_stages``) — and then runs it. Because the plan is a value, the
ahead-of-time compile test (``tests/kernels/test_aot_compile.py``) compiles exactly what
a launcher would run, for GPUs this machine does not have: :meth:`Launch.compile_spec`
turns a plan into the ``(signature, constexprs, attrs, options)`` that Triton's own
launcher would derive from the same arguments (same specialisation of pointer alignment
and integer divisibility), so the test cannot drift from the launchers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch

__all__ = ["Launch", "on", "sm_count", "interpreted"]


def on(device: torch.device):
    """Make ``device`` current for a launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (1 for anything else: the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (it runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](*args, **options)``.

    ``options`` holds the constexpr arguments by name and the launch options
    (``num_warps``, ``num_stages``).
    """

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    options: dict = field(default_factory=dict)

    def __call__(self, device: torch.device):
        with on(device):
            return self.kernel[self.grid](*self.args, **self.options)

    def compile_spec(self, target) -> tuple[dict, dict, dict, dict]:
        """``(signature, constexprs, attrs, options)`` for ``triton.compile`` on ``target``.

        Derived by Triton's own launch-time specialisation (the binder its JIT uses) for
        the backend of ``target``, so pointer alignment (``tt.divisibility``) and integer
        specialisation match a real launch of this plan. Needs a JIT (not interpreted)
        kernel; ``target`` is a ``triton.backends.compiler.GPUTarget``.
        """
        from triton import knobs
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        if interpreted(self.kernel):
            raise RuntimeError("compile_spec needs kernels decorated without TRITON_INTERPRET=1")
        backend = make_backend(target)
        # The options JITFunction.run adds before specialising.
        kwargs = dict(self.options, debug=self.options.get("debug", self.kernel.debug) or knobs.runtime.debug)
        for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
            if hasattr(knobs.compilation, name):
                kwargs[name] = getattr(knobs.compilation, name)
        binder = create_function_from_signature(self.kernel.signature, self.kernel.params, backend)
        bound, specialization, options = binder(*self.args, **kwargs)
        options, signature, constexprs, attrs = self.kernel._pack_args(backend, kwargs, bound, specialization, options)
        return signature, constexprs, attrs, options.__dict__
