"""Fused LM-head losses: logits, loss and gradients in one pass over token chunks.

    linear_policy_loss(hidden, weight, targets, old_logps, advantages, ...)  # PPO/GRPO/GSPO
    linear_cross_entropy(hidden, weight, targets, ...)                       # SFT

`chunked.py` holds the chunk loop (GEMMs); the chunk kernel that turns a chunk of logits
into losses and d loss / d logits for either loss is `triton_fused_loss.py` (Triton) or
csrc/cuda/fused.cu (CUDA, via `cuda.py`), picked in `chunk_loss.py`.
"""

from .linear_cross_entropy import linear_cross_entropy
from .linear_policy_loss import linear_policy_loss

__all__ = ["linear_policy_loss", "linear_cross_entropy"]
