"""Helpers shared by the suites: lazy alignfuse ops, optional baselines, random inputs.

The alignfuse ops are imported lazily and by name, so a suite whose op has not landed yet
records its contenders as skipped ("not yet implemented") instead of failing to import; an
import that fails for another reason (a broken build) is recorded with its error.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

def alignfuse_op(module: str, name: str) -> Callable | None:
    """`alignfuse.<module>.<name>`, or None when it cannot be had here (`op_unavailable`
    says why)."""
    try:
        return getattr(importlib.import_module(f"alignfuse.{module}"), name, None)
    except ImportError:
        return None


def op_unavailable(module: str, name: str) -> str | None:
    """Why `alignfuse.<module>.<name>` cannot be had, or None. An import that fails is not
    "not implemented yet": its error is kept (a failed or timed-out build shows here)."""
    try:
        mod = importlib.import_module(f"alignfuse.{module}")
    except ImportError as exc:
        text = f"{type(exc).__name__}: {exc}".strip()
        return (f"alignfuse.{module}.{name} cannot be imported here "
                f"({text[:400]}{' ...' if len(text) > 400 else ''})")
    if getattr(mod, name, None) is None:
        return f"alignfuse.{module}.{name} is not implemented yet in this checkout"
    return None


def backend_unavailable(op: str, backend: str, device: torch.device,
                        module: str = "kernels") -> str | None:
    """Why `alignfuse.kernels.<op>(backend=...)` cannot run on `device`, or None."""
    why = op_unavailable(module, op)
    if why:
        return why
    from alignfuse.kernels import BackendUnavailable, resolve

    try:
        resolve(op, backend, device)
    except BackendUnavailable as exc:
        return str(exc)
    except KeyError:
        return f"no backend registered for {op!r}"
    return None


def package_unavailable(module: str, dist: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return (f"{dist} is not installed here ({exc}); install the bench extra: "
                f"pip install '.[bench]' (or --no-deps {dist} to keep this torch)")
    return None


def triton_baseline_unavailable(module: str, dist: str, device: torch.device) -> str | None:
    """A Triton-based baseline runs on CUDA, or on CPU under the Triton interpreter."""
    why = package_unavailable(module, dist)
    if why:
        return why
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (f"{dist} runs Triton kernels: it needs CUDA tensors, or the Triton "
                "interpreter (TRITON_INTERPRET=1) on CPU")
    return None


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(1_000_003 * seed + 17)


def randn(shape, *, device, dtype, gen, scale: float = 1.0, requires_grad: bool = False):
    """Random normal (never zeros: METHOD.md), made in float32 then cast."""
    x = torch.randn(shape, device=device, generator=gen, dtype=torch.float32) * scale
    return x.to(dtype).requires_grad_(requires_grad)


def reference_dtype(device: torch.device) -> torch.dtype:
    """float64 on CPU (small sizes); float32 on GPU (float64 matmuls would dominate the run)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def tolerance(dtype: torch.dtype) -> float:
    """Relative-norm tolerance against the higher-precision reference (METHOD.md's bands)."""
    return {torch.float32: 1e-3, torch.float64: 1e-9}.get(dtype, 2e-2)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
