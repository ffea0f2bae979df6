"""The CUDA sources build with nvcc (same command line as setup.py) and, on a GPU, the
cuda penalty kernel matches float64 formulas.

value = s·Σ w·φ(θ−a), grads += s·w·φ'(θ−a), φ = d²/2 (quadratic) or |d| (l1).
"""
import importlib.util
import subprocess
import sys
import sysconfig
import zlib
from pathlib import Path

import pytest
import torch

from fastcl.kernels import cuda as cuda_backend

from ._penalty_oracle import expected

ROOT = Path(__file__).resolve().parents[2]


def _load_setup():
    spec = importlib.util.spec_from_file_location("fastcl_setup_script", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs under __main__
    return module


SETUP = _load_setup()
NVCC = SETUP.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, CUDA_PATH, PATH)")
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or cuda_backend._cuda is None,
    reason=f"needs a CUDA device and fastcl._cuda ({cuda_backend.BUILD_ERROR or 'no CUDA device'})",
)


def _run(cmd, **kwargs):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout}\n{result.stderr}"
    return result


@needs_nvcc
def test_cuda_extension_compiles_links_and_loads(tmp_path):
    """nvcc object + pybind11 bindings -> a module that imports without a GPU."""
    pybind11 = pytest.importorskip("pybind11")
    objects = []
    for source in SETUP.CUDA_SOURCES:
        obj = tmp_path / (Path(source).stem + ".o")
        _run(SETUP.nvcc_command(NVCC, str(ROOT / source), str(obj), ["80"]))
        assert obj.stat().st_size > 0
        objects.append(obj)
    bindings = tmp_path / "bindings.o"
    cxx = sysconfig.get_config_var("CXX") or "c++"
    _run([*cxx.split(), "-c", ROOT / "csrc/cuda/bindings.cpp", "-o", bindings, "-O1", "-std=c++17", "-fPIC",
          "-fvisibility=hidden", "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"], "-I", ROOT / "csrc/cuda"])
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    module = tmp_path / f"_cuda{suffix}"
    lib_dirs = SETUP.cuda_library_dirs(SETUP.cuda_home(NVCC))
    _run([*cxx.split(), "-shared", "-o", module, bindings, *objects, *(f"-L{d}" for d in lib_dirs),
          "-lcudart_static", "-ldl", "-lrt", "-lpthread"])
    probe = (
        "import importlib.machinery, importlib.util, sys\n"
        f"loader = importlib.machinery.ExtensionFileLoader('_cuda', {str(module)!r})\n"
        "spec = importlib.util.spec_from_loader('_cuda', loader)\n"
        "m = importlib.util.module_from_spec(spec); loader.exec_module(m)\n"
        "c = m.PENALTY_CHUNK\n"
        "assert m.penalty_num_partials([1, c, c + 1, 0]) == 4, m.penalty_num_partials([1, c, c + 1, 0])\n"
        "try:\n"
        "    m.device_count()\n"  # no GPU here: must raise a clear RuntimeError, not crash
        "except RuntimeError as exc:\n"
        "    assert 'fastcl._cuda' in str(exc)\n"
    )
    _run([sys.executable, "-c", probe])


def test_cuda_backend_reports_why_not_on_cpu():
    assert cuda_backend.unavailable_reason("cpu") is not None
    assert cuda_backend.unsupported_reason("penalty", torch.float64) is not None
    assert cuda_backend.unsupported_reason("sqgrad", torch.float32) is not None


def make(shapes, dtype, storage, weighted, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    anchors = [(p.float().cpu() + 0.5 * torch.randn(s, generator=g)).to(device=device, dtype=storage) for p, s in zip(params, shapes)]
    weights = [torch.rand(s, generator=g).to(device=device, dtype=storage) for s in shapes] if weighted else None
    grads = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    return params, anchors, weights, grads


GRAD_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2**-8, 1e-6), torch.float16: (2**-10, 1e-6)}


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("kind", ["quadratic", "l1"])
def test_cuda_penalty_matches_float64(dtype, storage, weighted, kind):
    shapes = [(1,), (7,), (65537,), (200003,), (3, 5, 7)]
    params, anchors, weights, start = make(shapes, dtype, storage, weighted, zlib.crc32(repr((dtype, storage, weighted, kind)).encode()))
    grads = [g.clone() for g in start]
    value = cuda_backend.penalty(params, anchors, weights, 0.37, kind, grads)
    want_value, want_grads = expected(params, anchors, weights, 0.37, kind, start)
    assert value.device == params[0].device and value.dtype == torch.float32
    assert value.item() == pytest.approx(want_value, rel=1e-4)
    rtol, atol = GRAD_TOL[dtype]
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


@needs_gpu
@pytest.mark.gpu
def test_cuda_penalty_many_tensors_several_launches_deterministic():
    """More tensors and blocks than one launch holds, an unaligned view; repeated calls agree bitwise."""
    g = torch.Generator().manual_seed(4)
    chunk = cuda_backend._cuda.PENALTY_CHUNK
    shapes = [(int(n),) for n in torch.randint(1, 5000, (100,), generator=g)] + [(330 * chunk + 3,), (2 * chunk - 1,)]
    params, anchors, weights, start = make(shapes, torch.float32, torch.float32, True, seed=5)
    params[3] = torch.randn(params[3].numel() + 1, device="cuda")[1:]  # 4-byte offset: scalar path
    results = []
    for _ in range(2):
        grads = [s.clone() for s in start]
        results.append((cuda_backend.penalty(params, anchors, weights, 0.5, "quadratic", grads), grads))
    (v1, g1), (v2, g2) = results
    want_value, want_grads = expected(params, anchors, weights, 0.5, "quadratic", start)
    assert v1.item() == pytest.approx(want_value, rel=1e-4)
    assert torch.equal(v1, v2)
    for got, want in zip(g1, want_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@needs_gpu
@pytest.mark.gpu
def test_public_op_uses_cuda_backend():
    from fastcl.ops import penalty, use_backend

    params, anchors, weights, start = make([(33, 17), (1001,)], torch.bfloat16, torch.bfloat16, True, seed=6)
    grads = [s.clone() for s in start]
    with use_backend("cuda"):
        value = penalty(params, anchors, weights, scale=1.5, kind="l1", grads=grads)
    want_value, want_grads = expected(params, anchors, weights, 1.5, "l1", start)
    assert value.item() == pytest.approx(want_value, rel=1e-4)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-6)
