"""Triton backward of the log-prob ops: recompute logits tiles, never hold [N, V].

Reusable tiles (a fused loss kernel calls these, it does not copy them):
- `dlogits_tile`: per-token coefficients (g_logp, g_entropy) and the saved (lse, entropy)
  -> d loss / d z for one `[BLOCK_N, BLOCK_V]` tile of scaled logits z:
      dz_j = g_logp (1[j=t] - p_j) - g_entropy p_j (log p_j + entropy)
- `dlogits_rows`: the sweep of `dlogits_tile` over whole rows of materialized logits
  (the logits backward here, and the fused loss kernel's gradient sweep);
- `accumulate_grad_tile`: a tile of d loss / d(raw logits) -> its contributions
  dz @ W_tile to grad_hidden and dz.T @ h_tile to grad_weight (fp32 atomics).

Accumulation strategy for `linear_backward` (reasoned, not measured: no GPU was available
while this was written; bench it before trusting it):
one kernel over (row block x vocab block) tiles. Each tile recomputes its logits once
(2 BN BV H FLOPs; soft-capped as in the forward, with dz chained through the cap), turns
them into dz, then adds dz @ W_tile into grad_hidden and dz.T @ h_tile into grad_weight
with fp32 atomics, one H slice at a time. Backward costs 6 N V H FLOPs, the least any
recomputing scheme can do.
- The alternative, two kernels (grad_hidden tiled over tokens, grad_weight tiled over
  vocab), needs no atomics and is deterministic, but recomputes every logits tile twice
  (8 N V H, +33% FLOPs), and the token kernel's [BN, H] accumulator does not fit on chip
  for H of 4096+, so it would stream its accumulator through global memory anyway: the
  same traffic as the atomics, without their parallelism.
- Each atomic add carries BV (grad_hidden) or BN (grad_weight) multiply-adds, so atomic
  traffic is ~1/64 to 1/128 of the tensor-core work; programs are grouped (GROUP_N row
  blocks per vocabulary sweep) so neighbours reuse the same weight tiles from L2.
- Costs: fp32 summation order varies between runs (not bitwise deterministic), and
  bf16/fp16 weights need an fp32 [V, H] gradient buffer, cast once at the end.
Tiles whose tokens all have zero incoming gradient (ignored prompt tokens) are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_forward import dot_precision, linear_blocks, logits_blocks, logits_tile, mma, tanh


@triton.jit
def dlogits_tile(z, cols, targets, lse, entropy, g_logp, g_entropy, col_mask,
                 HAS_ENTROPY: tl.constexpr):
    """d loss / d z `[BN, BV]` (0 outside col_mask); g_* must be 0 on ignored rows."""
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    coef = g_logp[:, None] + tl.zeros_like(z)
    if HAS_ENTROPY:
        # log p is taken as 0 where p = 0 (a masked -inf logit): p * coef is then 0, not NaN.
        coef += g_entropy[:, None] * (tl.where(p > 0, log_p, 0.0) + entropy[:, None])
    dz = tl.where(cols[None, :] == targets[:, None], g_logp[:, None], 0.0) - p * coef
    return tl.where(col_mask[None, :], dz, 0.0)


@triton.jit
def dlogits_rows(z_rows, dz_rows, targets, row_mask, lse, entropy, g_logp, g_entropy,
                 smoothing_weight, V, inv_temp, cap, HAS_ENTROPY: tl.constexpr,
                 SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """One sweep over BLOCK_N rows of materialized raw logits (`z_rows`, `dz_rows`: row base
    pointers) writing d loss / d(raw logits) in dz's dtype; dz may alias z (in place: each
    tile is read before it is written). With SOFTCAP the logits are cap * tanh(raw / cap)
    and the gradient is chained through it (times 1 - tanh^2).

    SMOOTHING adds label smoothing's own term, smoothing_weight_t (1[j=t] - 1/V): the
    derivative of eps (lse - mean_j z_j) minus the eps share that g_logp already gave the
    target (smoothing_weight = aggregation weight * eps, per row)."""
    for v in range(0, V, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        mask = row_mask[:, None] & col_mask[None, :]
        z = tl.load(z_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            t = tanh(z / cap)
            z = cap * t
        z = z * inv_temp
        dz = dlogits_tile(z, cols, targets, lse, entropy, g_logp, g_entropy, col_mask,
                          HAS_ENTROPY)
        if SMOOTHING:
            one_hot = (cols[None, :] == targets[:, None]).to(tl.float32)
            dz += tl.where(col_mask[None, :], smoothing_weight[:, None] * (one_hot - 1.0 / V),
                           0.0)
        if SOFTCAP:
            dz = dz * (1.0 - t * t)
        tl.store(dz_rows + cols[None, :], (dz * inv_temp).to(dz_rows.dtype.element_ty),
                 mask=mask)


@triton.jit
def accumulate_grad_tile(dz, h_ptr, w_ptr, gh_ptr, gw_ptr, rows, cols, N, V, H, stride_hn,
                         stride_wv, NEED_H: tl.constexpr, NEED_W: tl.constexpr,
                         BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """grad_hidden[rows] += dz @ W[cols]; grad_weight[cols] += dz.T @ hidden[rows].

    dz `[BN, BV]` fp32 is d loss / d(raw logits), 0 outside the valid rows/cols.
    gh_ptr `[N, H]` and gw_ptr `[V, H]` are contiguous fp32.
    """
    row_mask = rows < N
    col_mask = cols < V
    # Tensor cores take the input dtype: dz is rounded to bf16/fp16 for bf16/fp16 inputs.
    dz_in = dz.to(h_ptr.dtype.element_ty)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wv
    gh_rows = gh_ptr + rows.to(tl.int64)[:, None] * H
    gw_rows = gw_ptr + cols.to(tl.int64)[:, None] * H
    for k in range(0, H, BLOCK_H):
        ks = k + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        if NEED_H:
            w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            gh = mma(dz_in, w, tl.zeros([dz.shape[0], BLOCK_H], dtype=tl.float32), PRECISION)
            tl.atomic_add(gh_rows + ks[None, :], gh, mask=row_mask[:, None] & k_mask[None, :],
                          sem="relaxed")
        if NEED_W:
            h = tl.load(h_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            gw = mma(tl.trans(dz_in), h, tl.zeros([dz.shape[1], BLOCK_H], dtype=tl.float32),
                     PRECISION)
            tl.atomic_add(gw_rows + ks[None, :], gw, mask=col_mask[:, None] & k_mask[None, :],
                          sem="relaxed")


@triton.jit
def _linear_backward_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr,
                            gh_ptr, gw_ptr, gb_ptr, N, V, H, stride_hn, stride_wv, inv_temp,
                            cap, num_n_blocks, num_v_blocks, HAS_BIAS: tl.constexpr,
                            SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr,
                            NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
                            PRECISION: tl.constexpr):
    # Grouped order: GROUP_N row blocks sweep the vocabulary together, so each weight tile
    # is read from HBM once per group and from L2 by the others.
    pid = tl.program_id(0)
    per_group = GROUP_N * num_v_blocks
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n_blocks - first_n, GROUP_N)
    n_block = first_n + (pid % per_group) % group_size
    v_block = (pid % per_group) // group_size

    rows = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = v_block * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    g_logp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
    live = tl.abs(g_logp)
    g_entropy = g_logp
    entropy = g_logp
    if HAS_ENTROPY:
        g_entropy = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
        entropy = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        live += tl.abs(g_entropy)
    if tl.max(live, axis=0) > 0:
        targets = tl.load(t_ptr + rows, mask=row_mask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        z = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_hn, stride_wv,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
        if SOFTCAP:  # the forward's soft_cap, keeping tanh for the chain rule
            t = tanh(z / cap)
            z = cap * t
        dz = dlogits_tile(z * inv_temp, cols, targets, lse, entropy, g_logp, g_entropy,
                          cols < V, HAS_ENTROPY) * inv_temp
        if SOFTCAP:
            dz = dz * (1.0 - t * t)  # d(cap tanh(raw / cap)) / d raw
        accumulate_grad_tile(dz, h_ptr, w_ptr, gh_ptr, gw_ptr, rows, cols, N, V, H,
                             stride_hn, stride_wv, NEED_H, NEED_W, BLOCK_H, PRECISION)
        if NEED_B:
            tl.atomic_add(gb_ptr + cols, tl.sum(dz, axis=0), mask=cols < V, sem="relaxed")


@triton.jit
def _logits_backward_kernel(z_ptr, t_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, gz_ptr, N, V,
                            stride_zn, inv_temp, cap, HAS_ENTROPY: tl.constexpr,
                            SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    targets = tl.load(t_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g_logp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
    g_entropy = g_logp
    entropy = g_logp
    if HAS_ENTROPY:
        g_entropy = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
        entropy = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_zn
    gz_rows = gz_ptr + rows.to(tl.int64)[:, None] * V
    dlogits_rows(z_rows, gz_rows, targets, row_mask, lse, entropy, g_logp, g_entropy, g_logp,
                 V, inv_temp, cap, HAS_ENTROPY, False, SOFTCAP, BLOCK_V)


def linear_backward(hidden, weight, bias, targets, lse, entropy, g_logp, g_entropy,
                    temperature: float, need: tuple[bool, bool, bool],
                    softcap: float | None = None):
    """Gradients (hidden, weight, bias) from g_logp / g_entropy `[N]` fp32 (0 where ignored);
    with a softcap, of the capped logits, as `linear_forward`'s."""
    N, H = hidden.shape
    V = weight.shape[0]
    need_h, need_w, need_b = need
    cfg = linear_blocks(hidden)
    num_n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    num_v_blocks = triton.cdiv(V, cfg["BLOCK_V"])
    f32 = dict(device=hidden.device, dtype=torch.float32)
    gh = torch.zeros(N if need_h else 1, H, **f32)
    gw = torch.zeros(V if need_w else 1, H, **f32)
    gb = torch.zeros(V if need_b else 1, **f32)
    has_entropy = g_entropy is not None
    _linear_backward_kernel[(num_n_blocks * num_v_blocks,)](
        hidden, weight, bias if bias is not None else weight, targets, lse,
        entropy if has_entropy else lse, g_logp, g_entropy if has_entropy else g_logp,
        gh, gw, gb, N, V, H, hidden.stride(0), weight.stride(0), 1.0 / temperature,
        softcap or 1.0, num_n_blocks, num_v_blocks, HAS_BIAS=bias is not None,
        SOFTCAP=softcap is not None, HAS_ENTROPY=has_entropy, NEED_H=need_h, NEED_W=need_w,
        NEED_B=need_b, GROUP_N=8, PRECISION=dot_precision(hidden), **cfg)
    return (gh.to(hidden.dtype) if need_h else None,
            gw.to(weight.dtype) if need_w else None,
            gb.to(bias.dtype) if need_b else None)


def logits_backward(logits, targets, lse, entropy, g_logp, g_entropy, temperature: float,
                    ignore_index: int, out: torch.Tensor | None = None,
                    softcap: float | None = None):
    """grad_logits `[N, V]` (logits' dtype, or written into `out`, contiguous `[N, V]`, which
    may be `logits` itself) from g_logp / g_entropy `[N]` fp32, which must be 0 where ignored
    (so ignore_index is not needed here); with a softcap, d/d(raw logits) of the capped ones.
    Same signature as cuda.logits_backward."""
    N, V = logits.shape
    grad = torch.empty(N, V, device=logits.device, dtype=logits.dtype) if out is None else out
    block_n, block_v = logits_blocks(logits)
    has_entropy = g_entropy is not None
    _logits_backward_kernel[(triton.cdiv(N, block_n),)](
        logits, targets, lse, entropy if has_entropy else lse, g_logp,
        g_entropy if has_entropy else g_logp, grad, N, V, logits.stride(0),
        1.0 / temperature, softcap or 1.0, HAS_ENTROPY=has_entropy,
        SOFTCAP=softcap is not None, BLOCK_N=block_n, BLOCK_V=block_v)
    return grad
