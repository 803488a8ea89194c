"""What the fused losses' chunk kernels share, and which one a backend runs.

Each kernel turns one chunk of raw logits `[C, V]` into per-token statistics and, when asked,
d loss / d logits, with one host signature (`fused_chunk_loss(z, dz, targets, weights, stats,
temperature, *, loss, ...)`): `triton_fused_loss.py` (Triton) and `cuda.py` (csrc/cuda/fused.cu).
Both write the rows of `stats [NUM_STATS, C]` by these numbers, and take `loss` as one of the
loss codes below.
"""

from __future__ import annotations

from typing import Callable

POLICY, CROSS_ENTROPY = 0, 1
STAT_LOGP, STAT_ENTROPY, STAT_LOSS, STAT_PG, STAT_RATIO, STAT_CLIPPED, STAT_DUAL, STAT_KL = range(8)
NUM_STATS = 8


def chunk_loss_kernel(backend: str) -> Callable[..., None]:
    """`fused_chunk_loss` of a kernel backend ("triton" or "cuda")."""
    if backend == "triton":
        from .triton_fused_loss import fused_chunk_loss
    elif backend == "cuda":
        from .cuda import fused_chunk_loss
    else:
        raise ValueError(f"backend must be 'triton' or 'cuda', got {backend!r}")
    return fused_chunk_loss
