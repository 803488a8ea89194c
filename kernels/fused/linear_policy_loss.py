"""`linear_policy_loss`: LM head -> log-probs -> clipped policy-gradient loss, one autograd node.

    loss, metrics = linear_policy_loss(hidden, weight, targets, old_logps, advantages, ...)

is `policy_loss(linear_logprobs(hidden, weight, targets), old_logps, advantages, ...)` (plus
an optional entropy bonus), computed without the `[N, V]` logits and with 6 N H V FLOPs
instead of 8:

    L_t  = policy_loss's per-token loss (clipped ratio, dual clip, kl_coef * KL_t)
           - entropy_coef * H_t                     (entropy bonus, as verl's entropy_coeff)
    loss = sum_t w_t L_t                            (w_t: loss_agg's weight of token t)

Backends:
- "torch", the specification: `linear_logprobs(backend="torch")` then the torch reference of
  `policy_loss`, and the entropy bonus aggregated like the loss.
- "triton" and "cuda", the fused path (`chunked.py` around the backend's chunk kernel,
  `triton_fused_loss.py` or csrc/cuda/fused.cu via `cuda.py`): every mode of the loss is
  linear in the per-token losses with weights w_t known before any log-prob is (see
  `policy/aggregation.py`), so each chunk of logits is turned into its loss and its
  d loss / d logits in the forward pass, and the two gradient GEMMs run right away.
- GSPO (`importance_level="sequence"`) needs each sequence's mean log-ratio before any
  token's coefficient, so the fused path first runs a statistics-only pass over the chunks
  (one GEMM per chunk: the log-probs), then the gradient pass: 8 N H V FLOPs in that mode,
  still without `[N, V]` memory.

A token counts when the mask (or layout) includes it and its target is not `ignore_index`;
the others get no loss, no metric and no gradient, and the fused path does not even send
them through the LM head (prompt tokens are free).

Usage in a GRPO step (engine/algorithms/grpo.py), packed layout:

    hidden = model.model(input_ids, position_ids=...).last_hidden_state[0]   # [N, H]
    loss, metrics = linear_policy_loss(
        hidden, model.lm_head.weight, targets,          # [N, H], [V, H], [N] int64
        old_logps, advantages,                          # [N] float32, [S] per sequence
        cu_seqlens=cu_seqlens, mask=loss_mask,          # int32 [S+1], [N] bool
        ref_logps=ref_logps, kl_coef=0.04,              # [N] or None
        clip_low=0.2, clip_high=0.28, loss_agg="token-mean", temperature=1.0)
    loss.backward()                                     # grads of hidden (-> model) and weight
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .. import checks
from ..autograd import fused_local_grad
from ..backends import dispatch, register, set_cuda_preference
from ..layout import TokenLayout
from ..logprobs import check_linear_inputs, check_softcap, linear_logprobs
from ..policy.aggregation import aggregate, masked_token_mean, sequence_weights, valid_counts
from ..policy.kl import KL_ESTIMATOR_CODES, compute_dtype
from ..policy.policy_loss import METRIC_NAMES, PolicyLossOptions, check_policy_inputs
from .chunk_loss import (CROSS_ENTROPY, NUM_STATS, POLICY, STAT_CLIPPED, STAT_DUAL, STAT_ENTROPY,
                         STAT_KL, STAT_LOGP, STAT_LOSS, STAT_PG, STAT_RATIO, ChunkLoss,
                         chunk_loss_kernel)
from .chunked import FusedLinearLoss
from .lm_head import needed_grads

__all__ = ["linear_policy_loss"]


def linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       old_logps: torch.Tensor, advantages: torch.Tensor, *,
                       mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                       ref_logps: torch.Tensor | None = None, clip_low: float = 0.2,
                       clip_high: float = 0.2, dual_clip: float | None = None,
                       kl_coef: float = 0.0, kl_estimator: str = "k3",
                       importance_level: str = "token", loss_agg: str = "token-mean",
                       horizon: float | None = None, bias: torch.Tensor | None = None,
                       temperature: float = 1.0, ignore_index: int = -100,
                       entropy_coef: float = 0.0, softcap: float | None = None,
                       backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy-gradient loss of the tokens `targets` under the LM head, fused.

    hidden: `[B, T, H]` (padded, with `mask [B, T]`) or `[N, H]` (packed, with `cu_seqlens`
        int32 `[S+1]` and optionally `mask [N]`); float16/bfloat16/float32 (float64 for
        gradcheck).
    weight: the LM head `[V, H]`; bias: optional `[V]`; same dtype as hidden.
    targets: `[B, T]` / `[N]` token ids in `[0, V)` or `ignore_index` (such tokens do not count).
    old_logps, ref_logps: `[B, T]` / `[N]`; advantages: per token, or per sequence `[B]` / `[S]`.
    clip_low, clip_high, dual_clip, kl_coef, kl_estimator, importance_level, loss_agg,
        horizon: as in `policy_loss`.
    temperature: the logits are divided by it before the softmax (as in the rollout).
    softcap: Gemma-2's final logit soft-capping, applied before the temperature
        (`linear_logprobs`); None: no cap.
    entropy_coef: subtracts entropy_coef * H_t per token (aggregated like the loss); finite.

    Returns `(loss, metrics)`: loss a float32 scalar (float64 inputs give float64),
    differentiable with respect to hidden, weight and bias; metrics are policy_loss's
    detached scalars (clipfrac, dual_clipfrac, approx_kl, kl when ref_logps is given,
    ratio_mean, ratio_max, pg_loss) plus `entropy`, the mean entropy over counted tokens.
    """
    H, flat_targets, temperature = check_linear_inputs(hidden, weight, bias, targets,
                                                       ignore_index, temperature)
    checks.non_empty("targets", targets)
    layout, flat_old, flat_adv, flat_ref, options = check_policy_inputs(
        targets, old_logps, advantages, ref_logps, mask=mask, cu_seqlens=cu_seqlens,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
        kl_estimator=kl_estimator, importance_level=importance_level, loss_agg=loss_agg,
        horizon=horizon, name="targets")
    checks.finite_number("entropy_coef", entropy_coef)
    softcap = check_softcap(softcap)
    # A token counts when the layout includes it and its target is a real token.
    counted = (layout.mask > 0) & (flat_targets != ignore_index)
    layout = dataclasses.replace(layout, mask=counted.to(torch.float32))
    loss, metrics = dispatch("linear_policy_loss", backend, hidden.device,
                             hidden.reshape(-1, H), weight, bias, flat_targets, flat_old,
                             flat_adv, flat_ref, layout, options, float(temperature),
                             ignore_index, float(entropy_coef), softcap)
    if ref_logps is None:
        metrics.pop("kl")
    return loss, metrics


