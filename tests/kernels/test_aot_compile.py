"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, without spills, on a CPU-only machine.

The configurations are the launchers' own: each case builds real (CPU) inputs and asks
the kernel module's ``plan(...)`` for the launch it would run; ``Launch.compile_spec``
derives signature, constexprs and alignment attributes the way Triton's launcher does,
and ``triton.compile`` builds it for ``GPUTarget("cuda", 80|90, 32)`` with the bundled
ptxas. The compile runs in a subprocess (the test session decorates kernels under
``TRITON_INTERPRET=1``, which cannot be compiled), two at a time, with a fresh empty
Triton cache, so nothing is reused between runs.

Besides "compiles, no spills", each case checks what the PTX review asked for, so it
cannot silently regress: vector loads where alignment allows them, 4 ``ex2`` per
distill element, tensor-core MMAs and a single software-pipelined loop in sqgrad.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

TARGETS = (80, 90)
WORKERS = 2
ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- cases
# Each case builds real CPU tensors and returns the launches one kernel call would run;
# only their configuration (dtypes, constexprs, alignment, integer specialisation) is
# compiled. ``expect`` lists what the PTX must show for that case.

def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _penalty(p_dtype, s_dtype, *, weights=True, grads="accumulate", form="quadratic", sizes=(7, 1000, 4099, 33),
             with_reduce=False):
    def build():
        import torch

        from fastcl.kernels.triton import penalty

        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(n, generator=gen).to(_dtype(p_dtype)) for n in sizes]
        flat = torch.randn(sum(sizes) + 1, generator=gen).to(_dtype(s_dtype))[1:]   # views at odd offsets
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        anchors = [flat[o:o + n] for o, n in zip(offsets, sizes)]
        ws = [torch.rand(n, generator=gen).to(_dtype(s_dtype)) for n in sizes] if weights else None
        gs = [torch.zeros(n, dtype=_dtype(p_dtype)) for n in sizes] if grads else None
        main, reduce, _ = penalty.plan(params, anchors, ws, 0.5, form, gs, store=grads == "store")
        return [main, reduce] if with_reduce else [main]       # one reduce configuration in all
    return build


def _sqgrad(dtype, B, T, I, O, *, power=2, splits=1, precision=None):
    def build():
        import torch

        from fastcl.kernels.triton import sqgrad

        x = torch.randn(B, T, I).to(_dtype(dtype))
        g = torch.randn(B, T, O).to(_dtype(dtype))
        default = sqgrad.FP32_INPUT_PRECISION
        sqgrad.FP32_INPUT_PRECISION = precision or default
        try:
            launch, _ = sqgrad.plan(x, g, torch.zeros(O, I), power, batch_splits=splits)
        finally:
            sqgrad.FP32_INPUT_PRECISION = default
        return [launch]
    return build


def _distill(dtype, R, V, *, masked=False, offset=0):
    def build():
        import torch

        from fastcl.kernels.triton import distill

        student = torch.randn(R * V + offset).to(_dtype(dtype))[offset:].view(R, V)
        teacher = torch.randn(R, V).to(_dtype(dtype))
        mask = torch.ones(R, dtype=torch.bool) if masked else None
        launch, _, _ = distill.plan(student, teacher, 2.0, mask, 0.25)
        return [launch]
    return build


VECTOR = {"vector_loads"}            # 16-byte ld.global.v4 on the aligned paths
TENSOR_CORES = {"tensor_cores", "pipelined"}
CASES = {
    # penalty: every θ dtype, anchor/weight dtype, gradient mode and φ; a one-tensor list
    # specialises n_tensors = 1. Every binary holds the all-aligned, θ/grad-aligned and
    # element-wise paths (alignment is a per-tensor runtime choice).
    "penalty-f32-f32-acc-quad": (_penalty("float32", "float32", with_reduce=True), VECTOR),
    "penalty-bf16-f32-store-l1": (_penalty("bfloat16", "float32", grads="store", form="l1"), VECTOR),
    "penalty-f16-bf16-acc-l1": (_penalty("float16", "bfloat16", form="l1"), VECTOR),
    "penalty-bf16-bf16-value-1tensor": (_penalty("bfloat16", "bfloat16", weights=False, grads=None, sizes=(5000,)), VECTOR),
    "penalty-f32-f64-store-quad": (_penalty("float32", "float64", grads="store"), VECTOR),
    # sqgrad: small tiles (conv1: O=16, I=9), large aligned tiles, odd shapes, |.| and
    # split samples; fp32 on tf32x3 tensor cores (default) and on ieee FMA (the tunable).
    # T = 1 with 2-byte rows of 10 and 100 elements: no 4-byte cp.async, so not pipelined.
    "sqgrad-f32-conv1": (_sqgrad("float32", 4, 784, 9, 16), TENSOR_CORES),
    "sqgrad-bf16-conv1-p1-split": (_sqgrad("bfloat16", 6, 784, 9, 16, power=1, splits=3), TENSOR_CORES),
    "sqgrad-f32-768x768": (_sqgrad("float32", 2, 128, 768, 768), TENSOR_CORES | VECTOR),
    "sqgrad-bf16-768x3072": (_sqgrad("bfloat16", 2, 128, 768, 3072), TENSOR_CORES | VECTOR),
    "sqgrad-f16-head-T1": (_sqgrad("float16", 8, 1, 100, 10), {"tensor_cores"}),
    "sqgrad-f32-odd-33x17-split": (_sqgrad("float32", 5, 37, 17, 33, splits=2), TENSOR_CORES),
    "sqgrad-f32-ieee-768x768": (_sqgrad("float32", 2, 128, 768, 768, precision="ieee"), {"pipelined"} | VECTOR),
    # distill: GPT-2's V = 50257 (rows off 16-byte boundaries), V % 16 == 0, small V, masks;
    # Llama-3's V with the student a view at an odd offset (element-wise path).
    "distill-f32-50257": (_distill("float32", 3, 50257), VECTOR),
    "distill-bf16-50257-mask": (_distill("bfloat16", 3, 50257, masked=True), VECTOR),
    "distill-f16-32000": (_distill("float16", 2, 32000), VECTOR),
    "distill-f32-300-mask": (_distill("float32", 4, 300, masked=True), VECTOR),
    "distill-bf16-128256-unaligned": (_distill("bfloat16", 2, 128256, offset=1), set()),
}


