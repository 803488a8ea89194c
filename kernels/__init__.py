"""alignfuse.kernels: fused ops for alignment training, callable from any training loop.

Every op takes `backend=` ("auto", "torch", "triton", "cuda"); "torch" is the readable
reference and the specification (see `alignfuse.kernels.backends`).
"""

from .backends import BackendUnavailable, available, resolve
from .layout import TokenLayout, segment_mean, segment_sum, token_layout
from .logprobs import linear_logprobs, logprobs_from_logits
from .preference import dpo_loss, kto_kl, kto_loss, orpo_loss, simpo_loss
from .reward_model import listwise_rm_loss, pairwise_rm_loss, pointwise_rm_loss
from .policy import kl_penalty, policy_loss, value_loss
from .advantages import gae, group_advantages
from .fused import linear_cross_entropy, linear_policy_loss

__all__ = [
    "BackendUnavailable", "available", "resolve",
    "TokenLayout", "token_layout", "segment_sum", "segment_mean",
    "linear_logprobs", "logprobs_from_logits",
    "dpo_loss", "kto_loss", "kto_kl", "orpo_loss", "simpo_loss",
    "pointwise_rm_loss", "pairwise_rm_loss", "listwise_rm_loss",
    "policy_loss", "value_loss", "kl_penalty", "group_advantages", "gae",
    "linear_policy_loss", "linear_cross_entropy",
]
