"""Clipped policy-gradient loss (PPO / GRPO / DAPO / GSPO) with an optional KL penalty.

Per valid token t of sequence s, with A_t the advantage and r_t the importance ratio:

    token level (PPO, https://arxiv.org/abs/1707.06347):
        r_t = exp(clamp(logp_t - old_logp_t, -20, 20))          (clamp before exp: no overflow)
    sequence level (GSPO, https://arxiv.org/abs/2507.18071):
        log s_s = mean_{t in s} (logp_t - old_logp_t)            (over valid tokens)
        r_t     = exp(min(logp_t - sg[logp_t] + sg[log s_s], 10))
        (value s_s for every token of s; d r_t / d logp_t = r_t: the stop-gradient form of
        the GSPO paper and verl's compute_policy_loss_gspo)

    pg_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))
                       (asymmetric clip: DAPO's clip-higher, https://arxiv.org/abs/2503.14476)
    if dual_clip = c is set and A_t < 0:  pg_t = min(pg_t, -A_t c)     (dual clip,
                                                  https://arxiv.org/abs/1912.09729)
    L_t  = pg_t + kl_coef * KL_t,  KL_t = kl_penalty(logp_t, ref_logp_t, kl_estimator)

and the loss aggregates L_t with `loss_agg` (see `aggregation.py`). These match verl's
`compute_policy_loss_vanilla` (dual clip there is always on with clip_ratio_c=3; here it is
off unless `dual_clip` is given), `compute_policy_loss_gspo` and `kl_penalty`.

Gradients flow to `logps` only: `old_logps`, `advantages` and `ref_logps` are fixed targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import checks
from ..autograd import fused_local_grad
from ..backends import dispatch, register
from ..layout import TokenLayout, token_layout
from .aggregation import (LOSS_AGG_MODES, aggregate, masked_token_mean, resolve_horizon,
                          sequence_weights, valid_counts)
from .kl import compute_dtype, kl_estimator_names, kl_from_log_ratio

# verl's clamps on the log importance ratio, before the exp
TOKEN_LOG_RATIO_BOUND = 20.0
SEQUENCE_LOG_RATIO_MAX = 10.0
IMPORTANCE_LEVELS = ("token", "sequence")
# the metrics every backend returns, in this order (the kernels' partial-sum columns follow it)
METRIC_NAMES = ("clipfrac", "dual_clipfrac", "approx_kl", "kl", "ratio_mean", "ratio_max",
                "pg_loss")


@dataclass(frozen=True)
class PolicyLossOptions:
    clip_low: float
    clip_high: float
    dual_clip: float | None
    kl_coef: float
    kl_estimator: str
    importance_level: str
    loss_agg: str
    horizon: float

    @property
    def log_ratio_bounds(self) -> tuple[float, float]:
        if self.importance_level == "sequence":
            return -float("inf"), SEQUENCE_LOG_RATIO_MAX
        return -TOKEN_LOG_RATIO_BOUND, TOKEN_LOG_RATIO_BOUND


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, *,
                mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                ref_logps: torch.Tensor | None = None, clip_low: float = 0.2,
                clip_high: float = 0.2, dual_clip: float | None = None, kl_coef: float = 0.0,
                kl_estimator: str = "k3", importance_level: str = "token",
                loss_agg: str = "token-mean", horizon: float | None = None,
                backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss, fused with the KL penalty, the aggregation and the metrics.

    logps, old_logps, ref_logps: per-token log-probs, padded `[B, T]` (with `mask`) or packed
        `[N]` (with `cu_seqlens` int32 `[S+1]`, optionally `mask [N]`); any float dtype.
    advantages: per token (same shape) or per sequence (`[B]` / `[S]`, broadcast).
    clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high]; clip_low in
        [0, 1), clip_high >= 0 (inf: no upper clip, as dual_clip=inf is no dual clip; NaN
        is refused).
    dual_clip: c > 1 bounds the loss of negative-advantage tokens by -A c; None = off.
    kl_coef, kl_estimator: adds kl_coef * KL_t per token ("k1", "k2", "k3", "abs"); kl_coef
        is finite and needs `ref_logps` when != 0.
    importance_level: "token" (PPO/GRPO) or "sequence" (GSPO).
    loss_agg: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
        "seq-mean-token-sum-norm" (see `alignfuse.kernels.policy.aggregation`).
    horizon: the constant H of seq-mean-token-sum-norm; default the most valid tokens of any
        sequence (the same in both layouts); pass the max response length to keep it fixed.

    Returns `(loss, metrics)`: loss is a float32 scalar (float64 inputs give float64),
    differentiable with respect to `logps`; metrics are detached scalars over valid tokens:
    clipfrac, dual_clipfrac, approx_kl (mean of old_logp - logp), kl (when `ref_logps` is
    given), ratio_mean, ratio_max, pg_loss (the aggregated loss without the KL term).
    """
    checks.floating("logps", logps)
    checks.non_empty("logps", logps)
    layout, flat_old, flat_adv, flat_ref, options = check_policy_inputs(
        logps, old_logps, advantages, ref_logps, mask=mask, cu_seqlens=cu_seqlens,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
        kl_estimator=kl_estimator, importance_level=importance_level, loss_agg=loss_agg,
        horizon=horizon)
    flat_logps = layout.flat("logps", logps)
    loss, metrics = dispatch("policy_loss", backend, logps.device, flat_logps, flat_old,
                             flat_adv, flat_ref, layout, options)
    if ref_logps is None:
        metrics.pop("kl")
    return loss, metrics


