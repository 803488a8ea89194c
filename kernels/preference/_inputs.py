"""Argument checks for sequence-level losses (inputs `[S]`), on top of `kernels.checks`.

Every tensor is checked for dtype, shape, device and emptiness before any kernel runs. The
NaN/inf check of all inputs costs one host sync in total (not one per tensor), because a loss
is called every step.
"""

from __future__ import annotations

import math

import torch

from .. import checks


def sequence_tensors(**named: torch.Tensor) -> None:
    """Check floating 1-D `[S]` tensors with one shape and device; the first one names the batch.

    Raises TypeError for a non-tensor or a non-floating dtype, ValueError (naming the argument)
    for a wrong shape or device, an empty batch, or a NaN/inf value.
    """
    (first_name, first), *rest = named.items()
    checks.floating(first_name, first, ndim=1)
    checks.non_empty(first_name, first)
    for name, value in rest:
        checks.floating(name, value)
        checks.same_shape(name, value, first_name, first)
        checks.same_device(name, value, first_name, first)
    all_finite(**named)


def all_finite(**named: torch.Tensor) -> None:
    """ValueError naming the first argument that holds a NaN or inf (one host sync for all)."""
    flags = torch.stack([torch.isfinite(v).all() for v in named.values()]).tolist()
    for (name, value), ok in zip(named.items(), flags):
        if not ok:
            checks.finite(name, value)  # raises with the count of bad values


def lengths(name: str, value, like_name: str, like: torch.Tensor) -> torch.Tensor:
    """Completion lengths `[S]` (integer or floating, >= 0) as floats clamped at 1, as TRL does.

    A zero-length completion has a summed log-prob of 0, so clamping keeps its ratio 0 instead
    of dividing 0 by 0.
    """
    checks.tensor(name, value, ndim=1)
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must be an integer or floating tensor, got {value.dtype}")
    checks.same_shape(name, value, like_name, like)
    checks.same_device(name, value, like_name, like)
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    value = value.to(dtype)
    if not bool((torch.isfinite(value) & (value >= 0)).all()):  # one host sync
        checks.finite(name, value)
        raise ValueError(f"{name} must be >= 0 (token counts), got a negative entry")
    return value.clamp(min=1.0)


def scalar_param(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A python number in a range, as float. Bounds are inclusive unless *_open."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {lo or '(-inf'}, {hi or 'inf)'}, got {value!r}")
    return value
