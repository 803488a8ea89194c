"""Triton kernel: group-relative advantages, one program per group of contiguous rewards.

A group (G <= a few hundred answers per prompt) fits in one tile of BLOCK = next_pow2(G)
lanes, so mean, Bessel std and the all-equal test are tile reductions; "rank" compares the
group pairwise in a [BLOCK, BLOCK] tile (average ranks for ties: #smaller + (#equal + 1)/2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .group import ESTIMATOR_CODES, finish_rank_batch, kernel_scale


# group_size is not specialized: Triton would turn a size of 1 into a constexpr
@triton.jit(do_not_specialize=["group_size"])
def _group_advantages_kernel(r_ptr, out_ptr, group_size, eps, batch_denominator,
                             ESTIMATOR: tl.constexpr, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    # ESTIMATOR: 0 grpo, 1 dr_grpo, 2 rloo, 3 rank; SCALE: 0 group, 1 batch, 2 none
    group = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    inb = lanes < group_size
    base = group * group_size
    r = tl.load(r_ptr + base + lanes, mask=inb, other=0.0)  # in the rewards' own dtype
    n = group_size.to(tl.float32)
    if ESTIMATOR == 3:  # ranks compare the rewards as given (float64 ones too)
        if r_ptr.dtype.element_ty != tl.float64:
            # 16-bit rewards in float32 (exact): the interpreter compares bfloat16 by its bits
            r = r.to(tl.float32)
        other = inb[None, :]
        less = tl.sum((other & (r[None, :] < r[:, None])).to(tl.float32), axis=1)
        equal = tl.sum((other & (r[None, :] == r[:, None])).to(tl.float32), axis=1)
        x = less + (equal + 1.0) * 0.5
    else:
        # the differences to the group's first reward (group.py's _centered): exact for
        # 16- and 32-bit rewards, taken in float64 for float64 ones, then float32
        first = tl.load(r_ptr + base)
        if r_ptr.dtype.element_ty == tl.float64:
            x = (r - first).to(tl.float32)
        else:
            x = r.to(tl.float32) - first.to(tl.float32)
    mean = tl.sum(tl.where(inb, x, 0.0), axis=0) / n
    centered = tl.where(inb, x - mean, 0.0)
    # all-equal groups (and groups of one) get exactly 0, whatever the rounding of the mean
    constant = tl.max(tl.where(inb, x, -float("inf")), axis=0) == \
        tl.min(tl.where(inb, x, float("inf")), axis=0)
    if ESTIMATOR == 2:  # rloo: r - mean of the others = G/(G-1) (r - mean)
        adv = centered * (n / tl.maximum(n - 1.0, 1.0))
    elif ESTIMATOR == 1:  # dr_grpo
        adv = centered
    elif SCALE == 0:
        std = tl.sqrt(tl.sum(centered * centered, axis=0) / tl.maximum(n - 1.0, 1.0))
        adv = centered / (std + eps)
    elif SCALE == 1:
        adv = centered / batch_denominator
    else:
        adv = centered
    adv = tl.where(constant, 0.0, adv)
    tl.store(out_ptr + base + lanes, adv, mask=inb)


def group_advantages_forward(rewards: torch.Tensor, group_size: int, estimator: str, scale: str,
                             eps: float) -> torch.Tensor:
    rewards = rewards.detach().contiguous()
    out = torch.empty(rewards.numel(), device=rewards.device, dtype=torch.float32)
    num_groups = rewards.numel() // group_size
    scale_code, batch_denominator = kernel_scale(rewards, estimator, scale, eps)
    _group_advantages_kernel[(num_groups,)](rewards, out, group_size, eps, batch_denominator,
                                            ESTIMATOR=ESTIMATOR_CODES[estimator],
                                            SCALE=scale_code,
                                            BLOCK=max(16, triton.next_power_of_2(group_size)))
    return finish_rank_batch(out, estimator, scale, eps)
