"""What the fused losses' chunk kernels share, and which one a backend runs.

Each kernel turns one chunk of raw logits `[C, V]` into per-token statistics and, when asked,
d loss / d logits, with one host signature:

    fused_chunk_loss(z, dz, targets, weights, stats, temperature, loss: ChunkLoss, *,
                     old_logps=None, advantages=None, ref_logps=None, seq_log_ratio=None)

in `triton_fused_loss.py` (Triton) and `cuda.py` (csrc/cuda/fused.cu). Both write the rows of
`stats [NUM_STATS, C]` by the numbers below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

POLICY, CROSS_ENTROPY = 0, 1
STAT_LOGP, STAT_ENTROPY, STAT_LOSS, STAT_PG, STAT_RATIO, STAT_CLIPPED, STAT_DUAL, STAT_KL = range(8)
NUM_STATS = 8


@dataclass(frozen=True)
class ChunkLoss:
    """The loss a chunk kernel computes and its scalar options (the per-token inputs go with
    each chunk). kind: POLICY (policy_loss's per-token math, plus -entropy_coef * H_t) or
    CROSS_ENTROPY (-logp_t, label-smoothed); the policy options are policy_loss's; softcap
    applies to either."""

    kind: int
    clip_low: float = 0.0
    clip_high: float = 0.0
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator_code: int = 0
    log_ratio_bounds: tuple[float, float] = (-20.0, 20.0)
    entropy_coef: float = 0.0
    label_smoothing: float = 0.0
    softcap: float | None = None  # the logits are softcap * tanh(z / softcap) (Gemma-2)

    def __post_init__(self):
        if self.kind not in (POLICY, CROSS_ENTROPY):
            raise ValueError(f"kind must be POLICY ({POLICY}) or CROSS_ENTROPY "
                             f"({CROSS_ENTROPY}), got {self.kind!r}")


def chunk_loss_kernel(backend: str) -> Callable[..., None]:
    """`fused_chunk_loss` of a kernel backend ("triton" or "cuda")."""
    if backend == "triton":
        from .triton_fused_loss import fused_chunk_loss
    elif backend == "cuda":
        from .cuda import fused_chunk_loss
    else:
        raise ValueError(f"backend must be 'triton' or 'cuda', got {backend!r}")
    return fused_chunk_loss
