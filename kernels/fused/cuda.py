"""The "cuda" chunk kernel of the fused LM-head losses: the host wrapper of csrc/cuda/fused.cu.

Same host signature and contract as `triton_fused_loss.fused_chunk_loss`, so the chunk loop
(`chunked.py`) and the ops' autograd are shared; `chunk_loss.chunk_loss_kernel` picks it.
"""

from __future__ import annotations

import torch

from ..backends import cuda_dtype_code, cuda_module, current_stream_handle
from .chunk_loss import POLICY, ChunkLoss


def _ptr(t: torch.Tensor | None, name: str) -> int:
    """The raw pointer of a per-token `[C]` fp32 input (0 for None)."""
    if t is None:
        return 0
    if t.dtype != torch.float32 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32 tensor, got {t.dtype} with "
                         f"strides {t.stride()}")
    return t.data_ptr()


def fused_chunk_loss(z: torch.Tensor, dz: torch.Tensor | None, targets: torch.Tensor,
                     weights: torch.Tensor, stats: torch.Tensor, temperature: float,
                     loss: ChunkLoss, *, old_logps: torch.Tensor | None = None,
                     advantages: torch.Tensor | None = None,
                     ref_logps: torch.Tensor | None = None,
                     seq_log_ratio: torch.Tensor | None = None) -> None:
    """Launch on one chunk: z `[C, V]` raw logits (unit stride in V); dz `[C, V]` with unit
    stride in V (may be z itself, or half precision for the bf16 GEMMs) receives
    d loss / d(raw logits), or None for statistics only; targets `[C]` int64; weights `[C]`
    fp32 (0: does not count); stats `[NUM_STATS, C]` fp32 with unit stride in C. Per-token
    policy inputs `[C]` fp32 contiguous when loss.kind == POLICY."""
    C, V = z.shape
    if z.stride(1) != 1:
        raise ValueError(f"z must have unit stride in V, got strides {z.stride()}")
    if dz is not None and (dz.shape != (C, V) or dz.stride(1) != 1):
        raise ValueError(f"dz must be [{C}, {V}] with unit stride in V, got "
                         f"{tuple(dz.shape)} with strides {dz.stride()}")
    if targets.dtype != torch.int64 or not targets.is_contiguous():
        raise ValueError(f"targets must be a contiguous int64 tensor, got {targets.dtype} "
                         f"with strides {targets.stride()}")
    if stats.dtype != torch.float32 or stats.stride(1) != 1:
        raise ValueError(f"stats must be float32 with unit stride in C, got {stats.dtype} "
                         f"with strides {stats.stride()}")
    policy = loss.kind == POLICY
    lr_min, lr_max = loss.log_ratio_bounds
    cuda_module().fused_chunk_loss(
        z.data_ptr(), cuda_dtype_code(z), 0 if dz is None else dz.data_ptr(),
        cuda_dtype_code(z if dz is None else dz), targets.data_ptr(), _ptr(weights, "weights"),
        _ptr(old_logps if policy else None, "old_logps"),
        _ptr(advantages if policy else None, "advantages"),
        _ptr(ref_logps if policy else None, "ref_logps"),
        _ptr(seq_log_ratio if policy else None, "seq_log_ratio"), stats.data_ptr(), C, V,
        z.stride(0), V if dz is None else dz.stride(0), stats.stride(0), temperature,
        loss.clip_low, loss.clip_high, 0.0 if loss.dual_clip is None else loss.dual_clip,
        loss.kl_coef, max(lr_min, -3.0e38), lr_max, int(loss.dual_clip is not None),
        int(policy and ref_logps is not None), loss.kl_estimator_code, loss.kind,
        int(policy and seq_log_ratio is not None), loss.entropy_coef, loss.label_smoothing,
        loss.softcap or 0.0, current_stream_handle(z.device))
