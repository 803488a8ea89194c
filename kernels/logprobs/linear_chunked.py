"""linear_logprobs as cuBLAS GEMMs around a logits kernel: the "chunked" strategy of the
triton backend, and the whole cuda backend.

The logits kernels (`kernels=`) are logprobs_from_logits' of either backend, `(logits_forward,
logits_backward)` of triton_forward/triton_backward or of cuda.py, which share one host
signature. Same contract as `triton_forward.linear_forward` / `triton_backward.linear_backward`
(the triton "fused" strategy, whose GEMMs run inside Triton kernels), so either strategy's
backward takes either's saved (lse, entropy). With M counted tokens:

    forward, per chunk of C tokens:
      z = h_chunk @ W.T (+ b)            [C, V] fp32 (cuBLAS)         2 C H V FLOPs
      logits forward kernel on z:        lse, entropy, logp           one read of z
    backward, per block of Vb vocabulary columns (see `linear_backward` for why):
      z = h @ W_block.T (+ b)            [M, Vb] fp32                 2 M H Vb
      logits backward kernel:            dz (bf16 for bf16 inputs)    read z, write dz
      grad_weight[block] = dz.T @ h      written once                 2 M H Vb
      grad_hidden += dz @ W_block        [M, H] fp32                  2 M H Vb

8 M H V FLOPs in all, like the fused strategy. Why have both: the fused backward adds each
tile's dz @ W and dz.T @ h into fp32 gradients with atomics, ~4 BN BV / (BN + BV) FLOPs per
4-byte atomic (~170 for 64 x 128 tiles), about 40 FLOPs per byte against an H100's ~240
FLOPs per byte of HBM bandwidth, so it is expected to be bound by its atomics; here every
GEMM is cuBLAS's and the extra traffic is the fp32 logits block, ~H / 2 FLOPs per byte of
it. Measured on an H100 (bench/results/20261122T215925Z_*, N=16384, H=4096, V=128256,
bf16, forward+backward): chunked 118 ms, fused 398 ms (its backward alone 319 ms against
chunked's 77 ms), fused forward + chunked backward 161 ms.

Tokens whose target is ignore_index (prompt, padding) never enter a GEMM: their outputs
are 0, and both loops (the forward's is `fused/chunked.py`'s, shared with the fused
losses) run over the counted rows only. Finding them costs one host sync (the count sizes the loop).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..fused.chunked import FusedLinearLoss, accumulate_fp32, mm_fp32, logits_into
from .reference import chunk_rows

# (logits_forward, logits_backward) of a backend: see the module docstring
RowKernels = tuple[Callable, Callable]


def _counted_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """int64 indices of the counted tokens, or None when every token counts."""
    rows = (targets != ignore_index).nonzero().squeeze(1)
    return None if rows.numel() == targets.numel() else rows


def _take(x: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or rows is None else x.index_select(0, rows)


def linear_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   targets: torch.Tensor, temperature: float, ignore_index: int, *,
                   kernels: RowKernels, softcap: float | None = None):
    """hidden `[N, H]`, weight `[V, H]`, targets `[N]` int64 -> (logp, lse, entropy) `[N]`
    fp32, 0 at ignored tokens. softcap: the kernel caps the logits as it reads them."""
    logits_forward = kernels[0]
    N = hidden.shape[0]
    rows = _counted_rows(targets, ignore_index)
    counted_targets = _take(targets, rows)
    stats = torch.zeros(3, N, device=hidden.device, dtype=torch.float32)
    counted = stats if rows is None else torch.empty(3, rows.numel(), **_f32(hidden))

    def launch(z, _dz, chunk):
        out = logits_forward(z, counted_targets[chunk], temperature, ignore_index, True,
                             softcap=softcap)
        for row, value in zip(counted[:, chunk], out):
            row.copy_(value)

    FusedLinearLoss(hidden, weight, bias, rows).run(launch, (False, False, False))
    if rows is not None:
        stats.index_copy_(1, rows, counted)
    logp, lse, entropy = stats.unbind(0)
    return logp, lse, entropy


def linear_backward(hidden, weight, bias, targets, lse, entropy, g_logp, g_entropy,
                    temperature: float, need: tuple[bool, bool, bool], ignore_index: int, *,
                    kernels: RowKernels, budget: int, softcap: float | None = None):
    """Gradients (hidden, weight, bias) from g_logp / g_entropy `[N]` fp32 (0 where ignored);
    the same contract as `triton_backward.linear_backward`. With `softcap`, the kernel caps
    each logit as it reads it and chains the gradient through the cap. `budget`: bytes for
    the logits block, the forward's `budget_cap` (so that the backward follows the
    ALIGNFUSE_CHUNK_BUDGET_MIB the forward ran under).

    Blocked over the VOCABULARY, not over tokens: with each row's lse (and entropy) saved,
    a logit's gradient needs only its own column, so a block of Vb columns for all M
    counted tokens gives grad_weight[block] in ONE GEMM, written once in the weight's
    dtype, while grad_hidden (M x H, fp32) gathers the blocks' contributions. A token-
    blocked loop would instead read and write an fp32 [V, H] accumulator per chunk; with
    M < V (16k tokens against a 128k vocabulary) this moves M / V as many bytes and holds
    an [M, H] buffer instead of [V, H]."""
    need_h, need_w, need_b = need
    logits_backward = kernels[1]
    rows = _counted_rows(targets, ignore_index)
    h = _take(hidden, rows)
    t, lse_c, ent_c = _take(targets, rows), _take(lse, rows), _take(entropy, rows)
    g_lp, g_ent = _take(g_logp, rows), _take(g_entropy, rows)
    M, H = h.shape
    V = weight.shape[0]
    half = hidden.dtype != torch.float32
    on_cpu = not hidden.is_cuda
    w_mm = weight.float() if half and on_cpu else weight  # CPU: upcast once
    f32 = _f32(hidden)
    grad_h = torch.zeros(M, H, **f32) if need_h else None
    grad_w = (torch.empty_like(weight) if M else torch.zeros_like(weight)) if need_w else None
    grad_b = torch.zeros(V, **f32) if need_b else None
    # an fp32 block of logits, and a half-precision gradient block for half inputs
    bytes_per_logit = 4 + (weight.element_size() if half else 0)
    cols = chunk_rows(V, max(M, 1), bytes_per_logit // 2, V * H * 4, budget)
    if 256 < cols < V:
        cols -= cols % 256  # whole GEMM tiles per block (not when one block holds all of V)
    # flat buffers, viewed as a contiguous [M, width] per block (the last may be narrower)
    z_buf = torch.empty(M * cols, **f32)
    dz_buf = torch.empty(M * cols, device=hidden.device, dtype=hidden.dtype) if half else z_buf
    for v0 in range(0, V if M and any(need) else 0, cols):
        block = slice(v0, min(v0 + cols, V))
        width = block.stop - block.start
        z = logits_into(z_buf[:M * width].view(M, width), h, w_mm[block],
                        None if bias is None else bias[block])
        dz = dz_buf[:M * width].view(M, width)
        # targets outside the block fall outside [0, width): they match no column
        logits_backward(z, t - v0, lse_c, ent_c, g_lp, g_ent, temperature, ignore_index,
                        out=dz, softcap=softcap)
        if need_w:
            if half and on_cpu:
                grad_w[block] = mm_fp32(dz.T, h)  # fp32 product, rounded once
            else:
                torch.mm(dz.T, h, out=grad_w[block])  # fp32 accumulation inside the GEMM
        if need_h:
            if half:
                accumulate_fp32(grad_h, dz, weight[block])
            else:
                grad_h.addmm_(dz, weight[block])
        if need_b:
            grad_b[block] = dz.sum(0, dtype=torch.float32)
    return _finish(grad_h, grad_w, grad_b, hidden, rows)


def _finish(grad_h, grad_w, grad_b, hidden, rows):
    """grad_hidden back at all N tokens (0 where ignored), in hidden's dtype."""
    if grad_h is not None:
        full = grad_h.to(hidden.dtype)
        if rows is not None:
            full = torch.zeros_like(hidden).index_copy_(0, rows, full)
        grad_h = full
    return grad_h, grad_w, None if grad_b is None else grad_b.to(hidden.dtype)


def _f32(like: torch.Tensor) -> dict:
    return dict(device=like.device, dtype=torch.float32)
