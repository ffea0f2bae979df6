"""The CUDA sources build with nvcc (same command line as setup.py) for sm_80 and sm_90
without register spills and with 16-byte loads, and, on a GPU, the cuda penalty kernel
matches float64 formulas.

value = s·Σ w·φ(θ−a), grads += s·w·φ'(θ−a) (store mode: grads = s·w·φ'(θ−a)),
φ = d²/2 (quadratic) or |d| (l1).
"""
import importlib.util
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from fastcl.kernels import cuda as cuda_backend
from fastcl.testing import (
    KERNEL_TOLERANCES,
    PENALTY_GRID,
    assert_grads_close,
    assert_penalty_matches,
    check_penalty_kernel,
    param_id,
    penalty_inputs,
    penalty_oracle,
)

ROOT = Path(__file__).resolve().parents[2]


def _load_setup():
    spec = importlib.util.spec_from_file_location("fastcl_setup_script", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs under __main__
    return module


SETUP = _load_setup()
NVCC = SETUP.find_nvcc()
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or cuda_backend._cuda is None,
    reason=f"needs a CUDA device and fastcl._cuda ({cuda_backend.BUILD_ERROR or 'no CUDA device'})",
)


def _run(cmd, **kwargs):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout}\n{result.stderr}"
    return result


ARCHS = ["80", "90"]


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory):
    """One nvcc run of setup.py's command line for sm_80 and sm_90, keeping ptxas's
    resource report and the PTX: ``(objects, ptxas report, {arch: ptx text})``."""
    if NVCC is None:
        pytest.skip("nvcc not found (CUDA_HOME, CUDA_PATH, PATH)")
    tmp = tmp_path_factory.mktemp("cuda")
    objects, report = [], ""
    for source in SETUP.CUDA_SOURCES:
        obj = tmp / (Path(source).stem + ".o")
        result = _run([*SETUP.nvcc_command(NVCC, str(ROOT / source), str(obj), ARCHS), "-Xptxas", "-v", "-keep", "-keep-dir", tmp])
        assert obj.stat().st_size > 0
        objects.append(obj)
        report += result.stderr
    ptx = {arch: "".join(p.read_text() for p in tmp.glob(f"*compute_{arch}.ptx")) for arch in ARCHS}
    return objects, report, ptx


def test_cuda_extension_compiles_links_and_loads(cuda_build, tmp_path):
    """nvcc object + pybind11 bindings -> a module that imports without a GPU."""
    pybind11 = pytest.importorskip("pybind11")
    objects = cuda_build[0]
    bindings = tmp_path / "bindings.o"
    cxx = sysconfig.get_config_var("CXX") or "c++"
    _run([*cxx.split(), "-c", ROOT / "csrc/cuda/bindings.cpp", "-o", bindings, "-O1", "-std=c++17", "-fPIC",
          "-fvisibility=hidden", "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"], "-I", ROOT / "csrc/cuda",
          "-I", ROOT / "csrc/common"])
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
        "assert m.PENALTY_CHUNK == 1 << 15\n"
        "assert m.penalty_max_partials(132) == 132 * 8, m.penalty_max_partials(132)\n"
        "try:\n"
        "    m.device_count()\n"  # no GPU here: must raise a clear RuntimeError, not crash
        "except RuntimeError as exc:\n"
        "    assert 'fastcl._cuda' in str(exc)\n"
    )
    _run([sys.executable, "-c", probe])


@pytest.mark.parametrize("arch", ARCHS)
def test_penalty_kernels_do_not_spill(cuda_build, arch):
    """ptxas resource usage of every kernel for this SM: no spills, no stack frame."""
    report = cuda_build[1]
    usage = re.findall(rf"entry function '(\w+)' for 'sm_{arch}'\n.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
                       r"(\d+) bytes spill loads", report, re.S)
    assert len(usage) == 108 + 1, report[-2000:]  # θ 3 × anchor 2 × weight 3 × form 2 × mode 3, and the reduction
    assert [u for u in usage if u[1:] != ("0", "0", "0")] == []


