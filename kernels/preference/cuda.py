"""The "cuda" backends of dpo_loss and kto_loss: thin bindings to csrc/cuda/preference.cu.

The compiled kernels (one launch: losses, local gradients and rewards) take raw pointers of
one input dtype (float32, float16 or bfloat16); inputs of mixed dtypes or float64 are cast to
float32 first (an [S] copy), and float64 inputs get float64 losses and rewards back, as from the
torch reference. Autograd goes through `kernels.autograd.fused_local_grad`.
"""

from __future__ import annotations

import math

import torch

from ..autograd import fused_local_grad
from ..backends import (cuda_dtype_code, cuda_kernel_inputs, cuda_module,
                        current_stream_handle)
from ..policy.kl import compute_dtype
from .dpo import DPOProblem
from .kto import KTOProblem

def _float_buffers(n: int, S: int, device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(S, device=device, dtype=torch.float32) for _ in range(n)]


def dpo_loss_cuda(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
                  rejected_lengths, delta, problem: DPOProblem):
    """The "cuda" backend of `dpo_loss` (interface of `dpo._dpo_torch`)."""

    def kernel(pc, pr, rc, rr):
        dtype = compute_dtype(pc, pr, rc, rr)
        pc, pr, rc, rr = cuda_kernel_inputs(pc, pr, rc, rr)
        S, device = pc.numel(), pc.device
        loss, g_pc, g_pr, g_rc, g_rr, rew_c, rew_r = _float_buffers(7, S, device)
        len_c = chosen_lengths.float().contiguous() if problem.normalize else loss  # unread if not
        len_r = rejected_lengths.float().contiguous() if problem.normalize else loss
        delta_arg = delta.float().contiguous() if delta is not None else loss
        eps = problem.label_smoothing or 1e-3  # exo_pair's TRL default when eps = 0
        cuda_module().dpo_loss(
            pc.data_ptr(), pr.data_ptr(), rc.data_ptr(), rr.data_ptr(), cuda_dtype_code(pc),
            len_c.data_ptr(), len_r.data_ptr(), delta_arg.data_ptr(),
            loss.data_ptr(), g_pc.data_ptr(), g_pr.data_ptr(), g_rc.data_ptr(), g_rr.data_ptr(),
            rew_c.data_ptr(), rew_r.data_ptr(), S, problem.beta, problem.label_smoothing,
            problem.discopop_tau, math.log(eps), math.log1p(-eps), problem.code,
            int(problem.normalize), current_stream_handle(device))
        return loss.to(dtype), [g_pc, g_pr, g_rc, g_rr], rew_c.to(dtype), rew_r.to(dtype)

    return fused_local_grad(kernel, (policy_chosen, policy_rejected, ref_chosen, ref_rejected),
                            extra_outputs=2)


def kto_loss_cuda(policy_logps, ref_logps, desirable, kl, problem: KTOProblem):
    """The "cuda" backend of `kto_loss` (interface of `kto._kto_torch`)."""
    flags = desirable.contiguous().view(torch.uint8)
    z0 = kl.float().contiguous()

    def kernel(policy, ref):
        dtype = compute_dtype(policy, ref)
        policy, ref = cuda_kernel_inputs(policy, ref)
        S, device = policy.numel(), policy.device
        loss, g_policy, g_ref, reward = _float_buffers(4, S, device)
        cuda_module().kto_loss(
            policy.data_ptr(), ref.data_ptr(), cuda_dtype_code(policy), flags.data_ptr(),
            z0.data_ptr(), loss.data_ptr(), g_policy.data_ptr(), g_ref.data_ptr(),
            reward.data_ptr(), S, problem.beta, problem.desirable_weight,
            problem.undesirable_weight, current_stream_handle(device))
        return loss.to(dtype), [g_policy, g_ref], reward.to(dtype)

    return fused_local_grad(kernel, (policy_logps, ref_logps), extra_outputs=1)
