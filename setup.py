"""Build script: the Python package always; the CUDA extension ``gpt2fast._C`` only when nvcc is found.

The extension is a split build driven by ninja: the kernels (``csrc/*.cu``) are compiled by nvcc,
the pybind11 binding (``csrc/binding.cpp``, no PyTorch or CUDA headers) by the host C++ compiler,
and nvcc links them with the CUDA runtime linked statically.  It therefore builds against any
torch, including CPU-only builds.

Environment:
  GPT2FAST_NO_CUDA=1          skip the extension (pure-Python install; backend "cuda" reports why)
  GPT2FAST_CUDA_ARCHS="80;90a" SM targets (";" "," or space separated; "8.0" style accepted).
                              Default "80;90a"; PTX of the lowest target is embedded too.
  GPT2FAST_BUILD_JOBS=2        parallel compile jobs (ninja -j)
  GPT2FAST_CUDA_OPTIONAL=1     a failing extension build warns instead of failing the install
  NVCC / CUDA_HOME             where nvcc is (else PATH, else /usr/local/cuda/bin/nvcc)
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
EXT_NAME = "gpt2fast._C"
DEFAULT_ARCHS = "80;90a"
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]
CXX_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden"]


def find_nvcc() -> str | None:
    """Path of nvcc, or None when there is none (or GPT2FAST_NO_CUDA=1)."""
    if os.environ.get("GPT2FAST_NO_CUDA", "0") not in ("", "0"):
        return None
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def parse_archs(spec: str) -> list[str]:
    """Parse an arch list such as "80;90a", "8.0,9.0a" or "80 90a" into ["80", "90a"], lowest first."""
    out = []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip().lower().replace(".", "").removeprefix("sm_").removeprefix("compute_")
        if not item:
            continue
        if not item.rstrip("af").isdigit():
            raise ValueError(f"GPT2FAST_CUDA_ARCHS: cannot parse {item!r} (expected e.g. '80;90a')")
        out.append(item)
    if not out:
        raise ValueError("GPT2FAST_CUDA_ARCHS is empty")
    return sorted(set(out), key=lambda a: (int(a.rstrip("af")), a))


def gencode_flags(archs: list[str]) -> list[str]:
    """-gencode for every SM in ``archs`` plus PTX of the lowest one (JIT for newer GPUs)."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    lowest = archs[0]
    flags.append(f"-gencode=arch=compute_{lowest},code=compute_{lowest}")
    return flags


def nvcc_compile_command(nvcc: str, archs: list[str]) -> list[str]:
    """The nvcc command line (without sources) that compiles the kernels."""
    return [nvcc, *NVCC_FLAGS, *gencode_flags(archs), "-I", str(CSRC)]


def cuda_sources() -> list[Path]:
    """The kernel translation units."""
    return sorted(CSRC.glob("*.cu"))


def _find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the PyPI wheel ships the binary

        cand = Path(ninja.BIN_DIR) / "ninja"
        return str(cand) if cand.exists() else None
    except ImportError:
        return None


