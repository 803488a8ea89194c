"""The "cuda" backends of group_advantages and gae: bindings to csrc/cuda/advantages.cu.

Inputs of float64 (or mixed dtypes) are cast to float32 for the kernels; float64 inputs get
float64 outputs back, as from the other backends. group_advantages shifts float64 rewards by
their group's first one before the cast, so an offset costs no precision.
"""

from __future__ import annotations

import torch

from ..backends import (cuda_dtype_code, cuda_kernel_inputs, cuda_module,
                        current_stream_handle, register)
from .group import ESTIMATOR_CODES, finish_rank_batch, kernel_scale

@register("group_advantages", "cuda")
def _group_advantages_cuda(rewards, group_size, estimator, scale, eps):
    rewards = rewards.detach()
    shifted = rewards
    if rewards.dtype == torch.float64:
        # The kernel takes the differences to each group's first reward (group.py's
        # _centered), but reads float32: take them here, in float64, before the cast.
        # Ranks too compare these differences, which tie only where float32 cannot tell
        # two of them apart, not two rewards on an offset.
        groups = rewards.reshape(-1, group_size)
        shifted = (groups - groups[:, :1]).reshape(-1)
    (r,) = cuda_kernel_inputs(shifted)
    out = torch.empty(r.numel(), device=r.device, dtype=torch.float32)
    scale_code, batch_denominator = kernel_scale(rewards, estimator, scale, eps)
    cuda_module().group_advantages(r.data_ptr(), cuda_dtype_code(r), out.data_ptr(),
                                   r.numel() // group_size, group_size, eps, batch_denominator,
                                   ESTIMATOR_CODES[estimator], scale_code,
                                   current_stream_handle(r.device))
    out = finish_rank_batch(out, estimator, scale, eps)
    return out.double() if rewards.dtype == torch.float64 else out


@register("gae", "cuda")
def _gae_cuda(rewards, values, layout, gamma, lam):
    r, v = cuda_kernel_inputs(rewards.detach(), values.detach())
    adv = torch.empty(r.numel(), device=r.device, dtype=torch.float32)
    ret = torch.empty_like(adv)
    cu = layout.cu_seqlens.to(torch.int32).contiguous()
    cuda_module().gae(r.data_ptr(), v.data_ptr(), cuda_dtype_code(r), layout.mask.data_ptr(),
                      cu.data_ptr(), adv.data_ptr(), ret.data_ptr(), layout.num_seqs, gamma, lam,
                      current_stream_handle(r.device))
    if torch.float64 in (rewards.dtype, values.dtype):
        return adv.double(), ret.double()
    return adv, ret
