"""Triton kernel: per-token KL penalty and its derivative (elementwise, `kl_token`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_token_loss import kl_token


@triton.jit
def _kl_penalty_kernel(logp_ptr, ref_ptr, kl_ptr, grad_ptr, n, KL_ESTIMATOR: tl.constexpr,
                       BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < n
    lp = tl.load(logp_ptr + idx, mask=inb, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + idx, mask=inb, other=0.0).to(tl.float32)
    kl, grad = kl_token(lp - ref, KL_ESTIMATOR)
    tl.store(kl_ptr + idx, kl, mask=inb)
    tl.store(grad_ptr + idx, grad, mask=inb)


def kl_penalty_forward(logps: torch.Tensor, ref_logps: torch.Tensor, code: int):
    """Flat `[N]` inputs -> (kl [N] float32, d kl / d logps [N] float32)."""
    logps = logps.contiguous()
    ref = ref_logps.reshape(-1).contiguous()
    kl = torch.empty(logps.numel(), device=logps.device, dtype=torch.float32)
    grad = torch.empty_like(kl)
    block = 1024
    # grid dim 0 allows 2^31 - 1 programs: 2^41 tokens, more than any batch
    _kl_penalty_kernel[(triton.cdiv(logps.numel(), block),)](logps, ref, kl, grad, logps.numel(),
                                                              KL_ESTIMATOR=code, BLOCK=block)
    return kl, grad