# ---------------------------------------------------------------------------------------
# torch: the specification


@register("linear_policy_loss", "torch")
def _linear_policy_loss_torch(hidden, weight, bias, targets, old_logps, advantages,
                              ref_logps, layout: TokenLayout, options: PolicyLossOptions,
                              temperature: float, ignore_index: int, entropy_coef: float,
                              softcap: float | None = None):
    logps, entropy = linear_logprobs(hidden, weight, targets, bias=bias,
                                     temperature=temperature, ignore_index=ignore_index,
                                     return_entropy=True, softcap=softcap, backend="torch")
    loss, metrics = dispatch("policy_loss", "torch", hidden.device, logps, old_logps,
                             advantages, ref_logps, layout, options)
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * aggregate(entropy, layout, options.loss_agg,
                                               options.horizon)
    metrics["entropy"] = masked_token_mean(entropy.detach(), layout).to(torch.float32)
    return loss, metrics


# ---------------------------------------------------------------------------------------
# triton and cuda: the fused chunk loop around the backend's chunk kernel


def _linear_policy_loss_fused(backend, hidden, weight, bias, targets, old_logps, advantages,
                              ref_logps, layout: TokenLayout, options: PolicyLossOptions,
                              temperature: float, ignore_index: int, entropy_coef: float,
                              softcap: float | None = None):
    fused_chunk_loss = chunk_loss_kernel(backend)
    N = hidden.shape[0]
    device = hidden.device
    out_dtype = compute_dtype(hidden, old_logps, advantages, ref_logps)
    counted = layout.mask > 0
    rows = None if bool(counted.all()) else counted.nonzero().squeeze(1)

    def pick(x: torch.Tensor) -> torch.Tensor:
        """A per-token `[N]` tensor at the counted tokens, fp32 contiguous."""
        x = x.detach().to(torch.float32)
        return (x if rows is None else x[rows]).contiguous()

    seq_ids = layout.seq_ids if rows is None else layout.seq_ids[rows]
    token_weight = pick(sequence_weights(valid_counts(layout), options.loss_agg,
                                         options.horizon)[layout.seq_ids])
    if advantages.shape != (N,):
        advantages = advantages[layout.seq_ids]  # per sequence -> per token
    old, adv = pick(old_logps), pick(advantages)
    t = (targets if rows is None else targets[rows]).contiguous()  # int64, not via fp32
    ref = None if ref_logps is None else pick(ref_logps)
    M = t.numel()
    policy = ChunkLoss(POLICY, clip_low=options.clip_low, clip_high=options.clip_high,
                       dual_clip=options.dual_clip, kl_coef=options.kl_coef,
                       kl_estimator_code=KL_ESTIMATOR_CODES[options.kl_estimator],
                       log_ratio_bounds=options.log_ratio_bounds, entropy_coef=entropy_coef,
                       softcap=softcap)
    # GSPO's first pass reads STAT_LOGP only
    log_probs_only = ChunkLoss(CROSS_ENTROPY, softcap=softcap)
    need = needed_grads(hidden, weight, bias)
    inputs = [hidden, weight] + ([bias] if bias is not None else [])

    def kernel(h, w, *b):
        engine = FusedLinearLoss(h, w, b[0] if b else None, rows)
        stats = torch.empty(NUM_STATS, M, device=device, dtype=torch.float32)
        seq_lr = None
        if options.importance_level == "sequence":
            # GSPO pass 1: log-probs only, for each sequence's mean log-ratio
            engine.run(lambda z, dz, c: fused_chunk_loss(z, None, t[c], token_weight[c],
                                                         stats[:, c], temperature,
                                                         log_probs_only), (False,) * 3)
            lr_sum = torch.zeros(layout.num_seqs, device=device, dtype=torch.float32)
            lr_sum.index_add_(0, seq_ids, stats[STAT_LOGP] - old)
            seq_lr = (lr_sum / valid_counts(layout).clamp(min=1))[seq_ids].contiguous()

        def launch(z, dz, c):
            fused_chunk_loss(z, dz, t[c], token_weight[c], stats[:, c], temperature, policy,
                             old_logps=old[c], advantages=adv[c],
                             ref_logps=None if ref is None else ref[c],
                             seq_log_ratio=None if seq_lr is None else seq_lr[c])

        grads = engine.run(launch, need)
        loss = (token_weight * stats[STAT_LOSS]).sum().to(out_dtype)
        count = max(M, 1)
        metrics = {
            "clipfrac": stats[STAT_CLIPPED].sum() / count,
            "dual_clipfrac": stats[STAT_DUAL].sum() / count,
            "approx_kl": (old - stats[STAT_LOGP]).sum() / count,
            "kl": stats[STAT_KL].sum() / count,
            "ratio_mean": stats[STAT_RATIO].sum() / count,
            "ratio_max": stats[STAT_RATIO].max() if M else stats.new_zeros(()),
            "pg_loss": (token_weight * stats[STAT_PG]).sum(),
            "entropy": stats[STAT_ENTROPY].sum() / count,
        }
        local = [grads[0], grads[1]] + ([grads[2]] if b else [])
        return loss, local, torch.stack(list(metrics.values()))

    loss, stacked = fused_local_grad(kernel, inputs, extra_outputs=1)
    names = METRIC_NAMES + ("entropy",)
    return loss, dict(zip(names, stacked.unbind(0)))


for _backend in ("triton", "cuda"):
    register("linear_policy_loss", _backend)(functools.partial(_linear_policy_loss_fused, _backend))

# "auto" on CUDA: triton before cuda until bench/ has timed both (same GEMMs, different chunk
# kernels).
set_cuda_preference("linear_policy_loss", ("triton", "cuda", "torch"))