# ---------------------------------------------------------------------------- worker

def _ptx_stats(ptx: str) -> dict:
    return {
        "ex2": len(re.findall(r"\bex2\.approx", ptx)),
        "ld_v4": len(re.findall(r"\bld\.global(?:\.\w+)*\.v4\b", ptx)),
        "st_v4": len(re.findall(r"\bst\.global(?:\.\w+)*\.v4\b", ptx)),
        "ld_v2": len(re.findall(r"\bld\.global(?:\.\w+)*\.v2\b", ptx)),
        "mma": len(re.findall(r"\bmma\.sync", ptx)),
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "cp_async": len(re.findall(r"\bcp\.async\.c[ag]\.shared\.global", ptx)),
        "fma_f32": len(re.findall(r"\bfma\.rn\.f32", ptx)),
        "loop_depth2": "Depth=2" in ptx,
    }


def _compile_one(launch, arch: int) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    signature, constexprs, attrs, options = launch.compile_spec(target)
    knobs.nvidia.dump_ptxas_log = True       # ptxas -v output, printed to stdout
    knobs.compilation.always_compile = True  # never a cache hit (it would print no ptxas report)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target, options=options)
    seconds = time.perf_counter() - start
    text = log.getvalue()
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    regs = re.search(r"Used (\d+) registers", text)
    if frame is None or regs is None:
        raise RuntimeError(f"no ptxas -v resource report in:\n{text}")
    return {
        "kernel": launch.kernel.__name__,
        "constexprs": {k: v for k, v in launch.options.items()},
        "attrs": sorted(str(k) for k in attrs),
        "registers": int(regs.group(1)),
        "stack": int(frame.group(1)),
        "spill_stores": int(frame.group(2)),
        "spill_loads": int(frame.group(3)),
        "seconds": round(seconds, 2),
        **_ptx_stats(compiled.asm["ptx"]),
    }


def _worker(names: list[str]) -> None:
    results = {}
    for name in names:
        for arch in TARGETS:
            try:
                results[f"{name}@sm_{arch}"] = [_compile_one(launch, arch) for launch in CASES[name][0]()]
            except Exception as exc:  # noqa: BLE001  (reported per case by the parent)
                results[f"{name}@sm_{arch}"] = {"error": f"{type(exc).__name__}: {exc}"}
    json.dump(results, sys.stdout)


# ---------------------------------------------------------------------------- tests

def _toolchain_reason() -> str | None:
    try:
        import triton  # noqa: F401
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        return f"triton with its NVIDIA backend is not installed ({exc})"
    if "nvidia" not in backends:
        return "triton has no NVIDIA backend"
    try:
        get_ptxas(90)
    except Exception as exc:  # noqa: BLE001
        return f"triton's bundled ptxas is missing ({exc})"
    return None


@pytest.fixture(scope="module")
def compiled():
    reason = _toolchain_reason()
    if reason is not None:
        pytest.skip(reason)
    cache = tempfile.mkdtemp(prefix="fastcl-aot-")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=cache, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    try:
        groups = [list(CASES)[i::WORKERS] for i in range(WORKERS)]
        procs = [
            subprocess.Popen([sys.executable, __file__, "--worker", *group], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for group in groups
        ]
        results = {}
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                pytest.fail(f"AOT compile worker failed ({proc.returncode}):\n{err[-4000:]}")
            results.update(json.loads(out))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    report = os.environ.get("FASTCL_AOT_REPORT")     # optional: registers, spills, PTX counts as JSON
    if report:
        Path(report).write_text(json.dumps(results, indent=1))
    return results


@pytest.mark.parametrize("arch", TARGETS)
@pytest.mark.parametrize("name", list(CASES))
def test_compiles_without_spills(compiled, name, arch):
    result = compiled[f"{name}@sm_{arch}"]
    assert not isinstance(result, dict), result["error"]
    expect = CASES[name][1]
    for kernel in result:
        assert kernel["spill_stores"] == 0 and kernel["spill_loads"] == 0, kernel
        assert kernel["stack"] == 0, kernel
        if kernel["kernel"] == "_sum_partials_kernel":
            continue
        opts = kernel["constexprs"]
        if "vector_loads" in expect:
            assert kernel["ld_v4"] > 0, kernel
        if "tensor_cores" in expect:
            assert kernel["mma"] + kernel["wgmma"] > 0, kernel
        if "pipelined" in expect:
            assert kernel["cp_async"] > 0, kernel          # software-pipelined tile loads
        if kernel["kernel"] == "_sqgrad_kernel":
            assert not kernel["loop_depth2"], kernel       # one flat (sample, slice) loop: no drain per sample
        if kernel["kernel"] == "_distill_kernel":
            per_thread = opts["BLOCK_V"] // (32 * opts["num_warps"])
            copies = 3 if opts["ALIGNED"] else 2        # masked head (aligned only), body, masked tail
            # 4 ex2 per element (2 per pass) plus one scalar rescale per stream and block.
            assert kernel["ex2"] <= copies * (4 * per_thread + 2), kernel
            if opts["ALIGNED"]:
                assert kernel["st_v4"] > 0, kernel


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2:])
