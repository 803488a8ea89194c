"""The "cuda" backends of policy_loss, value_loss and kl_penalty: bindings to csrc/cuda/policy.cu.

The compiled kernels take the token inputs in one dtype (float32, float16 or bfloat16);
inputs of mixed dtypes or float64 are cast to float32 first. The mask is the layout's
float32 mask, the aggregation weights are computed here exactly as for the Triton backend
(`policy_loss.run_fused_policy_loss`), and autograd goes through
`kernels.autograd.fused_local_grad`.
"""

from __future__ import annotations

import torch

from ..autograd import fused_local_grad
from ..backends import (cuda_dtype_code, cuda_kernel_inputs, cuda_module,
                        current_stream_handle, register)
from .kl import KL_ESTIMATOR_CODES, compute_dtype
from .policy_loss import run_fused_policy_loss
from .value_loss import run_fused_value_loss


def _policy_loss_forward(logps, old_logps, advantages, ref_logps, layout, options, weights):
    """Same contract as triton_policy_loss.policy_loss_forward."""
    has_ref = ref_logps is not None
    lp, old, adv, ref = cuda_kernel_inputs(logps, old_logps, advantages,
                                           ref_logps if has_ref else logps)
    num_seqs, device = layout.num_seqs, lp.device
    grad = torch.empty(lp.numel(), device=device, dtype=torch.float32)
    partials = torch.zeros(num_seqs, 8, device=device, dtype=torch.float32)
    ratio_max = torch.zeros(num_seqs, device=device, dtype=torch.float32)
    lr_min, lr_max = options.log_ratio_bounds
    cu = layout.cu_seqlens.to(torch.int32).contiguous()
    cuda_module().policy_loss(
        lp.data_ptr(), old.data_ptr(), adv.data_ptr(), ref.data_ptr(), cuda_dtype_code(lp),
        layout.mask.data_ptr(), cu.data_ptr(), weights.contiguous().data_ptr(), grad.data_ptr(),
        partials.data_ptr(), ratio_max.data_ptr(), num_seqs, options.clip_low, options.clip_high,
        options.dual_clip or 0.0, options.kl_coef, max(lr_min, -3.0e38), lr_max,
        int(options.dual_clip is not None), int(has_ref), KL_ESTIMATOR_CODES[options.kl_estimator],
        int(advantages.shape != logps.shape), int(options.importance_level == "sequence"),
        current_stream_handle(device))
    return partials, ratio_max, grad


@register("policy_loss", "cuda")
def _policy_loss_cuda(logps, old_logps, advantages, ref_logps, layout, options):
    return run_fused_policy_loss(_policy_loss_forward, logps, old_logps, advantages, ref_logps,
                                 layout, options)


def _value_loss_forward(values, old_values, returns, layout, clip, weights):
    """The cuda twin of triton_value_loss.value_loss_forward: (partials [S, 4], grad [N])."""
    vv, old, ret = cuda_kernel_inputs(values, old_values, returns)
    cu = layout.cu_seqlens.to(torch.int32).contiguous()
    grad = torch.empty(vv.numel(), device=vv.device, dtype=torch.float32)
    partials = torch.zeros(layout.num_seqs, 4, device=vv.device, dtype=torch.float32)
    cuda_module().value_loss(
        vv.data_ptr(), old.data_ptr(), ret.data_ptr(), cuda_dtype_code(vv),
        layout.mask.data_ptr(), cu.data_ptr(), weights.data_ptr(), grad.data_ptr(),
        partials.data_ptr(), layout.num_seqs, 0.0 if clip is None else clip,
        int(clip is not None), current_stream_handle(vv.device))
    return partials, grad


@register("value_loss", "cuda")
def _value_loss_cuda(values, old_values, returns, layout, clip, loss_agg, horizon):
    return run_fused_value_loss(_value_loss_forward, values, old_values, returns, layout, clip,
                                loss_agg, horizon)


@register("kl_penalty", "cuda")
def _kl_penalty_cuda(logps, ref_logps, estimator):
    dtype = compute_dtype(logps, ref_logps)

    def kernel(lp):
        lp32, ref = cuda_kernel_inputs(lp, ref_logps.reshape(-1))
        kl = torch.empty(lp32.numel(), device=lp32.device, dtype=torch.float32)
        grad = torch.empty_like(kl)
        cuda_module().kl_penalty(lp32.data_ptr(), ref.data_ptr(), cuda_dtype_code(lp32),
                                 kl.data_ptr(), grad.data_ptr(), kl.numel(),
                                 KL_ESTIMATOR_CODES[estimator], current_stream_handle(lp32.device))
        return kl.to(dtype), [grad]

    return fused_local_grad(kernel, [logps.reshape(-1)]).reshape(logps.shape)
