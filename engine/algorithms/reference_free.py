"""Preference optimization without a reference model: ORPO and SimPO (formulas and papers in
`alignfuse.kernels.preference.reference_free`). Pairs are packed as for DPO."""

from __future__ import annotations

import torch
from torch import nn

from alignfuse.kernels.preference import orpo_loss, simpo_loss

from .base import Algorithm, loss_token_counts, split_pairs
from .dpo import preference_metrics


class _PairwiseReferenceFree(Algorithm):
    def num_units(self, batch) -> int:
        return batch.num_seqs // 2

    def pair_logps(self, batch, who: str):
        """`(chosen_sum, rejected_sum, chosen_len, rejected_len)`, each `[P]`."""
        chosen, rejected = split_pairs(batch, who)
        logps = self.policy_sequence_logps(batch)
        lengths = loss_token_counts(batch)
        return logps[chosen], logps[rejected], lengths[chosen], lengths[rejected]


class ORPO(_PairwiseReferenceFree):
    """ORPO step: chosen NLL + beta * odds-ratio term, on length-averaged log-probs."""

    def __init__(self, model: nn.Module, *, beta: float = 0.1, temperature: float = 1.0):
        self.check_options(beta=beta)
        super().__init__(model, temperature=temperature)
        self.beta = beta

    @staticmethod
    def check_options(*, beta) -> None:
        """Raises what `orpo_loss` raises for these options (as `DPO.check_options`)."""
        logps = torch.full((1,), -1.0)
        orpo_loss(logps, logps, -logps, beta=beta, backend="torch")

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        cs, rs, cl, rl = self.pair_logps(batch, "ORPO")
        chosen_avg, rejected_avg = cs / cl.clamp(min=1), rs / rl.clamp(min=1)
        losses, log_odds = orpo_loss(chosen_avg, rejected_avg, -chosen_avg, beta=self.beta)
        metrics = preference_metrics(self.beta * chosen_avg, self.beta * rejected_avg)
        metrics["log_odds"] = float(log_odds.mean())
        return losses.mean(), metrics


class SimPO(_PairwiseReferenceFree):
    """SimPO step: -log sigmoid(beta * (avg logp_w - avg logp_l) - gamma)."""

    def __init__(self, model: nn.Module, *, beta: float = 2.0, gamma: float = 0.5,
                 label_smoothing: float = 0.0, temperature: float = 1.0):
        self.check_options(beta=beta, gamma=gamma, label_smoothing=label_smoothing)
        super().__init__(model, temperature=temperature)
        self.beta, self.gamma, self.label_smoothing = beta, gamma, label_smoothing

    @staticmethod
    def check_options(*, beta, gamma, label_smoothing) -> None:
        """Raises what `simpo_loss` raises for these options (as `DPO.check_options`)."""
        logps, lengths = torch.full((1,), -1.0), torch.ones(1)
        simpo_loss(logps, logps, lengths, lengths, beta=beta, gamma=gamma,
                   label_smoothing=label_smoothing, backend="torch")

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        cs, rs, cl, rl = self.pair_logps(batch, "SimPO")
        losses, chosen_rewards, rejected_rewards = simpo_loss(
            cs, rs, cl, rl, beta=self.beta, gamma=self.gamma,
            label_smoothing=self.label_smoothing)
        return losses.mean(), preference_metrics(chosen_rewards, rejected_rewards)