@pytest.mark.parametrize("arch", ARCHS)
def test_penalty_kernels_move_16_bytes_per_access(cuda_build, arch):
    """Every penalty kernel (float32 and bfloat16/float16 θ alike) reads θ and writes the
    gradient with 128-bit global accesses; none uses generic (non-.global) accesses."""
    entries = re.split(r"\.visible \.entry |\.entry ", cuda_build[2][arch])[1:]
    kernels = [e for e in entries if "penalty_kernel" in e.split("(", 1)[0]]
    assert len(kernels) == 108
    for body in kernels:
        assert "ld.global.cs.v4.u32" in body
        writes = "Li1EEE" in body.split("(", 1)[0] or "Li2EEE" in body.split("(", 1)[0]  # accumulate or store mode
        assert ("st.global.cs.v4.u32" in body) == writes
        assert not re.search(r"^\s*(ld|st)\.(f32|u16|b16|v\d)", body, re.M), "generic memory access"


def test_device_table_layout():
    """The table of csrc/cuda/kernels.h: addresses, sizes, then the first chunk of each tensor."""
    chunk = 1 << 15
    table, n_chunks = cuda_backend.penalty_table([[10, 11, 12], [20, 21, 22], [], [40, 41, 42]], [1, 0, 2 * chunk + 1], chunk)
    assert n_chunks == 4
    assert table == [10, 11, 12, 20, 21, 22, 0, 0, 0, 40, 41, 42, 1, 0, 2 * chunk + 1, 0, 1, 1, 4]


def test_cuda_backend_reports_why_not_on_cpu():
    assert cuda_backend.unavailable_reason("cpu") is not None
    assert cuda_backend.unsupported_reason("penalty", torch.float64) is not None
    assert cuda_backend.unsupported_reason("sqgrad", torch.float32) is not None


def make(shapes, dtype, storage, weighted, seed):
    return penalty_inputs(shapes, dtype, storage, weighted, seed, device="cuda")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", KERNEL_TOLERANCES, ids=param_id)
@pytest.mark.parametrize("storage, weighted, form, store", PENALTY_GRID)
def test_cuda_penalty_matches_float64(dtype, tol, storage, weighted, form, store):
    shapes = [(1,), (7,), (65537,), (200003,), (3, 5, 7)]
    value = check_penalty_kernel(cuda_backend.penalty, shapes, dtype, tol, storage, weighted, form, store, device="cuda")
    assert value.device.type == "cuda"


@needs_gpu
@pytest.mark.gpu
def test_cuda_penalty_many_tensors_unaligned_deterministic():
    """More chunks than resident blocks, empty and unaligned tensors; repeated calls agree bitwise."""
    g = torch.Generator().manual_seed(4)
    chunk = cuda_backend._cuda.PENALTY_CHUNK
    shapes = [(int(n),) for n in torch.randint(1, 5000, (100,), generator=g)] + [(2000 * chunk + 3,), (0,), (2 * chunk - 1,)]
    params, anchors, weights, start = make(shapes, torch.bfloat16, torch.float32, True, seed=5)
    params[3] = torch.randn(params[3].numel() + 1, device="cuda").to(torch.bfloat16)[1:]  # 2-byte offset: scalar loop
    results = []
    for _ in range(2):
        grads = [s.clone() for s in start]
        results.append((cuda_backend.penalty(params, anchors, weights, 0.5, "quadratic", grads), grads))
    (v1, g1), (v2, g2) = results
    assert torch.equal(v1, v2)
    assert_penalty_matches(v1, g1, params, anchors, weights, 0.5, "quadratic", start)


@needs_gpu
@pytest.mark.gpu
def test_public_op_uses_cuda_backend_and_autograd():
    from fastcl.ops import anchored_penalty, penalty, use_backend

    params, anchors, weights, start = make([(33, 17), (1001,)], torch.bfloat16, torch.bfloat16, True, seed=6)
    grads = [s.clone() for s in start]
    with use_backend("cuda"):
        value = penalty(params, anchors, weights, scale=1.5, form="l1", grads=grads)
        leaves = [p.clone().requires_grad_() for p in params]
        (2.0 * anchored_penalty(leaves, anchors, weights, scale=1.5, form="l1")).backward()
    assert_penalty_matches(value, grads, params, anchors, weights, 1.5, "l1", start)
    zero = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    want = penalty_oracle(params, anchors, weights, 1.5, "l1", zero)[1]
    assert_grads_close([p.grad for p in leaves], [2.0 * w for w in want], torch.bfloat16)