def check_policy_inputs(like: torch.Tensor, old_logps, advantages, ref_logps, *, mask,
                        cu_seqlens, clip_low, clip_high, dual_clip, kl_coef, kl_estimator,
                        importance_level, loss_agg, horizon, name: str = "logps"):
    """Validate policy_loss's inputs against a token tensor `like` (`[B, T]` or `[N]`, e.g.
    the log-probs, or the targets of a fused op that computes them). Returns
    `(layout, flat_old [N], flat_adv ([N] or [S]), flat_ref [N] or None, options)`."""
    layout = token_layout(like, mask=mask, cu_seqlens=cu_seqlens, name=name)
    checks.floating("old_logps", old_logps)
    checks.same_device("old_logps", old_logps, name, like)
    flat_old = layout.flat("old_logps", old_logps)
    checks.floating("advantages", advantages)
    checks.same_device("advantages", advantages, name, like)
    if advantages.shape == layout.shape:
        flat_adv = advantages.reshape(-1)
    else:
        layout.per_token("advantages", advantages)  # raises with the expected shapes
        flat_adv = advantages  # per sequence [S]: the backends broadcast it
    flat_ref = None
    if ref_logps is not None:
        checks.floating("ref_logps", ref_logps)
        checks.same_device("ref_logps", ref_logps, name, like)
        flat_ref = layout.flat("ref_logps", ref_logps)
    options = _options(layout, clip_low, clip_high, dual_clip, kl_coef, kl_estimator,
                       importance_level, loss_agg, horizon, has_ref=ref_logps is not None)
    return layout, flat_old, flat_adv, flat_ref, options


