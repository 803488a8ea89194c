"""What every result file records about where and from what it was measured."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def commit() -> dict:
    """The alignfuse commit measured, and whether tracked files differ from it.

    ALIGNFUSE_GIT_COMMIT / ALIGNFUSE_GIT_DIRTY (bench/gpu_session.sh documents them) win over
    git when set: the device machine gets the working tree with a copy of .git taken when
    the session began, so after a commit made during the session its git sees the old HEAD
    and the new commit's changes as dirty paths (seen on an H100: d0c4206 + 4 "dirty" files
    that were commit bc32825). What git saw there is kept beside it."""
    head = (_git("rev-parse", "HEAD") or "").strip()
    paths = []
    if head:
        changed = _git("status", "--porcelain", "--untracked-files=no") or ""
        paths = [line[3:] for line in changed.splitlines() if line.strip()]
    env_head = os.environ.get("ALIGNFUSE_GIT_COMMIT", "").strip()
    if env_head:
        dirty = os.environ.get("ALIGNFUSE_GIT_DIRTY", "unknown").lower()
        out = {"commit": env_head,
               "dirty": {"1": True, "true": True, "0": False, "false": False}.get(dirty),
               "dirty_paths": [], "source": "environment (ALIGNFUSE_GIT_COMMIT)"}
        if head and head != env_head:
            out["git_saw"] = {"commit": head, "dirty_paths": paths[:50]}
        return out
    if head:
        return {"commit": head, "dirty": bool(paths), "dirty_paths": paths[:50],
                "source": "git"}
    return {"commit": None, "dirty": None, "dirty_paths": [],
            "source": "unknown: no git checkout and ALIGNFUSE_GIT_COMMIT unset"}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> tuple[str | None, str | None]:
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, "nvidia-smi not found"
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"nvidia-smi failed: {exc}"
    lines = out.stdout.strip().splitlines()
    return (lines[0].strip(), None) if out.returncode == 0 and lines else (None, out.stderr[-300:])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "memory_bytes": props.total_memory,
                "l2_bytes": getattr(props, "L2_cache_size", None)}
    return {"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads(),
            "cores": os.cpu_count()}


def environment(device: torch.device, argv: list[str] | None = None) -> dict:
    argv = list(sys.argv if argv is None else argv)
    driver, driver_why = _driver()
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # pragma: no cover - triton is a core dependency
        triton_version = None
    return {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", "bench",
                                                     *argv[1:]]),
        "device": device_info(device),
        "host": {"platform": platform.platform(), "cpu": _cpu_name(), "cores": os.cpu_count()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton_version,
            "cuda": torch.version.cuda,
            "driver": driver,
            "driver_reason": driver_why,
            "transformers": _version("transformers"),
            "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
            "cut_cross_entropy": _version("cut-cross-entropy"),
            "alignfuse": _version("alignfuse"),
        },
        "alignfuse": commit(),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }
