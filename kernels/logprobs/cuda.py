"""CUDA backend of `logprobs_from_logits`: host wrappers of csrc/cuda/logprobs.cu.

The compiled module takes raw pointers and a stream; the autograd Function around these
wrappers is shared with the Triton backend (`__init__._LogitsLogprobsKernel`).
"""

from __future__ import annotations

import torch

from ..backends import cuda_dtype_code, cuda_module, current_stream_handle


def logits_forward(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                   ignore_index: int, want_entropy: bool, softcap: float | None = None):
    """logits `[N, V]` (unit stride in V), targets `[N]` int64 -> (logp, lse, entropy) fp32,
    of softcap * tanh(logits / softcap) with a softcap.

    logp and entropy are already 0 at ignored positions; entropy is None unless wanted.
    """
    N, V = logits.shape
    f32 = dict(device=logits.device, dtype=torch.float32)
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    entropy = torch.empty(N, **f32) if want_entropy else None
    cuda_module().logprobs_forward(
        logits.data_ptr(), cuda_dtype_code(logits), targets.data_ptr(), N, V, logits.stride(0),
        temperature, softcap or 0.0, ignore_index, logp.data_ptr(), lse.data_ptr(),
        entropy.data_ptr() if want_entropy else 0, current_stream_handle(logits.device))
    return logp, lse, entropy


def logits_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                    entropy: torch.Tensor | None, g_logp: torch.Tensor,
                    g_entropy: torch.Tensor | None, temperature: float, ignore_index: int,
                    out: torch.Tensor | None = None, softcap: float | None = None):
    """grad_logits `[N, V]` from g_logp / g_entropy `[N]` fp32 contiguous, which must be 0
    where ignored (the kernel needs no ignore_index; a target outside [0, V) matches no
    column). Written into `out` when given (contiguous `[N, V]` of any float dtype, so fp32
    logits may give a bf16 gradient; it may be `logits` itself), else into a new tensor in
    the logits' dtype; with a softcap, d/d(raw logits) of the capped ones. Same signature
    as triton_backward.logits_backward."""
    N, V = logits.shape
    if out is None:
        out = torch.empty(N, V, device=logits.device, dtype=logits.dtype)
    elif out.shape != (N, V) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{N}, {V}] tensor, got "
                         f"{tuple(out.shape)} with strides {out.stride()}")
    has_entropy = entropy is not None and g_entropy is not None
    cuda_module().logprobs_backward(
        logits.data_ptr(), cuda_dtype_code(logits), targets.data_ptr(), N, V, logits.stride(0),
        temperature, softcap or 0.0, lse.data_ptr(), entropy.data_ptr() if has_entropy else 0,
        g_logp.data_ptr(), g_entropy.data_ptr() if has_entropy else 0, out.data_ptr(),
        cuda_dtype_code(out), current_stream_handle(logits.device))
    return out
