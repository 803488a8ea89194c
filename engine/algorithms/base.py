"""What every algorithm object shares: `step` = loss, scaled backward, float metrics.

Gradient accumulation: each micro-batch's loss is a mean over its own units (pairs, tokens,
completions). When micro-batches hold different numbers of units, the mean of the means is
not the mean over the whole batch; pass `loss_scale = units(batch) / units(whole batch)`
(`num_units` counts them) and the accumulated gradient equals that of one big batch. The
ready loop (`engine/loop.py`) does this, across data-parallel ranks too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..forward import sequence_logprobs, token_logprobs
from alignfuse.kernels import segment_sum


class Algorithm:
    """Base class: subclasses implement `loss(batch) -> (loss, metrics)` and `num_units`."""

    def __init__(self, model: nn.Module, *, temperature: float = 1.0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
        self.model = model
        self.temperature = temperature

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def num_units(self, batch) -> int:
        """How many units the batch's loss averages over (the weight of the batch)."""
        raise NotImplementedError

    def step(self, batch, *, loss_scale: float = 1.0) -> dict[str, float]:
        """Forward and backward of one micro-batch; gradients accumulate in the parameters.

        loss_scale: multiplies the loss before backward (see the module docstring).
        Returns float metrics, including `loss` (unscaled) and `units`.
        """
        loss, metrics = self.loss(batch)
        (loss * loss_scale).backward()
        value = float(loss.detach())  # read after backward: its sync then costs nothing
        if not math.isfinite(value):
            # Raised before any optimizer step: the weights are intact (this micro-batch's
            # gradients are not; zero them to go on).
            raise FloatingPointError(
                f"{type(self).__name__} loss is {value} on this micro-batch: a NaN or inf in "
                "its inputs (advantages, rewards, reference log-probs) or in the model's "
                "output; nothing was applied to the weights")
        return {"loss": value, "units": float(self.num_units(batch)), **metrics}

    # helpers shared by the subclasses -----------------------------------------------------

    def policy_sequence_logps(self, batch) -> torch.Tensor:
        """`[S]` summed target log-probs of each sequence under the trained model."""
        return sequence_logprobs(self.model, batch, temperature=self.temperature)

    def policy_token_logps(self, batch) -> torch.Tensor:
        return token_logprobs(self.model, batch, temperature=self.temperature)


def loss_token_counts(batch) -> torch.Tensor:
    """`[S]` float32: how many target tokens each sequence has (its completion length)."""
    return segment_sum(batch.loss_mask.to(torch.float32), batch.cu_seqlens)


def check_max_grad_norm(value: float | None) -> None:
    """max_grad_norm > 0 or None: torch's clip multiplies the gradient by max_norm / norm, so
    a negative value flips it (training ascends the loss) and 0 stops training."""
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {value!r}: a "
                         "negative norm flips the gradient, 0 stops training")


def check_reference(model: nn.Module, ref_model: nn.Module | None) -> None:
    """A reference that is the policy itself (or wraps the same model) moves with every
    update: the implicit rewards and the KL stay 0 and the loss never leaves its start."""
    from ..forward import unwrap_model
    from ..lora import BaseReference

    if isinstance(ref_model, BaseReference):
        return  # the policy's base with its adapters off: it checked that the base is frozen
    if ref_model is not None and unwrap_model(ref_model) is unwrap_model(model):
        raise ValueError("ref_model is the policy model itself; pass a frozen copy made "
                         "before training (copy.deepcopy(model).eval().requires_grad_(False))")


def reference_sequence_logps(batch, ref_model: nn.Module | None, temperature: float,
                             who: str) -> torch.Tensor:
    """`[S]` reference log-probs: from `ref_model` (no grad), or precomputed in
    `batch.extras["reference_logps"]` (see `forward.precompute_reference_logps`)."""
    if ref_model is not None:
        with torch.no_grad():
            return sequence_logprobs(ref_model, batch, temperature=temperature)
    extras = getattr(batch, "extras", None) or {}
    if "reference_logps" not in extras:
        raise ValueError(f"{who} needs reference log-probs: pass ref_model=, or pack the "
                         "batches with extras={'reference_logps': precompute_reference_logps(...)}")
    return extras["reference_logps"].to(torch.float32)


def split_pairs(batch, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices `(chosen [P], rejected [P])` of a batch packed from
    `[chosen0, rejected0, chosen1, ...]` with groups `[0, 0, 1, 1, ...]`: chosen sequences
    have an even original index, and each is followed by its rejected partner."""
    index = batch.seq_index
    if index.numel() % 2:
        raise ValueError(f"{who} needs chosen/rejected pairs in each batch, got "
                         f"{index.numel()} sequences; pack with groups=[0, 0, 1, 1, ...]")
    chosen = torch.arange(0, index.numel(), 2, device=index.device)
    rejected = chosen + 1
    if bool((index[chosen] % 2 != 0).any()) or bool((index[rejected] != index[chosen] + 1).any()):
        raise ValueError(f"{who} batches must hold pairs packed from [chosen0, rejected0, "
                         "chosen1, ...] with groups [0, 0, 1, ...] (a pair was split or reordered)")
    return chosen, rejected

