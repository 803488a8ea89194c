"""How per-token losses become one scalar: verl's `loss_agg_mode`s, on the flat token layout.

With m_t the token mask, L_t the per-token loss, n_s = sum_{t in s} m_t the valid tokens of
sequence s, N = sum_s n_s, S' the number of sequences with n_s > 0 and H the horizon:

- "token-mean":              sum_t m_t L_t / N
- "seq-mean-token-mean":     (1/S') sum_s (sum_{t in s} m_t L_t) / n_s
- "seq-mean-token-sum":      (1/S') sum_s  sum_{t in s} m_t L_t
- "seq-mean-token-sum-norm": (1/S') sum_s (sum_{t in s} m_t L_t) / H     (Dr. GRPO,
  https://arxiv.org/abs/2503.20783, TRL's loss_type="dr_grpo": a constant normaliser,
  so no length bias). H defaults to max_s n_s, the most valid tokens of any sequence, which
  is the same for both layouts (the padded width T or a packed row's prompt tokens would
  make the layouts disagree); pass `horizon=` (e.g. the max response length) to keep it
  constant across steps, as the engine does.

Design decisions (documented because verl has varied between versions):
- Sequences with no valid token are left out of the sequence mean (S' not S), so a packed
  batch that contains an empty sequence gives the same loss as the padded one without it.
- seq-mean-token-sum-norm divides by S' as its name and the Dr. GRPO paper say; older verl
  releases divided the batch sum by H only.
- A batch with no valid token at all gives a loss of 0 (and zero gradients), not NaN.

Every mode is linear in the per-token losses, `loss = sum_s w_s sum_{t in s} m_t L_t`, so
d loss / d L_t = m_t w_s: the fused kernels get the weights `w_s` before they run and write
the final gradient in the same pass.
"""

from __future__ import annotations

import torch

from .. import checks
from ..layout import TokenLayout

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                  "seq-mean-token-sum-norm")


def resolve_horizon(layout: TokenLayout, horizon: float | None, loss_agg: str) -> float:
    """H of seq-mean-token-sum-norm: the given value, else the most valid tokens of any
    sequence (at least 1), the same whichever layout carries the batch. The other modes do
    not read H: its default is then not computed (that would cost a device sync per call)."""
    if horizon is not None:
        return checks.positive("horizon", horizon)
    if loss_agg != "seq-mean-token-sum-norm":
        return 1.0
    counts = valid_counts(layout)
    return float(max(int(counts.max()), 1)) if counts.numel() else 1.0


def valid_counts(layout: TokenLayout) -> torch.Tensor:
    """n_s: the number of valid tokens of each sequence, `[S]` float32."""
    counts = torch.zeros(layout.num_seqs, device=layout.mask.device, dtype=torch.float32)
    return counts.index_add_(0, layout.seq_ids, layout.mask)


def sequence_weights(counts: torch.Tensor, loss_agg: str, horizon: float) -> torch.Tensor:
    """w_s with loss = sum_s w_s * (masked token sum of sequence s), `[S]` float32."""
    checks.one_of("loss_agg", loss_agg, LOSS_AGG_MODES)
    has_tokens = counts > 0
    num_seqs = has_tokens.sum().clamp(min=1).to(torch.float32)
    if loss_agg == "token-mean":
        weight = 1.0 / counts.sum().clamp(min=1)
        return torch.where(has_tokens, weight, 0.0)
    if loss_agg == "seq-mean-token-mean":
        return torch.where(has_tokens, 1.0 / (num_seqs * counts.clamp(min=1)), 0.0)
    if loss_agg == "seq-mean-token-sum":
        return torch.where(has_tokens, 1.0 / num_seqs, 0.0)
    return torch.where(has_tokens, 1.0 / (num_seqs * horizon), 0.0)


def aggregate(token_loss: torch.Tensor, layout: TokenLayout, loss_agg: str,
              horizon: float) -> torch.Tensor:
    """The readable reference of the formulas above. token_loss: `[N]`; returns a scalar."""
    checks.one_of("loss_agg", loss_agg, LOSS_AGG_MODES)
    valid = layout.mask > 0
    # where, not multiply: a masked token may hold inf/NaN (padding) and 0 * inf = NaN
    masked = torch.where(valid, token_loss, 0.0)
    seq_sum = torch.zeros(layout.num_seqs, dtype=token_loss.dtype, device=token_loss.device)
    seq_sum = seq_sum.index_add(0, layout.seq_ids, masked)
    counts = valid_counts(layout).to(token_loss.dtype)
    has_tokens = counts > 0
    num_seqs = has_tokens.sum().clamp(min=1)
    if loss_agg == "token-mean":
        return seq_sum.sum() / counts.sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        return (seq_sum / counts.clamp(min=1)).sum() / num_seqs
    if loss_agg == "seq-mean-token-sum":
        return seq_sum.sum() / num_seqs
    return seq_sum.sum() / (num_seqs * horizon)


def masked_token_mean(values: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Mean over valid tokens (0 when there are none), for metrics."""
    valid = layout.mask > 0
    total = torch.where(valid, values, 0.0).sum()
    return total / valid.sum().clamp(min=1)
