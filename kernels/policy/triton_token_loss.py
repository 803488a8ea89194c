"""Triton device functions: the per-token math of the policy-gradient loss, for any kernel.

These are `@triton.jit` functions on tiles (any shape), meant to be called from kernels
that produce log-probs in some other way: the fused policy-loss kernel here
(`triton_policy_loss.py`) loads them from memory; a fused `linear_policy_loss` kernel
computes them from the LM head and calls `policy_token_loss` on the result, so the loss
math exists once. Everything is float32. The formulas are those of `policy_loss.py`; as there,
a NaN input gives a NaN loss (`clamp_nan`), never a clamp bound.

`policy_token_loss(log_ratio, advantage, ref_log_ratio, clip_low, clip_high, dual_clip,
                   kl_coef, log_ratio_min, log_ratio_max,
                   USE_DUAL_CLIP, HAS_REF, KL_ESTIMATOR)
  -> (loss, grad, pg_loss, ratio, clipped, dual_clipped, kl)`

- log_ratio: logp - old_logp per token (PPO), or the sequence's mean log-ratio broadcast to
  its tokens (GSPO). In both cases d log_ratio / d logp = 1 (GSPO's stop-gradient form).
- advantage: per token. ref_log_ratio: logp - ref_logp (ignored unless HAS_REF).
- log_ratio_min/max: the clamp before exp ([-20, 20] token level, (-inf, 10] GSPO).
- returns loss = pg + kl_coef * kl, grad = d loss / d logp, pg_loss, ratio, clipped and
  dual_clipped (int1: the clip / dual clip was active), kl (0 unless HAS_REF).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def max_nan(a, b):
    """max with NaN in, NaN out, as torch.maximum: tl.maximum (and tl.max) default to
    PropagateNan.NONE, which returns the other operand (a finite, wrong loss)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def clamp_nan(x, lo, hi):
    """min(max(x, lo), hi) with NaN in, NaN out, as torch.clamp (see max_nan)."""
    return tl.minimum(max_nan(x, lo), hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def kl_token(d, KL_ESTIMATOR: tl.constexpr):
    """Per-token KL estimate from d = logp - ref_logp and its derivative d kl / d d.

    KL_ESTIMATOR is a code of `kl.KL_ESTIMATOR_CODES`: 0 k1, 1 k2, 2 k3, 3 abs."""
    if KL_ESTIMATOR == 0:  # k1
        kl = d
        grad = tl.full(d.shape, 1.0, tl.float32)
    elif KL_ESTIMATOR == 1:  # k2
        kl = 0.5 * d * d
        grad = d
    elif KL_ESTIMATOR == 2:  # k3 ("low_var_kl"), clamped like verl: -d to +-20, kl to +-10
        x = clamp_nan(-d, -20.0, 20.0)
        ex = tl.exp(x)
        raw = ex - x - 1.0
        kl = clamp_nan(raw, -10.0, 10.0)
        inside = (-d >= -20.0) & (-d <= 20.0) & (raw >= -10.0) & (raw <= 10.0)
        grad = tl.where(inside, 1.0 - ex, 0.0)
    else:  # abs
        kl = tl.abs(d)
        grad = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    return kl, grad


@triton.jit
def policy_token_loss(log_ratio, advantage, ref_log_ratio, clip_low, clip_high, dual_clip,
                      kl_coef, log_ratio_min, log_ratio_max, USE_DUAL_CLIP: tl.constexpr,
                      HAS_REF: tl.constexpr, KL_ESTIMATOR: tl.constexpr):
    # Clamp before exp so that log-ratios of +-80 cannot overflow; the clamp stops the gradient.
    clamped = clamp_nan(log_ratio, log_ratio_min, log_ratio_max)
    ratio = tl.exp(clamped)
    d_ratio = tl.where((log_ratio >= log_ratio_min) & (log_ratio <= log_ratio_max), ratio, 0.0)
    unclipped = -advantage * ratio
    clipped_loss = -advantage * clamp_nan(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = clipped_loss > unclipped
    pg = max_nan(unclipped, clipped_loss)
    # Where the clipped term wins the ratio lies outside the clip range: no gradient.
    grad = tl.where(clipped, 0.0, -advantage * d_ratio)
    if USE_DUAL_CLIP:
        bound = -advantage * dual_clip
        dual_clipped = (advantage < 0) & (pg > bound)
        pg = tl.where(dual_clipped, bound, pg)
        grad = tl.where(dual_clipped, 0.0, grad)
    else:
        dual_clipped = tl.zeros(log_ratio.shape, tl.int1)
    loss = pg
    if HAS_REF:
        kl, d_kl = kl_token(ref_log_ratio, KL_ESTIMATOR)
        loss = pg + kl_coef * kl
        grad = grad + kl_coef * d_kl
    else:
        kl = tl.zeros(log_ratio.shape, tl.float32)
    return loss, grad, pg, ratio, clipped, dual_clipped, kl
