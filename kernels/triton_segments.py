"""Triton kernel: per-segment sums over packed tokens (one program per segment).

Segments are contiguous ranges `[cu[s], cu[s+1])`, so a program streams its range in
BLOCK-sized tiles and accumulates in fp32; there is no atomics and no grid limit on N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_sum_kernel(values_ptr, cu_ptr, out_ptr, BLOCK: tl.constexpr):
    seg = tl.program_id(0)
    start = tl.load(cu_ptr + seg).to(tl.int64)
    end = tl.load(cu_ptr + seg + 1).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(values_ptr + idx, mask=idx < end, other=0.0).to(tl.float32)
    tl.store(out_ptr + seg, tl.sum(acc, axis=0))


def segment_sum_forward(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    num_segments = cu_seqlens.numel() - 1
    out = torch.empty(num_segments, device=values.device, dtype=torch.float32)
    if num_segments:
        _segment_sum_kernel[(num_segments,)](values.contiguous(), cu_seqlens.contiguous(), out,
                                             BLOCK=1024)
    return out
