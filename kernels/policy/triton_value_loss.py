"""Triton kernel: the clipped value loss with its gradient, one program per sequence.

Same structure as `triton_policy_loss.py`: the gradient written is already multiplied by
the aggregation weight (0.5 included), so the backward is a multiply. Partial sums per
sequence: loss, valid count, clipped count, value sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_token_loss import clamp_nan, max_nan


@triton.jit
def _value_loss_kernel(v_ptr, old_ptr, ret_ptr, mask_ptr, cu_ptr, weight_ptr, grad_ptr,
                       partial_ptr, clip, USE_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    end = tl.load(cu_ptr + seq + 1).to(tl.int64)
    weight = tl.load(weight_ptr + seq)
    loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
    n_acc = tl.zeros([BLOCK], dtype=tl.float32)
    clip_acc = tl.zeros([BLOCK], dtype=tl.float32)
    v_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        inb = idx < end
        valid = inb & (tl.load(mask_ptr + idx, mask=inb, other=0.0) > 0)
        v = tl.load(v_ptr + idx, mask=inb, other=0.0).to(tl.float32)
        ret = tl.load(ret_ptr + idx, mask=inb, other=0.0).to(tl.float32)
        err = v - ret
        loss = err * err
        grad = err  # d (0.5 * err^2) / dv
        if USE_CLIP:
            old = tl.load(old_ptr + idx, mask=inb, other=0.0).to(tl.float32)
            # NaN-propagating clamp and max, as torch's: a NaN value is a NaN loss, not the bound
            clipped_err = clamp_nan(v, old - clip, old + clip) - ret
            clipped_loss = clipped_err * clipped_err
            clipped = clipped_loss > loss
            # the clipped term only wins when v is outside the clip range: no gradient
            grad = tl.where(clipped, 0.0, grad)
            loss = max_nan(loss, clipped_loss)
            clip_acc += (valid & clipped).to(tl.float32)
        tl.store(grad_ptr + idx, tl.where(valid, grad * weight, 0.0), mask=inb)
        loss_acc += tl.where(valid, loss, 0.0)
        n_acc += valid.to(tl.float32)
        v_acc += tl.where(valid, v, 0.0)
    out = partial_ptr + seq * 4
    tl.store(out + 0, tl.sum(loss_acc, axis=0))
    tl.store(out + 1, tl.sum(n_acc, axis=0))
    tl.store(out + 2, tl.sum(clip_acc, axis=0))
    tl.store(out + 3, tl.sum(v_acc, axis=0))


def value_loss_forward(values, old_values, returns, layout, clip, weights):
    """Flat `[N]` inputs -> (partials [S, 4], grad [N] = d loss / d values)."""
    num_seqs = layout.num_seqs
    values = values.contiguous()
    grad = torch.zeros(values.shape, device=values.device, dtype=torch.float32)
    partials = torch.zeros(num_seqs, 4, device=values.device, dtype=torch.float32)
    if num_seqs:
        _value_loss_kernel[(num_seqs,)](
            values, old_values.contiguous(), returns.contiguous(), layout.mask,
            layout.cu_seqlens.contiguous(), weights.contiguous(), grad, partials,
            0.0 if clip is None else clip, USE_CLIP=clip is not None, BLOCK=256)
    return partials, grad
