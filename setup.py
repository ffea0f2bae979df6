"""Build script: pure-Python package plus optional compiled kernels.

``fastcl._C``    CPU kernels (C++/OpenMP, pybind11); built wherever a C++ compiler exists.
``fastcl._cuda`` CUDA kernels; built only when nvcc is found and FASTCL_BUILD_CUDA != "0".

Neither links against libtorch: kernels take raw pointers, sizes and dtype codes, and
Python validates the tensors. A failed compile never fails the install; fastcl then
falls back to PyTorch and ``fastcl info`` says why.

Environment:
  FASTCL_BUILD_CPP=0    skip fastcl._C
  FASTCL_BUILD_CUDA=0   skip fastcl._cuda
  FASTCL_CUDA_ARCHS     ";"-separated SM versions for fastcl._cuda (default "80;90"; the
                        last one also gets PTX so newer GPUs can JIT it)
  CUDA_HOME / CUDA_PATH where to look for nvcc first (then PATH)

The CPU code targets x86-64-v2 at most on x86 (never -march=native: wheels must run on
other machines); vectorisation comes from gcc/clang auto-vectorising portable loops.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import traceback

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_DIR = os.path.join("csrc", "cpu")
CUDA_DIR = os.path.join("csrc", "cuda")
COMMON_DIR = os.path.join("csrc", "common")  # headers shared by csrc/cpu and csrc/cuda
COMMON_HEADERS = [os.path.join(COMMON_DIR, f) for f in ("codes.h", "penalty_math.h")]
CUDA_SOURCES = [os.path.join(CUDA_DIR, "penalty.cu")]
DEFAULT_CUDA_ARCHS = "80;90"


def _env_off(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("0", "false", "no", "off")


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, else from PATH; None when there is none."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            candidate = os.path.join(home, "bin", "nvcc")
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    return shutil.which("nvcc")


def cuda_home(nvcc: str) -> str:
    """The CUDA toolkit root of ``nvcc``; asks nvcc itself, since ``nvcc`` may be a wrapper script."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("#$ TOP="):
                return os.path.normpath(line.split("=", 1)[1].strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def cuda_library_dirs(home: str) -> list[str]:
    """Directories of ``home`` that may hold libcudart_static."""
    candidates = ["lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"), os.path.join("targets", "sbsa-linux", "lib")]
    return [d for d in (os.path.join(home, c) for c in candidates) if os.path.isdir(d)]


