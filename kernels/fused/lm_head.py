"""Argument checks and gradient needs of the LM-head inputs (hidden, weight, bias, targets)
shared by the fused losses. The target and temperature checks are linear_logprobs' own."""

from __future__ import annotations

import torch

from .. import checks
from ..logprobs import _check_targets, _check_temperature, _same_dtype


def check_lm_head(hidden, weight, bias, targets, ignore_index, temperature,
                  token_dims: int) -> tuple[int, torch.Tensor]:
    """Validate `hidden [..., H]`, `weight [V, H]`, `bias [V]`, `targets [...]` as
    linear_logprobs does. Returns (H, targets flattened to `[N]` int64)."""
    checks.floating("hidden", hidden)
    if hidden.dim() < 1:
        raise ValueError("hidden must be [..., H], got a 0-D tensor")
    H = hidden.shape[-1]
    checks.floating("weight", weight, ndim=2)
    checks.same_device("weight", weight, "hidden", hidden)
    _same_dtype("weight", weight, "hidden", hidden)
    if weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, H] with V >= 1 and H={H} (the last dim of "
                         f"hidden), got shape {tuple(weight.shape)}")
    if bias is not None:
        checks.floating("bias", bias, ndim=1)
        checks.same_device("bias", bias, "hidden", hidden)
        _same_dtype("bias", bias, "hidden", hidden)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [V] with V={weight.shape[0]} (rows of weight), "
                             f"got shape {tuple(bias.shape)}")
    flat = _check_targets(targets, hidden.shape[:-1], "hidden[..., H]", hidden,
                          weight.shape[0], ignore_index)
    _check_temperature(temperature)
    return H, flat


def needed_grads(hidden, weight, bias) -> tuple[bool, bool, bool]:
    """Which of (hidden, weight, bias) autograd will ask for: the fused forward skips the
    gradient GEMMs of the others (all of them under torch.no_grad)."""
    on = torch.is_grad_enabled()
    return (on and hidden.requires_grad, on and weight.requires_grad,
            on and bias is not None and bias.requires_grad)
