"""Supervised fine-tuning on packed sequences: the token-mean negative log-likelihood of the
completion tokens (prompt tokens carry `ignore_index` targets, so they are never predicted)."""

from __future__ import annotations

import torch

from .base import Algorithm


class SFT(Algorithm):
    """loss = -sum_i logp_i / #target tokens, over the micro-batch's target tokens.

    Units are target tokens: with `loss_scale = tokens(batch) / tokens(all micro-batches)`
    accumulation equals one big batch.
    """

    def num_units(self, batch) -> int:
        return int(batch.loss_mask.sum())

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        logps = self.policy_token_logps(batch)
        tokens = self.num_units(batch)
        if tokens == 0:
            raise ValueError("the batch has no target tokens (every target is ignore_index): "
                             "nothing to learn; check prompt_lengths")
        nll = -logps.sum() / tokens  # ignored targets have logp 0
        return nll, {"tokens": float(batch.num_tokens), "perplexity": float(nll.detach().exp())}
