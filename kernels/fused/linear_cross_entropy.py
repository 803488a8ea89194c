"""`linear_cross_entropy`: the SFT loss of the LM head, fused like `linear_policy_loss`.

With z = (hidden @ weight.T + bias) / T (soft-capped before the division with `softcap`:
z = softcap tanh(raw / softcap) / T), t the target, eps the label smoothing and
p = softmax(z) (the smoothed target puts eps / V on every token, as `F.cross_entropy`):

    loss_t = (1 - eps) (lse - z_t) + eps (lse - mean_j z_j)
    d loss_t / d z_j = p_j - (1 - eps) 1[j = t] - eps / V

reduced over the tokens whose target is not `ignore_index` by "mean" (over those tokens;
0, not NaN, when there are none), "sum", or "none" (per token, 0 at ignored positions).

Backends:
- "torch", the specification: `linear_logprobs(backend="torch")` gives -logp_t = lse - z_t;
  the smoothing term needs lse - mean_j z_j, and mean_j z_j = (hidden . mean_j W_j +
  mean_j b_j) / T is linear, so lse = z_t - logp_t needs only the target rows of W.
  Nothing of size [N, V] is held. With a softcap the mean is not linear: it is computed
  from the capped logits in row chunks, recomputed in backward (torch.utils.checkpoint),
  two more GEMMs over the vocabulary; this path also serves "none" on every backend.
- "triton" and "cuda": for "mean"/"sum" the fused chunk loop (`chunked.py`, the same chunk
  kernel as linear_policy_loss, with ChunkLoss(CROSS_ENTROPY)): 6 N H V FLOPs, gradients
  computed in the forward. "none" gives per-token outputs, whose weight gradient depends on the
  incoming per-token gradients, so nothing can be computed ahead: it is linear_logprobs'
  path on the same backend (recompute in backward, 8 N H V) plus the smoothing term.
This is the loss of cut-cross-entropy's `linear_cross_entropy` (https://arxiv.org/abs/2411.09009)
and Liger's fused linear cross-entropy.
"""

from __future__ import annotations

import functools

import torch

from .. import checks
from ..autograd import fused_local_grad
from ..backends import dispatch, register, set_cuda_preference
from ..logprobs import check_linear_inputs, check_softcap, linear_logprobs
from ..logprobs.reference import chunk_rows
from .chunk_loss import CROSS_ENTROPY, NUM_STATS, STAT_LOSS, ChunkLoss, chunk_loss_kernel
from .chunked import FusedLinearLoss
from .lm_head import needed_grads

__all__ = ["linear_cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         temperature: float = 1.0, reduction: str = "mean",
                         label_smoothing: float = 0.0, softcap: float | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """Cross-entropy of `targets` under `softmax((hidden @ weight.T + bias) / temperature)`.

    hidden: `[..., H]` float16/bfloat16/float32 (float64 for gradcheck).
    weight: `[V, H]`; bias: optional `[V]`; same dtype and device as hidden.
    targets: `[...]` token ids in `[0, V)`, or `ignore_index` (no loss, no gradient).
    reduction: "mean" over non-ignored tokens, "sum", or "none".
    label_smoothing: eps in [0, 1], as in `torch.nn.functional.cross_entropy`.
    softcap: Gemma-2's final logit soft-capping, applied before the temperature
        (`linear_logprobs`); None: no cap.
    Returns a float32 scalar ("mean"/"sum") or per-token `[...]` ("none"); float64 inputs
    give float64. Differentiable with respect to hidden, weight and bias.
    """
    H, flat_targets, temperature = check_linear_inputs(hidden, weight, bias, targets,
                                                       ignore_index, temperature)
    checks.one_of("reduction", reduction, REDUCTIONS)
    if (not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool)
            or not 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    softcap = check_softcap(softcap)
    out = dispatch("linear_cross_entropy", backend, hidden.device, hidden.reshape(-1, H),
                   weight, bias, flat_targets, ignore_index, float(temperature), reduction,
                   float(label_smoothing), softcap)
    return out.reshape(targets.shape) if reduction == "none" else out


def _reduce(token_loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return token_loss
    total = token_loss.sum()
    return total / valid.sum().clamp(min=1) if reduction == "mean" else total


# ---------------------------------------------------------------------------------------
# torch: the specification


def _per_token_loss(hidden, weight, bias, targets, ignore_index, temperature,
                    label_smoothing, backend: str, softcap: float | None = None) -> torch.Tensor:
    """loss_t `[N]` (0 where ignored) through linear_logprobs, plus the smoothing term."""
    logps = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                            ignore_index=ignore_index, softcap=softcap, backend=backend)
    valid = targets != ignore_index
    nll = -logps
    if label_smoothing == 0.0:
        return nll
    dtype = logps.dtype
    h, w = hidden.to(dtype), weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    safe = torch.where(valid, targets, 0)
    z_target = (h * w[safe]).sum(-1)                 # [N, H] gather, not [N, V]
    if b is not None:
        z_target = z_target + b[safe]
    if softcap is None:
        z_mean = h @ w.mean(0) + (0.0 if b is None else b.mean())  # the mean is linear
    else:
        z_target = softcap * torch.tanh(z_target / softcap)
        z_mean = _capped_logit_mean(h, w, b, softcap)
    lse = z_target / temperature - logps             # logp_t = z_t - lse
    smooth = lse - z_mean / temperature              # mean_j (-log p_j)
    token_loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    return torch.where(valid, token_loss, 0.0)


def _capped_logit_mean(h, w, b, softcap: float) -> torch.Tensor:
    """`[N]` mean over the vocabulary of the soft-capped logits, differentiable: one chunk of
    rows at a time, each recomputed in backward (torch.utils.checkpoint), so no [N, V]."""
    from torch.utils.checkpoint import checkpoint

    def part(hc, w, b):
        z = hc @ w.T if b is None else torch.addmm(b, hc, w.T)
        return (softcap * torch.tanh(z / softcap)).mean(-1)

    N, V = h.shape[0], w.shape[0]
    rows = chunk_rows(N, V, h.element_size(), w.numel() * w.element_size())
    return torch.cat([checkpoint(part, h[i:i + rows], w, b, use_reentrant=False)
                      for i in range(0, N, rows)] or [h.new_zeros(0)])


@register("linear_cross_entropy", "torch")
def _linear_cross_entropy_torch(hidden, weight, bias, targets, ignore_index, temperature,
                                reduction, label_smoothing, softcap=None):
    token_loss = _per_token_loss(hidden, weight, bias, targets, ignore_index, temperature,
                                 label_smoothing, "torch", softcap)
    return _reduce(token_loss, targets != ignore_index, reduction)


# ---------------------------------------------------------------------------------------
# triton and cuda: the fused chunk loop around the backend's chunk kernel ("mean", "sum")


def _linear_cross_entropy_fused(backend, hidden, weight, bias, targets, ignore_index,
                                temperature, reduction, label_smoothing, softcap=None):
    if reduction == "none":
        return _per_token_loss(hidden, weight, bias, targets, ignore_index, temperature,
                               label_smoothing, backend, softcap)
    fused_chunk_loss = chunk_loss_kernel(backend)

    valid = targets != ignore_index
    rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)
    t = (targets if rows is None else targets[rows]).contiguous()
    M = t.numel()
    scale = 1.0 / max(M, 1) if reduction == "mean" else 1.0
    token_weight = torch.full((M,), scale, device=hidden.device, dtype=torch.float32)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    need = needed_grads(hidden, weight, bias)
    inputs = [hidden, weight] + ([bias] if bias is not None else [])

    def kernel(h, w, *b):
        engine = FusedLinearLoss(h, w, b[0] if b else None, rows)
        stats = torch.empty(NUM_STATS, M, device=hidden.device, dtype=torch.float32)
        loss_kind = ChunkLoss(CROSS_ENTROPY, label_smoothing=label_smoothing, softcap=softcap)
        grads = engine.run(lambda z, dz, c: fused_chunk_loss(
            z, dz, t[c], token_weight[c], stats[:, c], temperature, loss_kind), need)
        loss = (token_weight * stats[STAT_LOSS]).sum().to(out_dtype)
        return loss, [grads[0], grads[1]] + ([grads[2]] if b else [])

    return fused_local_grad(kernel, inputs)


for _backend in ("triton", "cuda"):
    register("linear_cross_entropy", _backend)(
        functools.partial(_linear_cross_entropy_fused, _backend))

# "auto" on CUDA: triton before cuda until bench/ has timed both (same GEMMs, different chunk
# kernels).
set_cuda_preference("linear_cross_entropy", ("triton", "cuda", "torch"))
