"""The "chunked" strategy of linear_logprobs' triton backend: cuBLAS GEMMs, logits kernels.

Same contract as `triton_forward.linear_forward` / `triton_backward.linear_backward` (the
"fused" strategy, whose GEMMs run inside Triton kernels), so either strategy's backward
takes either's saved (lse, entropy). Per chunk of C counted tokens:

    forward:   z = h_chunk @ W.T (+ b)          [C, V] fp32 (cuBLAS)      2 C H V FLOPs
               `_logits_forward_kernel` on z:   lse, entropy, logp        one read of z
    backward:  z again                                                    2 C H V
               `_logits_backward_kernel`:       dz (bf16 for bf16 inputs) read z, write dz
               grad_hidden[chunk] = dz @ W,  grad_weight += dz.T @ h      4 C H V

8 N H V FLOPs in all, like the fused strategy. Why have both: the fused backward adds
each tile's dz @ W and dz.T @ h into fp32 gradients with atomics, ~4 BN BV / (BN + BV)
FLOPs per atomic element (~170 for 64 x 128 tiles), far below an H100's ~1000 FLOPs per
byte-moved balance, so it is expected to be bound by atomic traffic; here every GEMM is a
cuBLAS GEMM and the only extra traffic is one [C, V] logits chunk per phase, ~1000 FLOPs
per byte of it at H = 4096. Reasoned, not measured: `bench/` times both (the `logprobs`
suite's alignfuse/triton and alignfuse/triton-fused contenders).

Tokens whose target is ignore_index (prompt, padding) never enter a GEMM: their outputs
are 0 and the chunk loop (`fused/chunked.py`, shared with the fused losses) runs over the
counted rows only. Finding them costs one host sync (the count sizes the loop).
"""

from __future__ import annotations

import torch

from ..fused.chunked import FusedLinearLoss
from .triton_backward import logits_backward
from .triton_forward import logits_forward


def _counted_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """int64 indices of the counted tokens, or None when every token counts."""
    rows = (targets != ignore_index).nonzero().squeeze(1)
    return None if rows.numel() == targets.numel() else rows


def _take(x: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or rows is None else x.index_select(0, rows)


def linear_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   targets: torch.Tensor, temperature: float, ignore_index: int):
    """hidden `[N, H]`, weight `[V, H]`, targets `[N]` int64 -> (logp, lse, entropy) `[N]`
    fp32, 0 at ignored tokens."""
    N = hidden.shape[0]
    rows = _counted_rows(targets, ignore_index)
    counted_targets = _take(targets, rows)
    stats = torch.zeros(3, N, device=hidden.device, dtype=torch.float32)
    counted = stats if rows is None else torch.empty(3, rows.numel(), **_f32(hidden))

    def launch(z, _dz, chunk):
        out = logits_forward(z, counted_targets[chunk], temperature, ignore_index, True)
        for row, value in zip(counted[:, chunk], out):
            row.copy_(value)

    FusedLinearLoss(hidden, weight, bias, rows).run(launch, (False, False, False))
    if rows is not None:
        stats.index_copy_(1, rows, counted)
    logp, lse, entropy = stats.unbind(0)
    return logp, lse, entropy


def linear_backward(hidden, weight, bias, targets, lse, entropy, g_logp, g_entropy,
                    temperature: float, need: tuple[bool, bool, bool], ignore_index: int):
    """Gradients (hidden, weight, bias) from g_logp / g_entropy `[N]` fp32 (0 where ignored);
    the same contract as `triton_backward.linear_backward`."""
    rows = _counted_rows(targets, ignore_index)
    t, lse_c, ent_c = _take(targets, rows), _take(lse, rows), _take(entropy, rows)
    g_lp, g_ent = _take(g_logp, rows), _take(g_entropy, rows)

    def launch(z, dz, chunk):
        logits_backward(z, t[chunk], lse_c[chunk], None if ent_c is None else ent_c[chunk],
                        g_lp[chunk], None if g_ent is None else g_ent[chunk], temperature,
                        ignore_index, out=dz)

    return FusedLinearLoss(hidden, weight, bias, rows).run(launch, need)


def _f32(like: torch.Tensor) -> dict:
    return dict(device=like.device, dtype=torch.float32)
