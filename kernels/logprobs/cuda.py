"""CUDA backend of `logprobs_from_logits` (csrc/cuda/logprobs.cu). Filled in below."""
