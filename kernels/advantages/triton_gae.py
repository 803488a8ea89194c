"""Triton kernel: masked GAE as two linear-recurrence scans, one program per sequence.

GAE's backward recursion is affine in the carried quantity, x_t = a_t x_{t+1} + b_t, and
affine maps compose associatively, so a tile of BLOCK tokens is solved by one
`tl.associative_scan` instead of BLOCK dependent scalar steps. The program walks its
sequence from the end in tiles; lanes hold the tile's tokens in reverse time order
(lane 0 = latest), so a forward scan runs backwards in time, and each tile hands the value
at its earliest token to the next tile as the carry.

Two recurrences (m = mask; masked tokens are identities (a=1, b=0) that carry across):
- w_t = V of the next valid token after t:  w_t = (1 - m_{t+1}) w_{t+1} + m_{t+1} V_{t+1}
  (inputs loaded at t+1, so the scan is inclusive; 0 after the sequence's last token);
- A_t = m_t (delta_t + gamma lam A_{t+1}) + (1 - m_t) A_{t+1},
  delta_t = r_t + gamma w_t - V_t.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _compose(a_later, b_later, a_now, b_now):
    # apply the later map first, then this token's: x = a_now (a_later c + b_later) + b_now
    return a_now * a_later, a_now * b_later + b_now


@triton.jit
def _pick_last(x, lanes, BLOCK: tl.constexpr):
    return tl.sum(tl.where(lanes == BLOCK - 1, x, 0.0), axis=0)


@triton.jit
def _gae_kernel(r_ptr, v_ptr, mask_ptr, cu_ptr, adv_ptr, ret_ptr, gamma, lam,
                BLOCK: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    end = tl.load(cu_ptr + seq + 1).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    next_value = 0.0  # w at the earliest token of the tile processed before (later in time)
    next_adv = 0.0
    num_tiles = (end - start + BLOCK - 1) // BLOCK
    for k in range(0, num_tiles):
        t = end - 1 - k * BLOCK - lanes  # lane 0 is the latest token of the tile
        inb = t >= start
        m = tl.load(mask_ptr + t, mask=inb, other=0.0)
        r = tl.load(r_ptr + t, mask=inb, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t, mask=inb, other=0.0).to(tl.float32)
        nxt = inb & (t + 1 < end)
        m1 = tl.load(mask_ptr + t + 1, mask=nxt, other=0.0)
        v1 = tl.load(v_ptr + t + 1, mask=nxt, other=0.0).to(tl.float32)
        # select, never multiply by the mask: masked padding may hold inf/NaN, and 0 * NaN
        # would leak into the valid tokens through the scans
        a, b = tl.associative_scan((1.0 - m1, tl.where(m1 > 0, v1, 0.0)), 0, _compose)
        w = a * next_value + b
        delta = r + gamma * w - v
        a, b = tl.associative_scan((m * (gamma * lam) + (1.0 - m), tl.where(m > 0, delta, 0.0)),
                                   0, _compose)
        adv = a * next_adv + b
        valid = inb & (m > 0)
        tl.store(adv_ptr + t, tl.where(valid, adv, 0.0), mask=inb)
        tl.store(ret_ptr + t, tl.where(valid, adv + v, 0.0), mask=inb)
        # out-of-range lanes are identities, so the last lane holds the earliest token's value
        next_value = _pick_last(tl.where(m > 0, v, w), lanes, BLOCK)
        next_adv = _pick_last(adv, lanes, BLOCK)


def gae_forward(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                cu_seqlens: torch.Tensor, gamma: float, lam: float):
    """Flat `[N]` inputs -> (advantages [N], returns [N]) float32."""
    adv = torch.empty(rewards.numel(), device=rewards.device, dtype=torch.float32)
    ret = torch.empty_like(adv)
    num_seqs = cu_seqlens.numel() - 1
    if num_seqs:
        _gae_kernel[(num_seqs,)](rewards.detach().contiguous(), values.detach().contiguous(),
                                 mask.contiguous(), cu_seqlens.contiguous(), adv, ret,
                                 gamma, lam, BLOCK=128)
    return adv, ret
