"""Build script: pure-Python package plus optional compiled kernels.

``fastcl._C``    CPU kernels (C++/OpenMP, pybind11); built wherever a C++ compiler exists.
``fastcl._cuda`` CUDA kernels; built only when nvcc is found and FASTCL_BUILD_CUDA != "0".

Neither links against libtorch: kernels take raw pointers, sizes and dtype codes, and
Python validates the tensors. A failed build never fails the install (unless
FASTCL_REQUIRE_CPP=1): a banner on stderr names the cause (pybind11 missing, no C++
compiler, a compile error with the compiler's first error lines, a link error), the
outcome of every extension is recorded in fastcl/_build_status.json, and ``fastcl info``
prints it. fastcl then uses its other backends.

Environment:
  FASTCL_BUILD_CPP=0    skip fastcl._C
  FASTCL_BUILD_CUDA=0   skip fastcl._cuda
  FASTCL_REQUIRE_CPP=1  fail the build when fastcl._C is not built (CI sets it)
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


STATUS_FILE = "_build_status.json"  # written next to the extensions; read by `fastcl info` (fastcl/_build_report.py)
SKIPPED: dict[str, str] = {}  # extension name -> why it was not attempted (filled by extensions())


class BuildProblem(Exception):
    """Why an extension was not built: ``outcome`` is one of no-pybind11, no-compiler, compile-error,
    link-error, no-nvcc, nvcc-error, error; the message says what to do."""

    def __init__(self, outcome: str, message: str):
        super().__init__(message)
        self.outcome = outcome


def _error_lines(output: str, limit: int = 6) -> str:
    """The compiler's first error lines (or its last lines when none says 'error')."""
    lines = [ln.rstrip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return "\n".join((errors or lines[-limit:])[:limit])


class OptionalBuildExt(build_ext):
    """build_ext where each extension is optional: a failure is reported, recorded and skipped.

    Every outcome goes into ``fastcl/_build_status.json`` (``{name: {"built", "outcome",
    "reason"}}``), which ``fastcl info`` reads back, and a failure prints a banner on
    stderr naming the cause: pybind11 missing, no C++ compiler, a compile error (with the
    compiler's first error lines) or a link error. ``FASTCL_REQUIRE_CPP=1`` turns a
    missing ``fastcl._C`` into a failed build (CI uses it).
    """

    def run(self):
        self._status: dict[str, dict] = {}
        self._compiler_output = ""
        super().run()  # calls build_extensions when there is anything to build
        for name, why in SKIPPED.items():
            self._status.setdefault(name, {"built": False, "outcome": "skipped", "reason": why})
        self._write_status()
        cpp = self._status.get("fastcl._C", {"built": False, "reason": "not attempted"})
        if os.environ.get("FASTCL_REQUIRE_CPP") == "1" and not cpp["built"]:
            raise SystemExit(f"error: FASTCL_REQUIRE_CPP=1 but fastcl._C was not built: {cpp['reason']}")

    def build_extensions(self):
        self._capture_compiler_output()
        built = []
        for ext in self.extensions:
            try:
                self._configure(ext)
                self.build_extension(ext)
                built.append(ext)
                self._status[ext.name] = {"built": True, "outcome": "built", "reason": None}
            except Exception as exc:  # compile/link errors, missing tools: never fail the install
                problem = self._diagnose(exc)
                self._status[ext.name] = {"built": False, "outcome": problem.outcome, "reason": str(problem)}
                bar = "=" * 78
                print(
                    f"\n{bar}\nWARNING: fastcl could not build {ext.name} ({problem.outcome}).\n{problem}\n"
                    f"fastcl installs without it and uses its other backends for those ops; `fastcl info` repeats this.\n"
                    f"{bar}\n",
                    file=sys.stderr, flush=True,
                )
        # later steps (in-place copy, wheel contents) only see what was built
        self.extensions = built

    # ---------------------------------------------------------------- diagnosis
    def _capture_compiler_output(self) -> None:
        """Run the compiler's commands with their output captured (echoed to stderr on failure)."""
        compiler = self.compiler

        def run(cmd, **kwargs):
            proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=kwargs.get("env"))
            if proc.returncode != 0:
                self._compiler_output = proc.stdout + proc.stderr
                self._failed_source = next((os.path.relpath(str(c), ROOT) for c in cmd if str(c).endswith((".cpp", ".cu"))), None)
                if not getattr(self, "_probing", False):
                    sys.stderr.write(self._compiler_output)
                raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)

        if hasattr(compiler, "call"):  # setuptools >= 75: _compile/link call self.call(cmd)
            compiler.call = run
        original_spawn = getattr(compiler, "spawn", None)
        if original_spawn is not None:  # older setuptools: self.spawn(cmd)
            def spawn(cmd, **kwargs):
                try:
                    run(cmd, **kwargs)
                except subprocess.CalledProcessError as exc:
                    from setuptools.errors import ExecError

                    raise ExecError(f"command {cmd[0]!r} failed with exit code {exc.returncode}") from None

            compiler.spawn = spawn

    def _flag(self, flag: str) -> bool:
        """Whether the compiler accepts ``flag``; a refusal is expected, so nothing is printed or kept."""
        self._probing = True
        try:
            return _has_flag(self.compiler, flag)
        finally:
            self._probing = False
            self._compiler_output = ""

    def _check_compiler(self) -> None:
        if self.compiler.compiler_type == "msvc":
            return
        for attr in ("compiler_so_cxx", "compiler_cxx", "compiler_so"):
            cmd = getattr(self.compiler, attr, None)
            if cmd:
                if shutil.which(cmd[0]) is None:
                    raise BuildProblem(
                        "no-compiler",
                        f"no C++ compiler: {cmd[0]!r} is not on PATH. Install one (e.g. `apt-get install g++`, "
                        "Xcode command-line tools) or point CXX at it, then reinstall fastcl.",
                    )
                return

    def _diagnose(self, exc: Exception) -> BuildProblem:
        from setuptools.errors import CompileError, LinkError

        if isinstance(exc, BuildProblem):
            return exc
        output = _error_lines(self._compiler_output) if self._compiler_output else ""
        if isinstance(exc, CompileError):
            where = f" on {self._failed_source}" if getattr(self, "_failed_source", None) else ""
            return BuildProblem("compile-error", f"the C++ compiler failed{where}" + (f":\n{output}" if output else f": {exc}"))
        if isinstance(exc, LinkError):
            return BuildProblem("link-error", "linking failed" + (f":\n{output}" if output else f": {exc}"))
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return BuildProblem("error", detail + (f"\n{output}" if output else ""))

    def _write_status(self) -> None:
        import json

        path = os.path.join(os.path.dirname(self.get_ext_fullpath("fastcl._C")), STATUS_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self._status, f, indent=1, sort_keys=True)

    def _stale(self, ext: Extension) -> bool:
        target = self.get_ext_fullpath(ext.name)
        if not os.path.exists(target):
            return True
        built = os.path.getmtime(target)
        return any(os.path.getmtime(src) > built for src in (*ext.sources, *ext.depends))

    def _configure(self, ext: Extension) -> None:
        try:
            import pybind11  # a build requirement (pyproject.toml)
        except ImportError:
            raise BuildProblem(
                "no-pybind11",
                "pybind11 is not installed where fastcl is being built. It is a build requirement in pyproject.toml, "
                "which pip installs unless build isolation is off (--no-build-isolation, or `python setup.py`): "
                "`pip install pybind11`, then reinstall fastcl.",
            ) from None
        self._check_compiler()
        ext.include_dirs = [pybind11.get_include(), *ext.include_dirs]
        msvc = self.compiler.compiler_type == "msvc"
        if msvc:
            ext.extra_compile_args = ["/O2", "/std:c++17", "/openmp", "/EHsc"]
        else:
            args = ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
            if platform.machine().lower() in ("x86_64", "amd64") and self._flag("-march=x86-64-v2"):
                args.append("-march=x86-64-v2")
            link = []
            if ext.name == "fastcl._C" and self._flag("-fopenmp"):
                args.append("-fopenmp")
                link.append("-fopenmp")
            ext.extra_compile_args = args
            ext.extra_link_args = link
        if ext.name == "fastcl._cuda" and (self.force or self._stale(ext)):
            nvcc = find_nvcc()
            if nvcc is None:
                raise BuildProblem("no-nvcc", "nvcc not found (CUDA_HOME, CUDA_PATH, PATH)")
            home = cuda_home(nvcc)
            ext.extra_objects = compile_cuda_objects(nvcc, os.path.join(self.build_temp, "fastcl_cuda"), cuda_archs())
            ext.library_dirs = cuda_library_dirs(home)
            ext.libraries = ["cudart_static"] + ([] if msvc else ["dl", "rt", "pthread"])


