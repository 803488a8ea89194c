"""Supervised fine-tuning on packed sequences: the token-mean negative log-likelihood of the
completion tokens (prompt tokens carry `ignore_index` targets, so they are never predicted)."""

from __future__ import annotations

import torch

from .base import Algorithm


class SFT(Algorithm):
    """loss = -sum_i logp_i / #target tokens, over the micro-batch's target tokens.

    Units are target tokens: with `loss_scale = tokens(batch) / tokens(all micro-batches)`
    accumulation equals one big batch. A micro-batch without target tokens (e.g. a prompt
    truncated to fill it) has weight 0: its loss is 0 and it adds nothing.
    """

    def num_units(self, batch) -> int:
        return int(batch.loss_mask.sum())

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        logps = self.policy_token_logps(batch)
        tokens = self.num_units(batch)
        # Ignored targets have logp 0. Zero tokens: a zero loss that still reaches every
        # parameter (DDP/FSDP wait for a gradient from each rank); the caller, who sees the
        # whole optimizer step, decides whether no targets at all is an error.
        nll = -logps.sum() / max(tokens, 1)
        return nll, {"tokens": float(batch.num_tokens), "perplexity": float(nll.detach().exp())}
