"""Triton kernel of the fused LM-head losses: one chunk of logits -> loss and d loss / d logits.

The host (`chunked.py`) computes a chunk of raw logits `[C, V]` with one fp32-accumulating
matmul; this kernel then makes two sweeps over the chunk's rows, BLOCK_N rows per program:

1. statistics: the log-prob forward's own sweep `row_stats` (`logprobs/triton_forward.py`)
   gives each row's lse, entropy and target log-prob (and, for label smoothing, the sum of
   its logits);
2. the per-token loss and its derivatives with respect to the log-prob and the entropy:
   - LOSS == POLICY: `policy_token_loss` (`policy/triton_token_loss.py`, the policy loss's
     own per-token math) plus the entropy bonus -entropy_coef * H_t;
   - LOSS == CROSS_ENTROPY: -logp_t, or with label smoothing eps
     (1 - eps)(-logp_t) + eps (lse - mean_j z_j);
   each multiplied by the token's aggregation weight (known before the launch);
3. (NEED_GRAD) a second sweep overwrites the chunk with d loss / d(raw logits): the
   log-prob backward's own sweep `dlogits_rows` (`logprobs/triton_backward.py`, with its
   label-smoothing switch); the buffer may be the
   logits buffer itself (same dtype: in place) or a half-precision one for the bf16 GEMMs.

ONE kernel serves both losses (a constexpr switch), and no tile math is copied: a change to
the log-prob or policy formulas reaches the fused ops automatically. The sweeps read the
chunk twice and write it once: memory-bound work next to the chunk's 6 C H V GEMM FLOPs.
Per-token results go to `stats [NUM_STATS, M]` (rows: `chunk_loss.STAT_*`) for the host's metrics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..logprobs.triton_backward import dlogits_rows
from ..logprobs.triton_forward import logits_blocks, row_stats
from ..policy.triton_token_loss import policy_token_loss

# The loss codes and the rows of the per-token stats buffer live in chunk_loss.py (shared with
# the CUDA kernel); the kernel writes the rows by number: a jit function cannot read plain
# module globals.
from .chunk_loss import POLICY, ChunkLoss


@triton.jit
def _fused_chunk_kernel(z_ptr, dz_ptr, t_ptr, w_ptr, old_ptr, adv_ptr, ref_ptr, seq_lr_ptr,
                        stats_ptr, C, V, stride_zn, stride_dzn, stride_stats, inv_temp,
                        clip_low, clip_high, dual_clip, kl_coef, log_ratio_min, log_ratio_max,
                        entropy_coef, smoothing, cap,
                        LOSS: tl.constexpr, NEED_GRAD: tl.constexpr,
                        HAS_ENTROPY: tl.constexpr, HAS_REF: tl.constexpr,
                        SEQUENCE_LEVEL: tl.constexpr, USE_DUAL_CLIP: tl.constexpr,
                        KL_ESTIMATOR: tl.constexpr, SMOOTHING: tl.constexpr,
                        SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < C
    targets = tl.load(t_ptr + rows, mask=row_mask, other=-1)
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_zn

    # sweep 1: row statistics, the log-prob forward's own sweep
    lse, entropy, logp, zsum = row_stats(z_rows, targets, row_mask, V, inv_temp, cap, SMOOTHING,
                                         SOFTCAP, BLOCK_N, BLOCK_V)

    # the per-token loss and d loss / d logp, d loss / d entropy (weighted: 0 where not counted)
    weight = tl.load(w_ptr + rows, mask=row_mask, other=0.0)
    live = weight != 0.0
    stats = stats_ptr + rows
    g_entropy = tl.zeros([BLOCK_N], dtype=tl.float32)
    if LOSS == 0:  # POLICY
        old = tl.load(old_ptr + rows, mask=row_mask, other=0.0)
        adv = tl.load(adv_ptr + rows, mask=row_mask, other=0.0)
        ref_lr = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_REF:
            ref_lr = logp - tl.load(ref_ptr + rows, mask=row_mask, other=0.0)
        log_ratio = logp - old
        if SEQUENCE_LEVEL:  # GSPO: the sequence's mean log-ratio, from a first pass
            log_ratio = tl.load(seq_lr_ptr + rows, mask=row_mask, other=0.0)
        loss, grad, pg, ratio, clipped, dual_clipped, kl = policy_token_loss(
            log_ratio, adv, ref_lr, clip_low, clip_high, dual_clip, kl_coef, log_ratio_min,
            log_ratio_max, USE_DUAL_CLIP, HAS_REF, KL_ESTIMATOR)
        if HAS_ENTROPY:
            loss -= entropy_coef * entropy
            g_entropy = tl.where(live, -entropy_coef * weight, 0.0)
        # where, not multiply: a token that does not count passes nothing, even a NaN
        g_logp = tl.where(live, grad * weight, 0.0)
        tl.store(stats + 3 * stride_stats, pg, mask=row_mask)
        tl.store(stats + 4 * stride_stats, ratio, mask=row_mask)
        tl.store(stats + 5 * stride_stats, clipped.to(tl.float32), mask=row_mask)
        tl.store(stats + 6 * stride_stats, dual_clipped.to(tl.float32), mask=row_mask)
        tl.store(stats + 7 * stride_stats, kl, mask=row_mask)
    else:  # CROSS_ENTROPY
        loss = -logp
        if SMOOTHING:
            # (1 - eps) (-logp_t) + eps * mean_j (-log p_j),  mean_j (-log p_j) = lse - mean_j z_j
            loss = (1.0 - smoothing) * loss + smoothing * (lse - zsum / V)
        g_logp = -weight
    tl.store(stats, logp, mask=row_mask)
    tl.store(stats + stride_stats, entropy, mask=row_mask)
    tl.store(stats + 2 * stride_stats, loss, mask=row_mask)

    # sweep 2: overwrite the chunk with d loss / d(raw logits)
    if NEED_GRAD:
        dz_rows = dz_ptr + rows.to(tl.int64)[:, None] * stride_dzn
        dlogits_rows(z_rows, dz_rows, targets, row_mask, lse, entropy, g_logp, g_entropy,
                     weight * smoothing, V, inv_temp, cap, HAS_ENTROPY, SMOOTHING, SOFTCAP,
                     BLOCK_V)


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


# Programs a chunk should give the GPU at least (several per SM of an H100/H200), before
# rows are grouped: a budget-sized chunk of a 150k vocabulary has only ~300 rows.
MIN_PROGRAMS = 512


def _blocks(z: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_V). On GPU: long vocabulary strips (the log-prob logits kernels'
    BLOCK_V) and up to their BLOCK_N rows per program, fewer when the chunk has too few rows
    to fill the GPU (the sweeps are memory-bound). The interpreter runs programs one after
    another and pays per tile op, so it gets one program of large tiles per chunk."""
    C = max(z.shape[0], 1)
    if _interpreted(z):
        return min(512, triton.next_power_of_2(C)), 1024
    block_n, block_v = logits_blocks(z)
    while block_n > 1 and C // block_n < MIN_PROGRAMS:
        block_n //= 2
    return block_n, block_v


