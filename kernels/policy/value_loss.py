"""Clipped value-function loss of PPO (verl's `compute_value_loss`, TRL's PPO trainer).

Per valid token, with v the new value prediction, v_old the rollout's value and R the return:

    v_clip = clip(v, v_old - clip, v_old + clip)
    L_t    = max((v - R)^2, (v_clip - R)^2)            ((v - R)^2 when clip is None)
    loss   = 0.5 * aggregate(L_t, loss_agg)

Gradients flow to `values` only.
"""

from __future__ import annotations

import torch

from .. import checks
from ..autograd import fused_local_grad
from ..backends import dispatch, register
from ..layout import TokenLayout, token_layout
from .aggregation import (LOSS_AGG_MODES, aggregate, masked_token_mean, resolve_horizon,
                          sequence_weights, valid_counts)
from .kl import compute_dtype


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *,
               mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
               clip: float | None = None, loss_agg: str = "token-mean",
               horizon: float | None = None,
               backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss.

    values, old_values, returns: per token, padded `[B, T]` (with `mask`) or packed `[N]`
        (with `cu_seqlens` int32 `[S+1]`, optionally `mask`).
    clip: the clip range around old_values (verl's cliprange_value); None = no clipping.
    loss_agg, horizon: as in `policy_loss`.
    Returns `(loss, metrics)`: a float32 scalar (float64 inputs give float64) differentiable
    with respect to `values`, and detached metrics `vf_clipfrac` (fraction of valid tokens
    where the clipped term is larger) and `vpred_mean`.
    """
    checks.floating("values", values)
    checks.non_empty("values", values)
    layout = token_layout(values, mask=mask, cu_seqlens=cu_seqlens, name="values")
    flat_values = layout.flat("values", values)
    checks.floating("old_values", old_values)
    checks.same_device("old_values", old_values, "values", values)
    checks.floating("returns", returns)
    checks.same_device("returns", returns, "values", values)
    flat_old = layout.flat("old_values", old_values)
    flat_returns = layout.flat("returns", returns)
    if clip is not None:
        clip = checks.non_negative("clip", clip)
    checks.one_of("loss_agg", loss_agg, LOSS_AGG_MODES)
    horizon = resolve_horizon(layout, horizon, loss_agg)
    return dispatch("value_loss", backend, values.device, flat_values, flat_old, flat_returns,
                    layout, clip, loss_agg, horizon)


@register("value_loss", "torch")
def _value_loss_torch(values, old_values, returns, layout: TokenLayout, clip, loss_agg, horizon):
    dtype = compute_dtype(values, old_values, returns)
    v = values.to(dtype)
    old = old_values.detach().to(dtype)
    target = returns.detach().to(dtype)
    unclipped = (v - target).square()
    if clip is None:
        token_loss = unclipped
        clipped_more = torch.zeros_like(layout.mask, dtype=torch.bool)
    else:
        clipped = (torch.clamp(v, old - clip, old + clip) - target).square()
        token_loss = torch.maximum(unclipped, clipped)
        clipped_more = clipped > unclipped
    loss = 0.5 * aggregate(token_loss, layout, loss_agg, horizon)
    with torch.no_grad():
        metrics = {"vf_clipfrac": masked_token_mean(clipped_more.to(dtype), layout).float(),
                   "vpred_mean": masked_token_mean(v, layout).float()}
    return loss, metrics


def run_fused_value_loss(forward, values, old_values, returns, layout, clip, loss_agg,
                         horizon):
    """Run a fused forward (triton or cuda) under autograd; the backward is a multiply.

    `forward(v, old_values, returns, layout, clip, weights)` returns per-sequence partials
    `[S, 4]` (sum of L_t, valid tokens, clipped tokens, sum of v) and grad `[N]` fp32."""
    weights = sequence_weights(valid_counts(layout), loss_agg, horizon).contiguous()
    dtype = compute_dtype(values, old_values, returns)

    def kernel(v):
        partials, grad = forward(v, old_values, returns, layout, clip, weights)
        loss = (0.5 * (weights * partials[:, 0]).sum()).to(dtype)
        count = partials[:, 1].sum().clamp(min=1)
        stats = torch.stack([partials[:, 2].sum() / count, partials[:, 3].sum() / count])
        return loss, [grad], stats

    loss, stats = fused_local_grad(kernel, [values], extra_outputs=1)
    return loss, {"vf_clipfrac": stats[0], "vpred_mean": stats[1]}


@register("value_loss", "triton")
def _value_loss_triton(values, old_values, returns, layout, clip, loss_agg, horizon):
    from .triton_value_loss import value_loss_forward

    return run_fused_value_loss(value_loss_forward, values, old_values, returns, layout, clip,
                                loss_agg, horizon)
