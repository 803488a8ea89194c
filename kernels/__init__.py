"""alignfuse.kernels: fused ops for alignment training, callable from any training loop.

Every op takes `backend=` ("auto", "torch", "triton", "cuda"); "torch" is the readable
reference and the specification (see `alignfuse.kernels.backends`).
"""

from .backends import BackendUnavailable, available, resolve
from .layout import TokenLayout, segment_mean, segment_sum, token_layout
from .logprobs import linear_logprobs, logprobs_from_logits

__all__ = [
    "BackendUnavailable", "available", "resolve",
    "TokenLayout", "token_layout", "segment_sum", "segment_mean",
    "linear_logprobs", "logprobs_from_logits",
]
