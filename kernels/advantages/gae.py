"""Generalized Advantage Estimation (Schulman et al., https://arxiv.org/abs/1506.02438).

Per sequence, backwards over its valid tokens (mask = 1), as verl's masked
`compute_gae_advantage_return`:

    delta_t = r_t + gamma * V_next - V_t          V_next: the value of the next valid token
                                                  of the sequence, 0 after the last one
    A_t     = delta_t + gamma * lam * A_next      A_next: the advantage of that next token
    R_t     = A_t + V_t                           (the value target)

Masked tokens (e.g. tool observations inside a response) take no part: the recursion
skips them, carrying V_next and A_next across. Their outputs are 0. With `whiten=True`
the advantages are standardized over all valid tokens of the batch (verl's masked_whiten:
(A - mean) / sqrt(var + 1e-8), Bessel-corrected var); the returns are not.

Advantages and returns are targets: the outputs carry no gradient.
"""

from __future__ import annotations

import torch

from .. import checks
from ..backends import dispatch, register
from ..layout import TokenLayout, token_layout

WHITEN_EPS = 1e-8


@register("gae", "torch")
def _gae_torch(rewards: torch.Tensor, values: torch.Tensor, layout: TokenLayout, gamma: float,
               lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    # Python floats: a readable scalar loop that is still fast enough for CPU batches
    r = rewards.detach().to(dtype).tolist()
    v = values.detach().to(dtype).tolist()
    valid = (layout.mask > 0).tolist()
    advantages = [0.0] * len(r)
    cu = layout.cu_seqlens.tolist()
    for start, end in zip(cu[:-1], cu[1:]):
        next_value, next_advantage = 0.0, 0.0
        for t in reversed(range(start, end)):
            if not valid[t]:
                continue
            delta = r[t] + gamma * next_value - v[t]
            next_advantage = delta + gamma * lam * next_advantage
            next_value = v[t]
            advantages[t] = next_advantage
    advantages = torch.tensor(advantages, dtype=dtype, device=rewards.device)
    returns = torch.where(layout.mask > 0, advantages + values.detach().to(dtype), 0.0)
    return advantages, returns


@register("gae", "triton")
def _gae_triton(rewards: torch.Tensor, values: torch.Tensor, layout: TokenLayout, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_gae import gae_forward

    adv, ret = gae_forward(rewards, values, layout.mask, layout.cu_seqlens, gamma, lam)
    if torch.float64 in (rewards.dtype, values.dtype):
        return adv.double(), ret.double()
    return adv, ret


def _whiten(advantages: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    count = valid.sum()
    if count < 2:
        return torch.zeros_like(advantages)
    selected = advantages[valid]
    whitened = (advantages - selected.mean()) * torch.rsqrt(selected.var() + WHITEN_EPS)
    return torch.where(valid, whitened, 0.0)


def gae(rewards: torch.Tensor, values: torch.Tensor, *, mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None, gamma: float = 1.0, lam: float = 1.0,
        whiten: bool = False, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns per token.

    rewards, values: padded `[B, T]` (with `mask`) or packed `[N]` (with `cu_seqlens` int32
        `[S+1]`, optionally `mask`), floating. gamma, lam in [0, 1].
    Returns `(advantages, returns)` shaped like `rewards`, float32 (float64 inputs stay
    float64), 0 at masked tokens, without gradient.
    """
    checks.floating("rewards", rewards)
    checks.non_empty("rewards", rewards)
    layout = token_layout(rewards, mask=mask, cu_seqlens=cu_seqlens, name="rewards")
    checks.floating("values", values)
    checks.same_device("values", values, "rewards", rewards)
    flat_rewards = layout.flat("rewards", rewards)
    flat_values = layout.flat("values", values)
    # NaN/inf at a counted token poisons every advantage before it; at a masked one (padding)
    # it is never read. One device sync for both counts.
    valid = layout.mask > 0
    bad = torch.stack([(~torch.isfinite(flat_rewards) & valid).sum(),
                       (~torch.isfinite(flat_values) & valid).sum()]).tolist()
    for name, count in zip(("rewards", "values"), bad):
        if count:
            raise ValueError(f"{name} contains {count} NaN or inf value(s) at valid tokens")
    for name, x in (("gamma", gamma), ("lam", lam)):
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not 0 <= x <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {x!r}")
    advantages, returns = dispatch("gae", backend, rewards.device, flat_rewards, flat_values,
                                   layout, float(gamma), float(lam))
    if whiten:
        advantages = _whiten(advantages, layout.mask > 0)
    return layout.unflat(advantages), layout.unflat(returns)
