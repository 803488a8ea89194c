"""Per-token log-probs (and entropy) of the target tokens, without the [N, V] logits.

    linear_logprobs(hidden, weight, targets, ...)    # from the LM head's input
    logprobs_from_logits(logits, targets, ...)       # for callers that already hold logits

Backends (`backend=`): "torch" (`reference.py`: the specification, and the chunked CPU path),
"triton" (`triton_forward.py`, `triton_backward.py`; `linear_chunked.py` for linear_logprobs'
default strategy), "cuda" (`cuda.py`: the logits kernels; linear_logprobs runs them inside
`linear_chunked.py`'s loop of cuBLAS GEMMs).
This module holds the argument checks and the autograd Functions of the kernel backends
(registered here); kernels and their host wrappers live in their own files.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from .. import checks
from ..backends import dispatch, register, set_cuda_preference
from .reference import linear_logprobs_torch, logprobs_from_logits_torch

__all__ = ["linear_logprobs", "logprobs_from_logits"]

register("linear_logprobs", "torch")(linear_logprobs_torch)
register("logprobs_from_logits", "torch")(logprobs_from_logits_torch)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0,
                    ignore_index: int = -100, return_entropy: bool = False,
                    softcap: float | None = None, backend: str = "auto"):
    """Log-prob of each target token under `softmax((hidden @ weight.T + bias) / temperature)`,
    or with `softcap`, `softmax(softcap * tanh((hidden @ weight.T + bias) / softcap) / T)`.

    hidden: `[..., H]` float16/bfloat16/float32 (float64 for gradcheck).
    weight: `[V, H]`, the LM head, same dtype and device as hidden.
    targets: `[...]` integer token ids in `[0, V)`, or `ignore_index`.
    bias: optional `[V]`.
    softcap: Gemma-2's final logit soft-capping (`config.final_logit_softcapping`), a finite
        number > 0, or None (no cap). Applied before the temperature, as in the model, by
        every backend and strategy.
    Returns logps `[...]` float32 (float64 for float64 input), 0 where the target is
    `ignore_index`; with `return_entropy=True` the pair `(logps, entropy)`, entropy `[...]`
    also 0 at ignored positions. Gradients flow to hidden, weight and bias from both outputs.
    No backend holds the `[N, V]` logits: torch works in memory-budgeted chunks; triton
    either does the same with cuBLAS GEMMs and its logits kernels, skipping ignored tokens
    (the default), or keeps the GEMMs inside its kernels, in tiles, or does the latter in
    the forward and the former in the backward (environment
    `ALIGNFUSE_LINEAR_STRATEGY=chunked|fused|fused-forward`, see `linear_strategy`); cuda is
    the chunked loop around the compiled logits kernels.
    """
    H, flat_targets, temperature = check_linear_inputs(hidden, weight, bias, targets,
                                                       ignore_index, temperature)
    softcap = check_softcap(softcap)
    logps, entropy = dispatch("linear_logprobs", backend, hidden.device,
                              hidden.reshape(-1, H), weight, bias, flat_targets,
                              temperature, ignore_index, bool(return_entropy), softcap)
    return _unflatten(logps, entropy, targets.shape, return_entropy)


def check_linear_inputs(hidden, weight, bias, targets, ignore_index, temperature):
    """linear_logprobs' argument checks (also used by the fused LM-head losses).
    Returns (H, targets flattened to `[N]` int64, temperature as a float)."""
    checks.floating("hidden", hidden)
    if hidden.dim() < 1:
        raise ValueError("hidden must be [..., H], got a 0-D tensor")
    H = hidden.shape[-1]
    checks.floating("weight", weight, ndim=2)
    checks.same_device("weight", weight, "hidden", hidden)
    _same_dtype("weight", weight, "hidden", hidden)
    if weight.shape[1] != H:
        raise ValueError(f"weight must be [V, H] with H={H} (the last dim of hidden), "
                         f"got shape {tuple(weight.shape)}")
    V = weight.shape[0]
    if V == 0:
        raise ValueError("weight must have at least one row (V >= 1), got shape "
                         f"{tuple(weight.shape)}")
    if bias is not None:
        checks.floating("bias", bias, ndim=1)
        checks.same_device("bias", bias, "hidden", hidden)
        _same_dtype("bias", bias, "hidden", hidden)
        if bias.shape[0] != V:
            raise ValueError(f"bias must be [V] with V={V} (rows of weight), "
                             f"got shape {tuple(bias.shape)}")
    flat_targets = _check_targets(targets, hidden.shape[:-1], "hidden[..., H]", hidden, V,
                                  ignore_index)
    temperature = _check_temperature(temperature)
    return H, flat_targets, temperature


def check_softcap(softcap) -> float | None:
    """None, or a number > 0 that float32 holds (the kernels compute in it: 1e39 would be
    inf there, 1e-46 would be 0), as a float: the fused LM-head ops' `softcap`."""
    if softcap is None:
        return None
    f32 = torch.finfo(torch.float32)
    if (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
            or not f32.tiny <= softcap <= f32.max):
        raise ValueError(f"softcap must be None or a finite number > 0 within float32's range "
                         f"[{f32.tiny:.3g}, {f32.max:.3g}], got {softcap!r}")
    return float(softcap)


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, *,
                         temperature: float = 1.0, ignore_index: int = -100,
                         return_entropy: bool = False, backend: str = "auto"):
    """Log-prob of each target token under `softmax(logits / temperature)`.

    logits: `[..., V]` float16/bfloat16/float32 (float64 for gradcheck).
    targets: `[...]` integer token ids in `[0, V)`, or `ignore_index`.
    Returns logps `[...]` float32 (float64 for float64 input), 0 where the target is
    `ignore_index`; with `return_entropy=True` the pair `(logps, entropy)`. Differentiable
    with respect to logits through both outputs.
    """
    checks.floating("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    V = logits.shape[-1]
    flat_targets = _check_targets(targets, logits.shape[:-1], "logits[..., V]", logits, V,
                                  ignore_index)
    temperature = _check_temperature(temperature)
    logps, entropy = dispatch("logprobs_from_logits", backend, logits.device,
                              logits.reshape(-1, V), flat_targets, temperature, ignore_index,
                              bool(return_entropy))
    return _unflatten(logps, entropy, targets.shape, return_entropy)


# ---------------------------------------------------------------------------------------
# kernel backends: autograd around triton_forward.py / triton_backward.py, and around
# cuda.py for logprobs_from_logits. Forward saves only per-token lse (and entropy); backward
# recomputes the logits from them.


def _kernel_ready(x: torch.Tensor) -> torch.Tensor:
    """Unit stride in the last dim; float64 is computed in float32 (tl.dot has no fp64 path)."""
    if x.dtype == torch.float64:
        x = x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


def _incoming(grad: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor | None:
    # Ignored positions pass no gradient, whatever the caller sends.
    return None if grad is None else torch.where(valid, grad.float(), 0.0).contiguous()


def _kernel_outputs(logp: torch.Tensor, entropy: torch.Tensor | None, valid: torch.Tensor,
                    input_dtype: torch.dtype):
    """The kernels' fp32 `[N]` logp (and entropy, when not None) as the op returns them: 0 at
    ignored positions, float64 for float64 inputs, else float32."""
    out_dtype = torch.float64 if input_dtype == torch.float64 else torch.float32
    logp = torch.where(valid, logp, 0.0).to(out_dtype)
    if entropy is not None:
        return logp, torch.where(valid, entropy, 0.0).to(out_dtype)
    return logp


# How linear_logprobs' triton backend runs its GEMMs (environment ALIGNFUSE_LINEAR_STRATEGY):
# - "chunked" (default): cuBLAS GEMMs a chunk of counted tokens at a time, the logits
#   kernels in between (`linear_chunked.py`);
# - "fused": the GEMMs inside Triton kernels, no logits chunk at all (`triton_forward.py`,
#   `triton_backward.py`); its backward accumulates through fp32 atomics.
# - "fused-forward": fused's forward (no logits chunk: O(N) extra memory) and chunked's
#   backward (cuBLAS GEMMs, no atomics); the two share one saved state (lse, entropy). A
#   chunked forward's fp32 chunk cannot shrink much without starving its GEMM (it does C
#   FLOPs per byte of W: C ~ 240 rows on an H100, 3% of the logits at V = 128k); the
#   fused forward holds none. Reasoned, not measured.
# All are exact to the same tolerance; which is faster is for `bench/` to say (see
# linear_chunked.py for why chunked is the default before any GPU measurement).
LINEAR_STRATEGIES = ("chunked", "fused", "fused-forward")


def linear_strategy() -> str:
    """The strategy named by ALIGNFUSE_LINEAR_STRATEGY (default "chunked")."""
    strategy = os.environ.get("ALIGNFUSE_LINEAR_STRATEGY", "chunked").strip().lower()
    if strategy not in LINEAR_STRATEGIES:
        raise ValueError(f"ALIGNFUSE_LINEAR_STRATEGY must be one of {LINEAR_STRATEGIES}, "
                         f"got {strategy!r}")
    return strategy


def _linear_kernels(backend: str, strategy: str):
    """(forward, backward) host functions of linear_logprobs on a kernel backend, one
    signature: forward(h, w, b, targets, temperature, ignore_index, softcap=) -> (logp, lse,
    entropy) `[N]` fp32; backward(h, w, b, targets, lse, entropy, g_logp, g_entropy,
    temperature, need, ignore_index=, softcap=) -> (grad_hidden, grad_weight, grad_bias).
    "fused" and the fused half of "fused-forward" are triton's only; "chunked" runs around
    either backend's logits kernels."""
    if strategy == "chunked":
        return _chunked_pair(backend)
    if strategy == "fused":
        return _fused_pair()
    return _fused_pair()[0], _chunked_pair(backend)[1]  # "fused-forward"


def _chunked_pair(backend: str):
    from . import linear_chunked
    kernels = _logits_kernels(backend)
    return (functools.partial(linear_chunked.linear_forward, kernels=kernels),
            functools.partial(linear_chunked.linear_backward, kernels=kernels))


def _fused_pair():
    from .triton_backward import linear_backward
    from .triton_forward import linear_forward
    return (lambda h, w, b, t, temperature, _ignore, softcap:
                linear_forward(h, w, b, t, temperature, softcap),
            lambda *args, ignore_index, softcap, budget:  # no logits block: budget unused
                linear_backward(*args, softcap=softcap))


class _LinearLogprobsKernel(torch.autograd.Function):
    """Autograd for linear_logprobs' triton (either strategy) and cuda backends."""

    @staticmethod
    def forward(ctx, backend, hidden, weight, bias, targets, temperature, ignore_index,
                want_entropy, softcap):
        strategy = linear_strategy() if backend == "triton" else "chunked"
        forward, _ = _linear_kernels(backend, strategy)
        h, w = _kernel_ready(hidden), _kernel_ready(weight)
        b = None if bias is None else _kernel_ready(bias)
        logp, lse, entropy = forward(h, w, b, targets, temperature, ignore_index,
                                     softcap=softcap)
        valid = targets != ignore_index
        ctx.save_for_backward(h, w, b, targets, valid, lse, entropy if want_entropy else None)
        ctx.temperature, ctx.ignore_index, ctx.softcap = temperature, ignore_index, softcap
        ctx.backend, ctx.strategy = backend, strategy
        from ..fused.chunked import budget_cap
        ctx.budget = budget_cap(hidden.device)  # ALIGNFUSE_CHUNK_BUDGET_MIB as of the forward
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return _kernel_outputs(logp, entropy if want_entropy else None, valid, hidden.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_entropy=None):
        _, backward = _linear_kernels(ctx.backend, ctx.strategy)
        h, w, b, targets, valid, lse, entropy = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[1:4])
        need = (need[0], need[1], need[2] and b is not None)
        grads = backward(h, w, b, targets, lse, entropy, _incoming(g_logp, valid),
                         _incoming(g_entropy if entropy is not None else None, valid),
                         ctx.temperature, need, ignore_index=ctx.ignore_index,
                         softcap=ctx.softcap, budget=ctx.budget)
        grads = [None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return (None, *grads, None, None, None, None, None)


def _logits_kernels(backend: str):
    """(forward, backward) host functions of a kernel backend for logprobs_from_logits."""
    if backend == "triton":
        from .triton_backward import logits_backward
        from .triton_forward import logits_forward
    else:
        from .cuda import logits_backward, logits_forward
    return logits_forward, logits_backward


class _LogitsLogprobsKernel(torch.autograd.Function):
    """Autograd for the triton and cuda kernels of logprobs_from_logits (one Function, two
    kernel sets with the same host signature)."""

    @staticmethod
    def forward(ctx, backend, logits, targets, temperature, ignore_index, want_entropy):
        forward, _ = _logits_kernels(backend)
        z = _kernel_ready(logits)
        logp, lse, entropy = forward(z, targets, temperature, ignore_index, want_entropy)
        valid = targets != ignore_index
        ctx.save_for_backward(z, targets, valid, lse, entropy)
        ctx.backend, ctx.temperature, ctx.ignore_index = backend, temperature, ignore_index
        ctx.dtype = logits.dtype
        return _kernel_outputs(logp, entropy if want_entropy else None, valid, logits.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_entropy=None):
        _, backward = _logits_kernels(ctx.backend)
        z, targets, valid, lse, entropy = ctx.saved_tensors
        grad = backward(z, targets, lse, entropy, _incoming(g_logp, valid),
                        _incoming(g_entropy if entropy is not None else None, valid),
                        ctx.temperature, ctx.ignore_index)
        return None, grad.to(ctx.dtype), None, None, None, None


def _register_kernel_backend(backend: str) -> None:
    """Register `backend`'s implementations of both ops: each takes the op's flat arguments
    (targets `[N]` int64, then temperature, ignore_index, return_entropy) and returns
    (logps, entropy or None)."""

    def pair(out, return_entropy):
        return out if return_entropy else (out, None)

    @register("linear_logprobs", backend)
    def _linear(hidden, weight, bias, targets, temperature, ignore_index, return_entropy,
                softcap=None):
        return pair(_LinearLogprobsKernel.apply(backend, hidden, weight, bias,
                                                targets.contiguous(), temperature,
                                                ignore_index, return_entropy, softcap),
                    return_entropy)

    @register("logprobs_from_logits", backend)
    def _logits(logits, targets, temperature, ignore_index, return_entropy):
        return pair(_LogitsLogprobsKernel.apply(backend, logits, targets.contiguous(),
                                                temperature, ignore_index, return_entropy),
                    return_entropy)


for _backend in ("triton", "cuda"):
    _register_kernel_backend(_backend)

# "auto" on CUDA: triton (chunked) before cuda until bench/ has timed both; they share the
# cuBLAS GEMMs and differ only in the logits kernels.
set_cuda_preference("linear_logprobs", ("triton", "cuda", "torch"))


# ---------------------------------------------------------------------------------------
# argument checks


def _same_dtype(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.dtype != ref.dtype:
        raise ValueError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), "
                         f"got {value.dtype}")


def _check_targets(targets, token_shape: torch.Size, source: str, like: torch.Tensor, V: int,
                   ignore_index: int) -> torch.Tensor:
    checks.integer("targets", targets)
    checks.same_device("targets", targets, source.split("[")[0], like)
    if targets.shape != token_shape:
        raise ValueError(f"targets must have the token shape {tuple(token_shape)} of {source}, "
                         f"got {tuple(targets.shape)}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    flat = targets.reshape(-1).to(torch.int64)
    bad = ((flat < 0) | (flat >= V)) & (flat != ignore_index)
    if flat.numel() and bool(bad.any()):
        first = int(flat[bad][0])
        raise ValueError(f"targets must be token ids in [0, {V}) or ignore_index={ignore_index}; "
                         f"got {int(bad.sum())} out-of-range value(s), e.g. {first}")
    return flat


def _check_temperature(temperature) -> float:
    value = checks.positive("temperature", temperature)
    if not math.isfinite(value):
        raise ValueError(f"temperature must be finite, got {temperature!r}")
    return value


def _unflatten(logps, entropy, shape, return_entropy):
    logps = logps.reshape(shape)
    if return_entropy:
        return logps, entropy.reshape(shape)
    return logps
