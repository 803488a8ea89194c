"""What the fused losses need about their LM-head inputs beyond linear_logprobs' own checks
(`logprobs.check_linear_inputs`, reused as is): which gradients autograd will ask for."""

from __future__ import annotations

import torch


def needed_grads(hidden, weight, bias) -> tuple[bool, bool, bool]:
    """Which of (hidden, weight, bias) autograd will ask for: the fused forward skips the
    gradient GEMMs of the others (all of them under torch.no_grad)."""
    on = torch.is_grad_enabled()
    return (on and hidden.requires_grad, on and weight.requires_grad,
            on and bias is not None and bias.requires_grad)