def _q(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def _ne(path: str) -> str:
    """Escape a path for a ninja build line."""
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


class CudaBuildExt(build_ext):
    """Builds gpt2fast._C with nvcc + the host compiler via ninja (serial subprocesses without ninja)."""

    def run(self) -> None:
        self._skipped: set[str] = set()
        super().run()

    def copy_extensions_to_source(self) -> None:
        self.extensions = [e for e in self.extensions if e.name not in getattr(self, "_skipped", ())]
        super().copy_extensions_to_source()

    def get_outputs(self) -> list[str]:
        return [o for o in super().get_outputs() if Path(o).exists() or not getattr(self, "_skipped", None)]

    def build_extension(self, ext: Extension) -> None:
        if ext.name != EXT_NAME:
            super().build_extension(ext)
            return
        try:
            self._build_cuda(ext)
        except (OSError, subprocess.CalledProcessError) as exc:
            if os.environ.get("GPT2FAST_CUDA_OPTIONAL", "0") in ("", "0"):
                raise
            self._skipped.add(ext.name)
            print(
                f"gpt2fast: building {EXT_NAME} failed ({exc}); GPT2FAST_CUDA_OPTIONAL is set, so the "
                "install continues without the cuda backend",
                file=sys.stderr,
            )

    def _build_cuda(self, ext: Extension) -> None:
        import pybind11

        nvcc = find_nvcc()
        archs = parse_archs(os.environ.get("GPT2FAST_CUDA_ARCHS", DEFAULT_ARCHS))
        cxx = os.environ.get("CXX", "c++")
        jobs = os.environ.get("GPT2FAST_BUILD_JOBS", "2")
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        tmp = Path(self.build_temp).resolve() / "gpt2fast_cuda"
        tmp.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)

        nvcc_cmd = nvcc_compile_command(nvcc, archs)
        py_include = sysconfig.get_paths()["include"]
        cxx_cmd = [cxx, *CXX_FLAGS, "-I", str(CSRC), "-I", pybind11.get_include(), "-I", py_include]
        link_cmd = [nvcc, "-shared", "-cudart", "static", *gencode_flags(archs)]

        steps: list[tuple[str, list[str]]] = []  # (output, command)
        objects = []
        for src in cuda_sources():
            obj = tmp / (src.stem + ".cu.o")
            steps.append((str(obj), [*nvcc_cmd, "-c", str(src), "-o", str(obj)]))
            objects.append(str(obj))
        obj = tmp / "binding.cpp.o"
        steps.append((str(obj), [*cxx_cmd, "-c", str(CSRC / "binding.cpp"), "-o", str(obj)]))
        objects.append(str(obj))
        link = [*link_cmd, *objects, "-o", str(out)]

        ninja = _find_ninja()
        if ninja:
            self._run_ninja(ninja, tmp, steps, link, str(out), jobs)
        else:
            for _, cmd in steps:
                self._run(cmd)
            self._run(link)

    def _run(self, cmd: list[str]) -> None:
        print(_q(cmd), flush=True)
        subprocess.run(cmd, check=True)

    def _run_ninja(self, ninja: str, tmp: Path, steps, link, out: str, jobs: str) -> None:
        headers = sorted(_ne(str(p)) for p in CSRC.glob("*.h*"))
        lines = ["ninja_required_version = 1.3", "rule run", "  command = $cmd", "  description = $desc", ""]
        for output, cmd in steps:
            src = cmd[cmd.index("-c") + 1]
            lines += [f"build {_ne(output)}: run {_ne(src)} | {' '.join(headers)}", f"  cmd = {_q(cmd)}"]
            lines.append(f"  desc = {src}")
        objs = " ".join(_ne(o) for o, _ in steps)
        lines += [f"build {_ne(out)}: run {objs}", f"  cmd = {_q(link)}", f"  desc = link {out}", ""]
        (tmp / "build.ninja").write_text("\n".join(lines))
        print(f"building {EXT_NAME} with ninja -j{jobs} in {tmp}", flush=True)
        subprocess.run([ninja, "-C", str(tmp), f"-j{jobs}"], check=True)


def _have_pybind11() -> bool:
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return False
    return True


def extensions() -> list[Extension]:
    """[gpt2fast._C] when nvcc and pybind11 are available, else [] (with a note on stderr)."""
    reason = None
    if find_nvcc() is None:
        reason = "GPT2FAST_NO_CUDA is set" if os.environ.get("GPT2FAST_NO_CUDA") else "nvcc not found"
    elif not _have_pybind11():
        reason = "pybind11 is not installed (pip install pybind11, or build with isolation)"
    if reason is not None:
        print(f"gpt2fast: {reason}; skipping the CUDA extension {EXT_NAME}", file=sys.stderr)
        return []
    sources = [str(p.relative_to(ROOT)) for p in [*cuda_sources(), CSRC / "binding.cpp"]]
    return [Extension(EXT_NAME, sources=sources)]


if __name__ == "__main__":  # setuptools' PEP 517 backend runs this file as __main__ too
    setup(ext_modules=extensions(), cmdclass={"build_ext": CudaBuildExt})