def _options(layout: TokenLayout, clip_low, clip_high, dual_clip, kl_coef, kl_estimator,
             importance_level, loss_agg, horizon, *, has_ref: bool) -> PolicyLossOptions:
    checks.non_negative("clip_low", clip_low)
    checks.non_negative("clip_high", clip_high)
    if clip_low >= 1:
        raise ValueError(f"clip_low must be in [0, 1) so that 1 - clip_low > 0, got {clip_low!r}")
    if dual_clip is not None and not (isinstance(dual_clip, (int, float)) and dual_clip > 1):
        raise ValueError(f"dual_clip must be None or a number > 1, got {dual_clip!r}")
    checks.finite_number("kl_coef", kl_coef)
    if kl_coef != 0 and not has_ref:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logps (the reference policy's log-probs)")
    checks.one_of("kl_estimator", kl_estimator, kl_estimator_names())
    checks.one_of("importance_level", importance_level, IMPORTANCE_LEVELS)
    checks.one_of("loss_agg", loss_agg, LOSS_AGG_MODES)
    return PolicyLossOptions(float(clip_low), float(clip_high),
                             None if dual_clip is None else float(dual_clip), float(kl_coef),
                             kl_estimator, importance_level, loss_agg,
                             resolve_horizon(layout, horizon, loss_agg))


# ---------------------------------------------------------------------------------------
# torch: the reference


@register("policy_loss", "torch")
def _policy_loss_torch(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                       ref_logps: torch.Tensor | None, layout: TokenLayout,
                       options: PolicyLossOptions):
    dtype = compute_dtype(logps, old_logps, advantages, ref_logps)
    valid = layout.mask > 0
    logps = logps.to(dtype)
    old = old_logps.detach().to(dtype)
    adv = advantages.detach().to(dtype)
    if adv.shape != logps.shape:
        adv = adv[layout.seq_ids]
    token_log_ratio = logps - old
    if options.importance_level == "sequence":
        counts = valid_counts(layout).to(dtype)
        masked = torch.where(valid, token_log_ratio.detach(), 0.0)
        seq_log_ratio = torch.zeros(layout.num_seqs, dtype=dtype, device=logps.device)
        seq_log_ratio = seq_log_ratio.index_add(0, layout.seq_ids, masked) / counts.clamp(min=1)
        log_ratio = logps - logps.detach() + seq_log_ratio[layout.seq_ids]
        log_ratio = torch.clamp(log_ratio, max=SEQUENCE_LOG_RATIO_MAX)
    else:
        log_ratio = torch.clamp(token_log_ratio, -TOKEN_LOG_RATIO_BOUND, TOKEN_LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - options.clip_low, 1 + options.clip_high)
    pg = torch.maximum(unclipped, clipped)
    dual_clipped = torch.zeros_like(valid)
    if options.dual_clip is not None:
        bound = -adv * options.dual_clip
        dual_clipped = (adv < 0) & (pg > bound)
        pg = torch.where(adv < 0, torch.minimum(pg, bound), pg)
    token_loss = pg
    kl = None
    if ref_logps is not None:
        kl = kl_from_log_ratio(logps - ref_logps.detach().to(dtype), options.kl_estimator)
        token_loss = pg + options.kl_coef * kl
    loss = aggregate(token_loss, layout, options.loss_agg, options.horizon)

    with torch.no_grad():
        f32 = torch.float32

        def mean(x):
            return masked_token_mean(x.to(dtype), layout).to(f32)

        ratio_valid = torch.where(valid, ratio, 0.0)
        metrics = {
            "clipfrac": mean(clipped > unclipped),
            "dual_clipfrac": mean(dual_clipped),
            "approx_kl": mean(-token_log_ratio),
            "kl": mean(kl) if kl is not None else torch.zeros((), dtype=f32, device=ratio.device),
            "ratio_mean": mean(ratio),
            "ratio_max": ratio_valid.max().to(f32),
            "pg_loss": aggregate(pg, layout, options.loss_agg, options.horizon).to(f32),
        }
    return loss, metrics


# ---------------------------------------------------------------------------------------
# triton and cuda: one fused pass


def _metrics_from_partials(partials: torch.Tensor, ratio_max: torch.Tensor,
                           weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """partials `[S, 8]` columns: loss, pg, count, clipped, dual_clipped, -log_ratio, kl, ratio."""
    totals = partials.sum(0)
    count = totals[2].clamp(min=1)
    has_tokens = partials[:, 2] > 0
    return {
        "clipfrac": totals[3] / count,
        "dual_clipfrac": totals[4] / count,
        "approx_kl": totals[5] / count,
        "kl": totals[6] / count,
        "ratio_mean": totals[7] / count,
        "ratio_max": torch.where(has_tokens, ratio_max, 0.0).max(),
        "pg_loss": (weights * partials[:, 1]).sum(),
    }


def run_fused_policy_loss(forward, logps, old_logps, advantages, ref_logps, layout, options):
    """Run a fused forward (triton or cuda) under autograd; the backward is a multiply."""
    counts = valid_counts(layout)
    weights = sequence_weights(counts, options.loss_agg, options.horizon)
    dtype = compute_dtype(logps, old_logps, advantages, ref_logps)

    def kernel(lp):
        partials, ratio_max, grad = forward(lp, old_logps, advantages, ref_logps, layout,
                                            options, weights)
        loss = (weights * partials[:, 0]).sum().to(dtype)
        stats = torch.stack(list(_metrics_from_partials(partials, ratio_max, weights).values()))
        return loss, [grad], stats

    loss, stats = fused_local_grad(kernel, [logps], extra_outputs=1)
    return loss, dict(zip(METRIC_NAMES, stats.unbind(0)))


@register("policy_loss", "triton")
def _policy_loss_triton(logps, old_logps, advantages, ref_logps, layout, options):
    from .triton_policy_loss import policy_loss_forward

    return run_fused_policy_loss(policy_loss_forward, logps, old_logps, advantages, ref_logps,
                                 layout, options)


