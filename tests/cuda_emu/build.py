"""Build csrc/cuda/*.cu for the host, against the emulated CUDA runtime (cuda_emu.h), into a
module with the functions of alignfuse.kernels._cuda: the real kernels and launchers, run on
CPU tensors by tests (tests/conftest.py's `cuda` backend on machines without a GPU).

    python tests/cuda_emu/build.py     # builds (or finds) it and prints its path

Built once per content of the sources, these files and the compiler flags, under
build/cuda_emu/<hash>/ (git ignores build/); a later run loads that file. The host compiler
is $CXX, else g++ (C++17; _Float16 needs GCC 12 or Clang 15 on x86-64).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.machinery
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sysconfig

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA_SOURCES = ROOT / "csrc" / "cuda"
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function",
         "-fvisibility=hidden"]


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("cuda_emu: no host C++ compiler (set CXX, or install g++)")
    return cxx


def _sources() -> list[pathlib.Path]:
    # csrc's kernels, the scheduler, and kernels that check the emulation (selftest.cu)
    return sorted(CUDA_SOURCES.glob("*.cu")) + [HERE / "cuda_emu.cpp", HERE / "selftest.cu"]


def hashed_files() -> list[pathlib.Path]:
    """Every file the build reads: the sources and every header they include (csrc/cuda's
    .h and .cuh, this folder's include/)."""
    headers = [p for p in sorted(CUDA_SOURCES.iterdir()) if p.suffix in (".h", ".cuh")]
    return _sources() + headers + sorted((HERE / "include").glob("*.h"))


def _digest(cxx: str) -> str:
    h = hashlib.sha256()
    for path in hashed_files():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(" ".join([cxx, *FLAGS]).encode())
    h.update(sysconfig.get_config_var("EXT_SUFFIX").encode())
    return h.hexdigest()[:16]


def build() -> pathlib.Path:
    """The path of the built module (building it first when needed)."""
    import pybind11

    cxx = _compiler()
    out_dir = ROOT / "build" / "cuda_emu" / _digest(cxx)
    target = out_dir / ("_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    includes = ["-I", str(HERE / "include"), "-I", str(CUDA_SOURCES), "-I", pybind11.get_include(),
                "-I", sysconfig.get_paths()["include"]]

    def compile_one(src: pathlib.Path) -> pathlib.Path:
        obj = out_dir / (src.stem + ".o")
        cmd = [cxx, "-x", "c++", *FLAGS, *includes, "-c", str(src), "-o", str(obj)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"cuda_emu: {' '.join(cmd)}\n{done.stderr[-6000:]}")
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        objects = list(pool.map(compile_one, _sources()))
    partial = out_dir / (target.name + f".{os.getpid()}.tmp")
    cmd = [cxx, "-shared", *[str(o) for o in objects], "-o", str(partial)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cuda_emu: {' '.join(cmd)}\n{done.stderr[-6000:]}")
    os.replace(partial, target)  # concurrent builds (xdist workers) each land a whole file
    return target


def load():
    """Build (when needed) and import the emulated module."""
    path = build()
    loader = importlib.machinery.ExtensionFileLoader("alignfuse_cuda_emu._cuda", str(path))
    spec = importlib.util.spec_from_file_location("alignfuse_cuda_emu._cuda", str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


if __name__ == "__main__":
    print(build())