def cuda_archs() -> list[str]:
    """SM versions from FASTCL_CUDA_ARCHS (e.g. "80;90" or "8.0 9.0"), default 80 and 90."""
    raw = os.environ.get("FASTCL_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise ValueError(f"FASTCL_CUDA_ARCHS must list SM versions like '80;90', got {raw!r}")
    return archs


def nvcc_command(nvcc: str, source: str, output: str, archs: list[str]) -> list[str]:
    """The nvcc command line that compiles one .cu file into a position-independent object."""
    cmd = [nvcc, "-c", source, "-o", output, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
           "-Xcompiler", "-fvisibility=hidden", "-I", os.path.join(ROOT, CUDA_DIR), "-I", os.path.join(ROOT, COMMON_DIR)]
    for i, arch in enumerate(archs):
        code = f"[sm_{arch},compute_{arch}]" if i == len(archs) - 1 else f"sm_{arch}"
        cmd += ["-gencode", f"arch=compute_{arch},code={code}"]
    return cmd


def compile_cuda_objects(nvcc: str, build_dir: str, archs: list[str]) -> list[str]:
    """Compile every CUDA source with nvcc into ``build_dir``; return the object paths."""
    os.makedirs(build_dir, exist_ok=True)
    objects = []
    for source in CUDA_SOURCES:
        obj = os.path.join(build_dir, os.path.splitext(os.path.basename(source))[0] + ".cu.o")
        cmd = nvcc_command(nvcc, os.path.join(ROOT, source), obj, archs)
        print("fastcl: " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        objects.append(obj)
    return objects


def _has_flag(compiler, flag: str) -> bool:
    """Whether the C++ compiler accepts ``flag`` (compiles and links a trivial file)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "flag.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
            compiler.link_executable(objs, os.path.join(tmp, "flag"), extra_postargs=[flag])
        except Exception:
            return False
    return True


class OptionalBuildExt(build_ext):
    """build_ext where each extension is optional: a failure prints a warning and skips it."""

    def build_extensions(self):
        built = []
        for ext in self.extensions:
            try:
                self._configure(ext)
                self.build_extension(ext)
                built.append(ext)
            except Exception as exc:  # compile/link errors, missing tools: never fail the install
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                print(
                    f"\nWARNING: fastcl could not build {ext.name} ({detail}).\n"
                    f"WARNING: fastcl installs without it and uses the PyTorch fallback for those ops.\n",
                    file=sys.stderr, flush=True,
                )
        # later steps (in-place copy, wheel contents) only see what was built
        self.extensions = built

    def _stale(self, ext: Extension) -> bool:
        target = self.get_ext_fullpath(ext.name)
        if not os.path.exists(target):
            return True
        built = os.path.getmtime(target)
        return any(os.path.getmtime(src) > built for src in (*ext.sources, *ext.depends))

    def _configure(self, ext: Extension) -> None:
        import pybind11  # a build requirement (pyproject.toml); missing -> this extension is skipped

        ext.include_dirs = [pybind11.get_include(), *ext.include_dirs]
        msvc = self.compiler.compiler_type == "msvc"
        if msvc:
            ext.extra_compile_args = ["/O2", "/std:c++17", "/openmp", "/EHsc"]
        else:
            args = ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
            if platform.machine().lower() in ("x86_64", "amd64") and _has_flag(self.compiler, "-march=x86-64-v2"):
                args.append("-march=x86-64-v2")
            link = []
            if ext.name == "fastcl._C" and _has_flag(self.compiler, "-fopenmp"):
                args.append("-fopenmp")
                link.append("-fopenmp")
            ext.extra_compile_args = args
            ext.extra_link_args = link
        if ext.name == "fastcl._cuda" and (self.force or self._stale(ext)):
            nvcc = find_nvcc()
            if nvcc is None:
                raise RuntimeError("nvcc not found")
            home = cuda_home(nvcc)
            ext.extra_objects = compile_cuda_objects(nvcc, os.path.join(self.build_temp, "fastcl_cuda"), cuda_archs())
            ext.library_dirs = cuda_library_dirs(home)
            ext.libraries = ["cudart_static"] + ([] if msvc else ["dl", "rt", "pthread"])


def extensions() -> list[Extension]:
    exts = []
    if not _env_off("FASTCL_BUILD_CPP"):
        exts.append(Extension(
            "fastcl._C",
            sources=[os.path.join(CPU_DIR, f) for f in ("bindings.cpp", "penalty.cpp", "distill.cpp", "distill_avx2.cpp", "distill_avx512.cpp")],
            include_dirs=[CPU_DIR, COMMON_DIR],
            depends=[*(os.path.join(CPU_DIR, f) for f in ("dtypes.h", "kernels.h", "pages.h", "distill_isa.h", "distill_impl.inc")), *COMMON_HEADERS],
            language="c++",
        ))
    if not _env_off("FASTCL_BUILD_CUDA") and find_nvcc() is not None:
        exts.append(Extension(
            "fastcl._cuda",
            sources=[os.path.join(CUDA_DIR, "bindings.cpp")],
            include_dirs=[CUDA_DIR, COMMON_DIR],
            depends=[*CUDA_SOURCES, os.path.join(CUDA_DIR, "kernels.h"), *COMMON_HEADERS],
            language="c++",
        ))
    elif not _env_off("FASTCL_BUILD_CUDA"):
        print("fastcl: nvcc not found (CUDA_HOME, CUDA_PATH, PATH): not building fastcl._cuda", flush=True)
    return exts


if __name__ == "__main__":
    setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