def extensions() -> list[Extension]:
    exts = []
    if _env_off("FASTCL_BUILD_CPP"):
        SKIPPED["fastcl._C"] = "not built: FASTCL_BUILD_CPP=0 at install time"
    else:
        exts.append(Extension(
            "fastcl._C",
            sources=[os.path.join(CPU_DIR, f) for f in ("bindings.cpp", "penalty.cpp", "distill.cpp", "distill_avx2.cpp",
                                                         "distill_avx512.cpp", "sqgrad.cpp", "sqgrad_avx2.cpp",
                                                         "sqgrad_avx512.cpp")],
            include_dirs=[CPU_DIR, COMMON_DIR],
            depends=[*(os.path.join(CPU_DIR, f) for f in ("dtypes.h", "kernels.h", "pages.h", "distill_isa.h", "distill_impl.inc",
                                                          "sqgrad_isa.h", "sqgrad_impl.inc")), *COMMON_HEADERS],
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
        SKIPPED["fastcl._cuda"] = "not built: nvcc was not found at install time (CUDA_HOME, CUDA_PATH, PATH)"
        print("fastcl: nvcc not found (CUDA_HOME, CUDA_PATH, PATH): not building fastcl._cuda", flush=True)
    else:
        SKIPPED["fastcl._cuda"] = "not built: FASTCL_BUILD_CUDA=0 at install time"
    return exts


if __name__ == "__main__":
    setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
