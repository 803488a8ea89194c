"""Backend registry: one place that maps each op to its torch, triton and cuda implementations.

Every public op takes `backend=` ("auto", "torch", "triton", "cuda"):
- "torch" is the readable reference and the specification; it always runs.
- "triton" runs on CUDA tensors, and on CPU tensors when the Triton interpreter is on
  (`TRITON_INTERPRET=1` set before triton is imported; the tests do this).
- "cuda" runs the compiled module `alignfuse.kernels._cuda` on CUDA tensors.
- "auto" picks the fastest correct backend for the tensors' device: the op's registered
  preference order on CUDA, "torch" on CPU. The environment variable `ALIGNFUSE_BACKEND`
  overrides "auto" for every op that has that backend (an explicit backend= argument still
  wins; ops without it keep "auto").

An implementation is registered with a decorator next to the kernel it wraps:

    @register("dpo_loss", "triton")
    def _dpo_loss_triton(...): ...

Asking for a backend that cannot run raises `BackendUnavailable` saying why.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Iterable

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto", *BACKENDS)

# op name -> backend name -> implementation
_REGISTRY: dict[str, dict[str, Callable]] = {}
# op name -> preferred backends on CUDA, fastest first
_CUDA_PREFERENCE: dict[str, tuple[str, ...]] = {}
_DEFAULT_CUDA_PREFERENCE = ("cuda", "triton", "torch")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this op on these tensors."""


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` as the `backend` implementation of `op`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def decorator(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = fn
        return fn

    return decorator


def set_cuda_preference(op: str, order: Iterable[str]) -> None:
    """Record which backend "auto" should try first for `op` on CUDA (decided by benchmark)."""
    order = tuple(order)
    for name in order:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r} in preference for {op!r}")
    _CUDA_PREFERENCE[op] = order


def registered(op: str) -> dict[str, Callable]:
    return dict(_REGISTRY.get(op, {}))


# ---------------------------------------------------------------------------------------
# Availability of each backend (cached: these do not change within a process).


@functools.lru_cache(maxsize=None)
def triton_status() -> str | None:
    """None when Triton can be used, else why not."""
    try:
        importlib.import_module("triton")
    except Exception as exc:  # pragma: no cover - triton is a core dependency
        return f"triton is not importable ({exc})"
    return None


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def cuda_module():
    """The compiled CUDA module, or None."""
    try:
        return importlib.import_module("alignfuse.kernels._cuda")
    except ImportError:
        return None


def cuda_module_status() -> str | None:
    """None when the compiled CUDA module is importable, else why not."""
    if cuda_module() is not None:
        return None
    return ("module not built (no nvcc at install time, or ALIGNFUSE_BUILD_CUDA=0); "
            "reinstall with nvcc on PATH")


def _why_unavailable(op: str, backend: str, device: torch.device) -> str | None:
    impls = _REGISTRY.get(op, {})
    if backend not in impls:
        have = ", ".join(sorted(impls)) or "none"
        return f"op {op!r} has no {backend} implementation (available: {have})"
    if backend == "torch":
        return None
    if backend == "triton":
        why = triton_status()
        if why:
            return why
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreter_on():
            return None
        return (f"tensors are on {device.type}; Triton needs CUDA tensors, or the Triton "
                "interpreter for CPU tensors (set TRITON_INTERPRET=1 before importing triton)")
    if backend == "cuda":
        why = cuda_module_status()
        if why:
            return why
        if device.type != "cuda":
            return f"tensors are on {device.type}, the cuda backend needs CUDA tensors"
        return None
    raise AssertionError(backend)


def available(op: str, backend: str, device: torch.device | str) -> bool:
    return _why_unavailable(op, backend, torch.device(device)) is None


def resolve(op: str, backend: str, device: torch.device | str) -> tuple[str, Callable]:
    """Return `(backend_name, implementation)` for `op` on `device`.

    Raises ValueError for an unknown backend name, BackendUnavailable when the named
    backend cannot run here.
    """
    device = torch.device(device)
    if backend not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {backend!r}")
    if op not in _REGISTRY:
        raise KeyError(f"no implementation registered for op {op!r}")
    if backend == "auto":
        forced = os.environ.get("ALIGNFUSE_BACKEND", "").strip().lower()
        if forced not in ("", "auto") and forced not in BACKENDS:
            raise ValueError(f"ALIGNFUSE_BACKEND must be one of {_CHOICES}, got {forced!r}")
        if forced in BACKENDS and forced in _REGISTRY[op]:
            # The override applies to every op that has that backend; ops without one
            # (e.g. torch-only losses) keep "auto" rather than failing a whole run.
            backend = forced
        else:
            order = (_CUDA_PREFERENCE.get(op, _DEFAULT_CUDA_PREFERENCE)
                     if device.type == "cuda" else ("torch",))
            for name in order:
                if _why_unavailable(op, name, device) is None:
                    return name, _REGISTRY[op][name]
            return "torch", _REGISTRY[op]["torch"]
    why = _why_unavailable(op, backend, device)
    if why is not None:
        raise BackendUnavailable(f"{backend} backend for {op}: {why}")
    return backend, _REGISTRY[op][backend]


def dispatch(op: str, backend: str, device: torch.device | str, *args, **kwargs):
    """Resolve and call in one step."""
    _, fn = resolve(op, backend, device)
    return fn(*args, **kwargs)


def current_stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream, for the compiled module."""
    return torch.cuda.current_stream(device).cuda_stream


# dtype codes of csrc/cuda/registry.h (enum class DType)
_CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3,
                     torch.int32: 4, torch.int64: 5}


def cuda_dtype_code(t: torch.Tensor) -> int:
    return _CUDA_DTYPE_CODES[t.dtype]


# The input dtypes the compiled loss/advantage kernels read (csrc/cuda/*.cu).
CUDA_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cuda_kernel_inputs(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """`tensors` in the one dtype the compiled kernels read them in (their common dtype when
    they share one of CUDA_KERNEL_DTYPES, else float32: mixed dtypes, float64), contiguous
    (the kernels take raw pointers of dense buffers)."""
    dtypes = {t.dtype for t in tensors}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    if dtype not in CUDA_KERNEL_DTYPES:
        dtype = torch.float32
    return [t.to(dtype).contiguous() for t in tensors]
