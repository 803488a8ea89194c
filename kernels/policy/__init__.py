"""Policy-gradient losses: the clipped PPO/GRPO/GSPO loss, the value loss, KL penalties."""

from .kl import kl_penalty
from .policy_loss import policy_loss
from .value_loss import value_loss
from . import cuda as _cuda  # noqa: F401  (registers the "cuda" backends)

__all__ = ["policy_loss", "value_loss", "kl_penalty"]
