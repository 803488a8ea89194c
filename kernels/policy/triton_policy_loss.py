"""Triton kernel: the fused policy-gradient loss forward, with its gradient, in one pass.

One program per sequence streams the sequence's tokens in BLOCK tiles (no grid limit on the
number of tokens, no atomics). Per token it calls `policy_token_loss` and writes the final
gradient d loss / d logp = m_t * w_s * d L_t / d logp (w_s: the aggregation weight of the
sequence, known before the launch), so autograd's backward is only a multiply by the
incoming gradient. Per sequence it writes the partial sums every aggregation mode and every
metric needs (8 columns, see `policy_loss._metrics_from_partials`) and the largest ratio.

GSPO (SEQUENCE_LEVEL) needs the sequence's mean log-ratio before any token's loss: the
program first streams its sequence once for that sum, then runs the main loop (the second
read of a sequence usually hits L2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kl import KL_ESTIMATOR_CODES
from .triton_token_loss import max_nan, policy_token_loss

NUM_PARTIALS = 8


@triton.jit
def _policy_loss_kernel(logp_ptr, old_ptr, adv_ptr, ref_ptr, mask_ptr, cu_ptr, weight_ptr,
                        grad_ptr, partial_ptr, ratio_max_ptr,
                        clip_low, clip_high, dual_clip, kl_coef, log_ratio_min, log_ratio_max,
                        HAS_REF: tl.constexpr,
                        ADV_PER_SEQ: tl.constexpr, SEQUENCE_LEVEL: tl.constexpr,
                        USE_DUAL_CLIP: tl.constexpr, KL_ESTIMATOR: tl.constexpr,
                        BLOCK: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    end = tl.load(cu_ptr + seq + 1).to(tl.int64)
    weight = tl.load(weight_ptr + seq)

    seq_log_ratio = 0.0
    if SEQUENCE_LEVEL:
        lr_acc = tl.zeros([BLOCK], dtype=tl.float32)
        n_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            inb = idx < end
            valid = inb & (tl.load(mask_ptr + idx, mask=inb, other=0.0) > 0)
            lp = tl.load(logp_ptr + idx, mask=inb, other=0.0).to(tl.float32)
            old = tl.load(old_ptr + idx, mask=inb, other=0.0).to(tl.float32)
            lr_acc += tl.where(valid, lp - old, 0.0)
            n_acc += valid.to(tl.float32)
        seq_log_ratio = tl.sum(lr_acc, axis=0) / tl.maximum(tl.sum(n_acc, axis=0), 1.0)

    if ADV_PER_SEQ:
        seq_adv = tl.load(adv_ptr + seq).to(tl.float32)

    loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
    pg_acc = tl.zeros([BLOCK], dtype=tl.float32)
    n_acc = tl.zeros([BLOCK], dtype=tl.float32)
    clip_acc = tl.zeros([BLOCK], dtype=tl.float32)
    dual_acc = tl.zeros([BLOCK], dtype=tl.float32)
    neg_lr_acc = tl.zeros([BLOCK], dtype=tl.float32)
    kl_acc = tl.zeros([BLOCK], dtype=tl.float32)
    ratio_acc = tl.zeros([BLOCK], dtype=tl.float32)
    ratio_max = tl.zeros([BLOCK], dtype=tl.float32)  # ratios are > 0
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        inb = idx < end
        valid = inb & (tl.load(mask_ptr + idx, mask=inb, other=0.0) > 0)
        lp = tl.load(logp_ptr + idx, mask=inb, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + idx, mask=inb, other=0.0).to(tl.float32)
        if ADV_PER_SEQ:
            adv = tl.zeros([BLOCK], dtype=tl.float32) + seq_adv
        else:
            adv = tl.load(adv_ptr + idx, mask=inb, other=0.0).to(tl.float32)
        ref_lr = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_REF:
            ref_lr = lp - tl.load(ref_ptr + idx, mask=inb, other=0.0).to(tl.float32)
        token_lr = lp - old
        if SEQUENCE_LEVEL:
            log_ratio = tl.zeros([BLOCK], dtype=tl.float32) + seq_log_ratio
        else:
            log_ratio = token_lr
        loss, grad, pg, ratio, clipped, dual_clipped, kl = policy_token_loss(
            log_ratio, adv, ref_lr, clip_low, clip_high, dual_clip, kl_coef,
            log_ratio_min, log_ratio_max, USE_DUAL_CLIP, HAS_REF, KL_ESTIMATOR)
        # where, not multiply: padding may hold inf/NaN log-probs
        tl.store(grad_ptr + idx, tl.where(valid, grad * weight, 0.0), mask=inb)
        loss_acc += tl.where(valid, loss, 0.0)
        pg_acc += tl.where(valid, pg, 0.0)
        n_acc += valid.to(tl.float32)
        clip_acc += (valid & clipped).to(tl.float32)
        dual_acc += (valid & dual_clipped).to(tl.float32)
        neg_lr_acc += tl.where(valid, -token_lr, 0.0)
        kl_acc += tl.where(valid, kl, 0.0)
        ratio_acc += tl.where(valid, ratio, 0.0)
        ratio_max = max_nan(ratio_max, tl.where(valid, ratio, 0.0))

    out = partial_ptr + seq * 8
    tl.store(out + 0, tl.sum(loss_acc, axis=0))
    tl.store(out + 1, tl.sum(pg_acc, axis=0))
    tl.store(out + 2, tl.sum(n_acc, axis=0))
    tl.store(out + 3, tl.sum(clip_acc, axis=0))
    tl.store(out + 4, tl.sum(dual_acc, axis=0))
    tl.store(out + 5, tl.sum(neg_lr_acc, axis=0))
    tl.store(out + 6, tl.sum(kl_acc, axis=0))
    tl.store(out + 7, tl.sum(ratio_acc, axis=0))
    # tl.max drops NaN; torch's ratio_max is NaN when a ratio is
    tl.store(ratio_max_ptr + seq, tl.reduce(ratio_max, 0, max_nan))


def policy_loss_forward(logps, old_logps, advantages, ref_logps, layout, options, weights):
    """Launch on flat `[N]` inputs. Returns (partials [S, 8], ratio_max [S], grad [N])."""
    num_seqs = layout.num_seqs
    device = logps.device
    logps = logps.contiguous()
    grad = torch.empty(logps.shape, device=device, dtype=torch.float32)
    partials = torch.zeros(num_seqs, NUM_PARTIALS, device=device, dtype=torch.float32)
    ratio_max = torch.zeros(num_seqs, device=device, dtype=torch.float32)
    if num_seqs == 0:
        return partials, ratio_max, grad.zero_()
    lr_min, lr_max = options.log_ratio_bounds
    ref = ref_logps.contiguous() if ref_logps is not None else logps
    _policy_loss_kernel[(num_seqs,)](
        logps, old_logps.contiguous(), advantages.contiguous(), ref, layout.mask,
        layout.cu_seqlens.contiguous(), weights.contiguous(), grad, partials, ratio_max,
        options.clip_low, options.clip_high,
        options.dual_clip if options.dual_clip is not None else 0.0, options.kl_coef,
        max(lr_min, -3.0e38), lr_max,
        HAS_REF=ref_logps is not None,
        ADV_PER_SEQ=advantages.shape != logps.shape,
        SEQUENCE_LEVEL=options.importance_level == "sequence",
        USE_DUAL_CLIP=options.dual_clip is not None,
        KL_ESTIMATOR=KL_ESTIMATOR_CODES[options.kl_estimator], BLOCK=256)
    return partials, ratio_max, grad
