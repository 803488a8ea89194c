"""Argument checks shared by every op. Each error names the argument and what was expected.

Nothing silently broadcasts: ops call these before any kernel runs.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value, *, dtypes: Sequence[torch.dtype] | None = None,
           ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {value.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            raise ValueError(f"{name} must be {' or '.join(f'{d}-D' for d in allowed)}, "
                             f"got shape {tuple(value.shape)}")
    return value


def floating(name: str, value, **kw) -> torch.Tensor:
    return tensor(name, value, dtypes=FLOAT_DTYPES, **kw)


def integer(name: str, value, **kw) -> torch.Tensor:
    return tensor(name, value, dtypes=(torch.int32, torch.int64, torch.int16, torch.uint8), **kw)


def same_shape(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.shape != ref.shape:
        raise ValueError(f"{name} must have the same shape as {ref_name} "
                         f"{tuple(ref.shape)}, got {tuple(value.shape)}")


def same_device(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}; "
                         "move them to the same device")


def finite(name: str, value: torch.Tensor) -> None:
    if value.numel() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} contains {bad} NaN or inf value(s)")


def non_empty(name: str, value: torch.Tensor) -> None:
    if value.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(value.shape)}); nothing to compute")


def positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def non_negative(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def finite_number(name: str, value: float) -> float:
    """Any finite number (a loss coefficient: NaN or inf would make the loss NaN or inf)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (isinstance(value, int) or math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def one_of(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def cu_seqlens(name: str, value, total: int, device: torch.device | None = None) -> torch.Tensor:
    """Validate flash-attn style cumulative lengths `[S+1]`: 0 first, non-decreasing, `total` last."""
    integer(name, value, ndim=1)
    if value.numel() < 2:
        raise ValueError(f"{name} must have at least 2 entries [0, ..., N], got {value.numel()}")
    if device is not None:
        same_device(name, value, "the token tensor", torch.empty(0, device=device))
    host = value.detach().to("cpu", torch.int64)
    if int(host[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(host[0])}")
    if bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing")
    if int(host[-1]) != total:
        raise ValueError(f"{name} must end at the number of tokens {total}, got {int(host[-1])}")
    return value
