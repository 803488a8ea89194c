"""Direct Preference Optimization on packed pairs (Rafailov et al. 2023,
https://arxiv.org/abs/2305.18290), with every `loss_type` of `alignfuse.kernels` dpo_loss.

The chosen and rejected completions of a pair are packed into ONE forward (packed from
`[chosen0, rejected0, chosen1, ...]` with groups `[0, 0, 1, 1, ...]`); the reference
log-probs come from a frozen second model, or precomputed once and stored with the dataset
(`batch.extras["reference_logps"]`).
"""

from __future__ import annotations

import torch
from torch import nn

from alignfuse.kernels.preference import dpo_loss
from alignfuse.kernels.preference.dpo import LENGTH_NORMALIZED

from .base import (Algorithm, check_reference, loss_token_counts, reference_sequence_logps,
                   split_pairs)


class DPO(Algorithm):
    """DPO step: loss = mean over the batch's pairs of `dpo_loss(...)`. Units are pairs.

    model: the policy (HF causal LM, optionally DDP/FSDP2/PEFT wrapped).
    ref_model: frozen reference (`BaseReference(model)`: a PEFT policy's base), or None to
        read `batch.extras["reference_logps"]`.
    beta, loss_type, label_smoothing: as in `alignfuse.kernels.dpo_loss`.
    """

    def __init__(self, model: nn.Module, ref_model: nn.Module | None = None, *,
                 beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 temperature: float = 1.0):
        self.check_options(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        check_reference(model, ref_model)
        super().__init__(model, temperature=temperature)
        self.ref_model = ref_model
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing

    @staticmethod
    def check_options(*, beta, loss_type, label_smoothing) -> None:
        """Raises what `dpo_loss` raises for these options (its own checks, run on one
        dummy pair): a bad value stops the caller when the object is made, or a config
        when it is read, not at the first step."""
        logps, lengths = torch.full((1,), -1.0), torch.ones(1)
        extra = ({"chosen_lengths": lengths, "rejected_lengths": lengths}
                 if loss_type in LENGTH_NORMALIZED else {})
        dpo_loss(logps, logps, logps, logps, beta=beta, loss_type=loss_type,
                 label_smoothing=label_smoothing, backend="torch", **extra)

    def num_units(self, batch) -> int:
        return batch.num_seqs // 2

    def pair_logps(self, batch) -> tuple[torch.Tensor, ...]:
        """`(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_len, rejected_len)`,
        each `[P]`: the summed completion log-probs of each pair and completion lengths."""
        chosen, rejected = split_pairs(batch, "DPO")
        policy = self.policy_sequence_logps(batch)
        ref = reference_sequence_logps(batch, self.ref_model, self.temperature, "DPO")
        lengths = loss_token_counts(batch)
        return (policy[chosen], policy[rejected], ref[chosen], ref[rejected],
                lengths[chosen], lengths[rejected])

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        pc, pr, rc, rr, lc, lr = self.pair_logps(batch)
        lengths = ({"chosen_lengths": lc, "rejected_lengths": lr}
                   if self.loss_type in LENGTH_NORMALIZED else {})
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            pc, pr, rc, rr, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, **lengths)
        metrics = preference_metrics(chosen_rewards, rejected_rewards)
        # Does the policy itself rank the chosen completion above the rejected one?
        metrics["policy/accuracy"] = float((pc.detach() > pr.detach()).float().mean())
        metrics["logps/chosen"] = float(pc.detach().mean())
        metrics["logps/rejected"] = float(pr.detach().mean())
        return losses.mean(), metrics


def preference_metrics(chosen_rewards: torch.Tensor,
                       rejected_rewards: torch.Tensor) -> dict[str, float]:
    """TRL's reward metrics: mean rewards, accuracy (chosen > rejected) and margin."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {"rewards/chosen": float(c.mean()), "rewards/rejected": float(r.mean()),
            "rewards/accuracy": float((c > r).float().mean()),
            "rewards/margin": float((c - r).mean())}