def fused_chunk_loss(z: torch.Tensor, dz: torch.Tensor | None, targets: torch.Tensor,
                     weights: torch.Tensor, stats: torch.Tensor, temperature: float,
                     loss: ChunkLoss, *, old_logps: torch.Tensor | None = None,
                     advantages: torch.Tensor | None = None,
                     ref_logps: torch.Tensor | None = None,
                     seq_log_ratio: torch.Tensor | None = None) -> None:
    """Launch on one chunk. z `[C, V]` raw logits (unit stride in V; fp32 recommended);
    dz `[C, V]` (may be z itself) receives d loss / d(raw logits), or None for statistics
    only; targets `[C]` int64 (any value where weights is 0); weights `[C]` fp32, the
    token's aggregation weight (0: does not count); stats `[NUM_STATS, C]` fp32 view.
    Per-token policy inputs `[C]` fp32 when loss.kind == POLICY."""
    C, V = z.shape
    if C == 0:
        return
    block_n, block_v = _blocks(z)
    need_grad = dz is not None
    policy = loss.kind == POLICY
    dummy = weights
    lr_min, lr_max = loss.log_ratio_bounds
    _fused_chunk_kernel[(triton.cdiv(C, block_n),)](
        z, dz if need_grad else z, targets, weights,
        old_logps if policy else dummy, advantages if policy else dummy,
        ref_logps if ref_logps is not None else dummy,
        seq_log_ratio if seq_log_ratio is not None else dummy,
        stats, C, V, z.stride(0), dz.stride(0) if need_grad else z.stride(0), stats.stride(0),
        1.0 / temperature, loss.clip_low, loss.clip_high,
        loss.dual_clip if loss.dual_clip is not None else 0.0, loss.kl_coef,
        max(lr_min, -3.0e38), lr_max, loss.entropy_coef, loss.label_smoothing,
        loss.softcap or 1.0, LOSS=loss.kind, NEED_GRAD=need_grad, HAS_ENTROPY=policy and loss.entropy_coef != 0.0,
        HAS_REF=ref_logps is not None, SEQUENCE_LEVEL=seq_log_ratio is not None,
        USE_DUAL_CLIP=loss.dual_clip is not None, KL_ESTIMATOR=loss.kl_estimator_code,
        SMOOTHING=loss.label_smoothing != 0.0, SOFTCAP=loss.softcap is not None,
        BLOCK_N=block_n, BLOCK_V=block_v)
