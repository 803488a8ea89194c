"""Triton forward of the log-prob ops: per-token lse, target logit and entropy, one pass.

Reusable tiles (a fused loss kernel calls these, it does not copy them):
- `logits_tile`: one `[BLOCK_N, BLOCK_V]` fp32 tile of raw logits `hidden @ weight.T + bias`,
  accumulated over H with `tl.dot`; its callers soft-cap it (`soft_cap`, when SOFTCAP) and
  divide by T.
- `online_lse_update`: folds a tile into the running (max m, sum s, entropy term b) of each
  row, where s = sum exp(z - m) and b = sum exp(z - m) (z - m).
- `target_logit`: picks each row's target logit out of a tile (0 if not in the tile).
- `finish_stats`: (m, s, b, z_target) -> (lse, entropy, logp).

Entropy is kept relative to the running max, H = log s - b / s, rather than as
lse - sum p z: with logits of magnitude 1e4 the latter cancels catastrophically in fp32.

`linear_forward` tiles tokens (BLOCK_N rows per program) and streams the vocabulary,
soft-capping each tile as it is computed when given a softcap; when there are too few row
blocks to fill the GPU, the vocabulary is also split into a few contiguous ranges, each
program writes partial (m, s, b, z_target) and `merge_partials` combines them (split-V: no
atomics, no [N, V] buffer). The grid is 1-D, so N is limited only by 2^31 programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation. PRECISION is tl.dot's input_precision, or
    "upcast": the Triton interpreter's bf16 tl.dot multiplies raw bits (measured: errors of
    1e10), so under the interpreter half-precision tiles are upcast first."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_hn, stride_wv,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 `[BLOCK_N, BLOCK_V]` tile of raw logits (not capped, not scaled by the
    temperature) for token `rows` and vocab `cols`."""
    row_mask = rows < N
    col_mask = cols < V
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        ks = k + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        h = tl.load(h_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = mma(h, tl.trans(w), acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def online_lse_update(m, s, b, z, col_mask):
    """Fold tile z `[BN, BV]` (columns outside col_mask ignored) into the running row stats."""
    z_max = tl.where(col_mask[None, :], z, float("-inf"))
    m_new = tl.maximum(m, tl.max(z_max, axis=1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(z_max - m_new[:, None])  # 0 outside col_mask and at -inf logits
    # z - m is taken as 0 where e = 0: a masked (-inf) logit must not give 0 * -inf = NaN.
    ed = e * tl.where(e > 0, z - m_new[:, None], 0.0)
    # b was relative to the old max: sum e' (z - m) -> alpha * (b + s (m - m_new)) relative to m_new
    b = alpha * (b + s * (m - m_new)) + tl.sum(ed, axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    return m_new, s, b


@triton.jit
def target_logit(z, cols, targets):
    """Each row's logit at its target column, 0 when the target is not among `cols`."""
    return tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)


@triton.jit
def finish_stats(m, s, b, z_target):
    log_s = tl.log(s)
    lse = m + log_s
    return lse, log_s - b / s, z_target - lse


@triton.jit
def _linear_forward_kernel(h_ptr, w_ptr, b_ptr, t_ptr, part_ptr, N, V, H, stride_hn,
                           stride_wv, inv_temp, cap, num_n_blocks, v_per_split,
                           HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                           PRECISION: tl.constexpr):
    # Consecutive programs share a vocabulary range and differ in rows, so the weight tiles
    # they stream are reused from L2.
    pid = tl.program_id(0)
    n_block = pid % num_n_blocks
    split = pid // num_n_blocks
    rows = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    targets = tl.load(t_ptr + rows, mask=row_mask, other=-1)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    # The running max starts finite, so that `m - m_new` never meets inf - inf.
    m = tl.full([BLOCK_N], -1.0e30, dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    b = tl.zeros([BLOCK_N], dtype=tl.float32)
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v in range(v_start, v_end, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        z = logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_hn, stride_wv,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
        z = soft_cap(z, cap, SOFTCAP) * inv_temp
        m, s, b = online_lse_update(m, s, b, z, cols < v_end)
        zt += target_logit(z, cols, targets)
    # partials: [splits, 4, N] fp32 (m, s, b, z_target)
    out = part_ptr + split.to(tl.int64) * 4 * N + rows
    tl.store(out, m, mask=row_mask)
    tl.store(out + N, s, mask=row_mask)
    tl.store(out + 2 * N, b, mask=row_mask)
    tl.store(out + 3 * N, zt, mask=row_mask)


@triton.jit
def tanh(x):
    """tanh from one exp, for every x (no overflow, NaN stays NaN): sign(x) (1 - e) / (1 + e)
    with e = exp(-2 |x|) in (0, 1]."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def soft_cap(raw, cap, SOFTCAP: tl.constexpr):
    """cap * tanh(raw / cap) (Gemma-2's final logit soft-capping) when SOFTCAP, else raw."""
    out = raw
    if SOFTCAP:
        out = cap * tanh(raw / cap)
    return out


@triton.jit
def row_stats(z_rows, targets, row_mask, V, inv_temp, cap, WITH_SUM: tl.constexpr,
              SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """One sweep over BLOCK_N rows of materialized logits (`z_rows`: row base pointers):
    each row's (lse, entropy, target log-prob, and the sum of its scaled logits if WITH_SUM),
    the logits soft-capped first (cap) when SOFTCAP. The running max starts finite, so
    m - m_new never meets inf - inf."""
    m = tl.full([BLOCK_N], -1.0e30, dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    b = tl.zeros([BLOCK_N], dtype=tl.float32)
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)
    zsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v in range(0, V, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = tl.load(z_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0).to(tl.float32)
        z = soft_cap(z, cap, SOFTCAP) * inv_temp
        m, s, b = online_lse_update(m, s, b, z, col_mask)
        zt += target_logit(z, cols, targets)
        if WITH_SUM:
            zsum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
    lse, entropy, logp = finish_stats(m, s, b, zt)
    return lse, entropy, logp, zsum


@triton.jit
def _logits_forward_kernel(z_ptr, t_ptr, lse_ptr, ent_ptr, logp_ptr, N, V, stride_zn, inv_temp,
                           cap, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    targets = tl.load(t_ptr + rows, mask=row_mask, other=-1)
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_zn
    lse, entropy, logp, _ = row_stats(z_rows, targets, row_mask, V, inv_temp, cap, False,
                                      SOFTCAP, BLOCK_N, BLOCK_V)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(ent_ptr + rows, entropy, mask=row_mask)
    tl.store(logp_ptr + rows, logp, mask=row_mask)


def dot_precision(t: torch.Tensor) -> str:
    """The PRECISION of `mma` for tensor t's dtype and device."""
    if t.dtype == torch.float32:
        # fp32 inputs must not silently drop to tf32 (10-bit mantissa) on tensor cores.
        return "ieee"
    return "upcast" if _interpreted(t) else "tf32"  # tf32 is moot for bf16/fp16 inputs


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def linear_blocks(t: torch.Tensor) -> dict:
    # Tile sizes are reasoned, not tuned (no GPU to tune on while writing this):
    # 64 x 128 fp32 logits per program, H streamed in 64-wide bf16 slices for tl.dot.
    if _interpreted(t):
        # The interpreter runs programs one after another: few, large programs for large N.
        return dict(BLOCK_N=16 if t.shape[0] <= 1024 else 512, BLOCK_V=128, BLOCK_H=32)
    if t.dtype == torch.float32:
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, num_warps=4)
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8)


def logits_blocks(t: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_V) of the logits kernels: a few rows, long vocabulary strips."""
    if _interpreted(t):
        return (16 if t.shape[0] <= 1024 else 512), 128
    return 4, 1024


def _vocab_splits(num_n_blocks: int, V: int, block_v: int, device: torch.device) -> int:
    """Split the vocabulary only when the row blocks alone leave SMs idle."""
    if device.type != "cuda":
        return min(2, triton.cdiv(V, block_v))  # exercise the merge under the interpreter
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(4 * sms, num_n_blocks)
    return max(1, min(want, triton.cdiv(V, block_v), 64))


def merge_partials(parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """parts `[splits, 4, N]` (m, s, b, z_target) -> (lse, entropy, z_target) `[N]` fp32."""
    m, s, b, zt = parts.unbind(1)
    M = m.max(0).values
    scale = torch.exp(m - M)
    S = (s * scale).sum(0)
    B = (scale * (b + s * (m - M))).sum(0)
    log_s = torch.log(S)
    return M + log_s, log_s - B / S, zt.sum(0)


def linear_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   targets: torch.Tensor, temperature: float, softcap: float | None = None):
    """hidden `[N, H]`, weight `[V, H]`, targets `[N]` int64 -> (logp, lse, entropy) `[N]` fp32,
    of softcap * tanh(logits / softcap) with a softcap."""
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = linear_blocks(hidden)
    num_n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    splits = _vocab_splits(num_n_blocks, V, cfg["BLOCK_V"], hidden.device)
    v_per_split = triton.cdiv(triton.cdiv(V, splits), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    splits = triton.cdiv(V, v_per_split)  # every split holds at least one valid column
    parts = torch.empty(splits, 4, N, device=hidden.device, dtype=torch.float32)
    _linear_forward_kernel[(num_n_blocks * splits,)](
        hidden, weight, bias if bias is not None else weight, targets, parts, N, V, H,
        hidden.stride(0), weight.stride(0), 1.0 / temperature, softcap or 1.0, num_n_blocks,
        v_per_split, HAS_BIAS=bias is not None, SOFTCAP=softcap is not None,
        PRECISION=dot_precision(hidden), **cfg)
    lse, entropy, zt = merge_partials(parts)
    return zt - lse, lse, entropy


def logits_forward(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                   ignore_index: int, want_entropy: bool, softcap: float | None = None):
    """logits `[N, V]` (unit stride in V), targets `[N]` -> (logp, lse, entropy) `[N]` fp32,
    of softcap * tanh(logits / softcap) with a softcap.

    Ignored positions are not masked here (the caller does); entropy is always computed
    (it costs nothing extra in the same pass). Same signature as cuda.logits_forward.
    """
    N, V = logits.shape
    lse, entropy, logp = (torch.empty(N, device=logits.device, dtype=torch.float32)
                          for _ in range(3))
    block_n, block_v = logits_blocks(logits)
    _logits_forward_kernel[(triton.cdiv(N, block_n),)](
        logits, targets, lse, entropy, logp, N, V, logits.stride(0), 1.0 / temperature,
        softcap or 1.0, SOFTCAP=softcap is not None, BLOCK_N=block_n, BLOCK_V=block_v)
    return logp, lse, entropy
