"""Per-token KL penalties between the policy and a reference policy.

Estimators of KL(pi || pi_ref) from one sample per token, with d = logp - ref_logp
(J. Schulman, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html):

- "k1":  d                                   (unbiased, high variance, can be negative)
- "k2":  d**2 / 2                            (low variance, biased)
- "k3":  exp(-d) + d - 1                     ("low_var_kl": unbiased, >= 0)
- "abs": |d|

As in verl's `kl_penalty`, k3 clamps -d to [-20, 20] before the exp and the result to
[-10, 10] (gradients are zero where a clamp is active, as with torch.clamp).
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import checks
from ..autograd import fused_local_grad
from ..backends import dispatch, register

# the clamps verl applies to the low-variance estimator
K3_LOG_RATIO_BOUND = 20.0
K3_VALUE_BOUND = 10.0

_KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
# code of each estimator in the Triton/CUDA kernels (a constexpr switch)
KL_ESTIMATOR_CODES = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}


def register_kl_estimator(name: str):
    """Decorator: register `fn(d) -> per-token KL` where d = logp - ref_logp."""

    def decorator(fn):
        _KL_ESTIMATORS[name] = fn
        return fn

    return decorator


@register_kl_estimator("k1")
def _k1(d: torch.Tensor) -> torch.Tensor:
    return d


@register_kl_estimator("k2")
def _k2(d: torch.Tensor) -> torch.Tensor:
    return 0.5 * d.square()


@register_kl_estimator("k3")
def _k3(d: torch.Tensor) -> torch.Tensor:
    # Clamp before exp: exp(80) overflows float32 (verl clamps the same way).
    log_ratio = torch.clamp(-d, -K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1, -K3_VALUE_BOUND, K3_VALUE_BOUND)


@register_kl_estimator("abs")
def _abs(d: torch.Tensor) -> torch.Tensor:
    return d.abs()


def kl_estimator_names() -> tuple[str, ...]:
    return tuple(_KL_ESTIMATORS)


def kl_from_log_ratio(d: torch.Tensor, estimator: str) -> torch.Tensor:
    """The per-token KL estimate from d = logp - ref_logp (the torch reference)."""
    checks.one_of("kl_estimator", estimator, kl_estimator_names())
    return _KL_ESTIMATORS[estimator](d)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (gradcheck), else float32: losses are never bf16."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32


@register("kl_penalty", "torch")
def _kl_penalty_torch(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    dtype = compute_dtype(logps, ref_logps)
    return kl_from_log_ratio(logps.to(dtype) - ref_logps.detach().to(dtype), estimator)


@register("kl_penalty", "triton")
def _kl_penalty_triton(logps: torch.Tensor, ref_logps: torch.Tensor,
                       estimator: str) -> torch.Tensor:
    from .triton_kl import kl_penalty_forward

    dtype = compute_dtype(logps, ref_logps)

    def kernel(lp):
        kl, grad = kl_penalty_forward(lp, ref_logps, KL_ESTIMATOR_CODES[estimator])
        return kl.to(dtype), [grad]

    flat = fused_local_grad(kernel, [logps.reshape(-1)])
    return flat.reshape(logps.shape)


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3", *,
               backend: str = "auto") -> torch.Tensor:
    """Per-token KL penalty between the policy and the reference.

    logps, ref_logps: the same shape (any, e.g. `[B, T]` or `[N]`), floating.
    estimator: "k1", "k2", "k3" (verl's "low_var_kl") or "abs" (see the module docstring).
    Returns a tensor of the same shape, float32 (float64 inputs stay float64), differentiable
    with respect to `logps` only (the reference is a fixed target).
    """
    checks.floating("logps", logps)
    checks.floating("ref_logps", ref_logps)
    checks.same_shape("ref_logps", ref_logps, "logps", logps)
    checks.same_device("ref_logps", ref_logps, "logps", logps)
    checks.one_of("estimator", estimator, kl_estimator_names())
    if logps.numel() == 0:
        return torch.zeros(logps.shape, device=logps.device, dtype=compute_dtype(logps, ref_logps))
    return dispatch("kl_penalty", backend, logps.device, logps, ref_logps, estimator)
