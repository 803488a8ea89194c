"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306).

Unpaired feedback: each completion y of prompt x is labelled desirable or undesirable.
With the log-ratio x_i = log pi(y|x) - log pi_ref(y|x) and the reference point z0 (a
detached estimate of KL(pi || pi_ref), see `kto_kl`):

    desirable:    loss = lambda_D * (1 - sigmoid(beta * (x_i - z0)))
    undesirable:  loss = lambda_U * (1 - sigmoid(beta * (z0 - x_i)))
    reward = beta * x_i   (detached)

This is TRL's `KTOTrainer.kto_loss` (loss_type="kto"), except that rows stay in the input
order (TRL concatenates all desirable rows, then all undesirable ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import checks
from ..backends import dispatch, register
from . import _inputs


@dataclass(frozen=True)
class KTOProblem:
    beta: float
    desirable_weight: float
    undesirable_weight: float


@register("kto_loss", "torch")
def _kto_torch(policy_logps, ref_logps, desirable, kl, problem: KTOProblem):
    """Backend interface: `[S]` log-probs, bool `[S]`, z0 as a one-element tensor.
    Returns `(losses, rewards)`, float32 (float64 when an input is float64)."""
    dtype = torch.float64 if torch.float64 in (policy_logps.dtype, ref_logps.dtype) else torch.float32
    logratio = policy_logps.to(dtype) - ref_logps.to(dtype)
    z0 = kl.to(dtype)
    beta = problem.beta
    desirable_loss = problem.desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))
    undesirable_loss = problem.undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))
    losses = torch.where(desirable, desirable_loss, undesirable_loss)
    return losses, (beta * logratio).detach()


@register("kto_loss", "triton")
def _kto_triton(*args):
    from .triton_preference import kto_loss_triton  # triton is imported on first use

    return kto_loss_triton(*args)


@register("kto_loss", "cuda")
def _kto_cuda(*args):
    from .cuda import kto_loss_cuda

    return kto_loss_cuda(*args)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl: torch.Tensor | float, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-completion KTO losses (formula in the module docstring).

    Args:
        policy_logps, ref_logps: `[S]` summed completion log-probs under the policy and the
            reference model (any float dtype).
        desirable: bool `[S]`, True where the completion is desirable.
        kl: z0, the reference point: a scalar (0-d or one-element tensor, or a float), used
            as a constant (no gradient flows into it). Usually `kto_kl(...)`.
        beta: > 0. desirable_weight, undesirable_weight: >= 0, lambda_D and lambda_U.
        backend: "auto", "torch", "triton" or "cuda".

    Returns:
        `(losses [S], rewards [S])`, float32 (float64 when policy_logps or ref_logps is
        float64); rewards = beta * (policy - ref), detached.
        TRL's loss is `losses.mean()`.
    """
    _inputs.sequence_tensors(policy_logps=policy_logps, ref_logps=ref_logps)
    checks.tensor("desirable", desirable, dtypes=(torch.bool,))
    checks.same_shape("desirable", desirable, "policy_logps", policy_logps)
    checks.same_device("desirable", desirable, "policy_logps", policy_logps)
    beta = _inputs.scalar_param("beta", beta, low=0.0, low_open=True)
    desirable_weight = _inputs.scalar_param("desirable_weight", desirable_weight, low=0.0)
    undesirable_weight = _inputs.scalar_param("undesirable_weight", undesirable_weight, low=0.0)
    z0 = _reference_point(kl, policy_logps)
    problem = KTOProblem(beta, desirable_weight, undesirable_weight)
    return dispatch("kto_loss", backend, policy_logps.device, policy_logps, ref_logps,
                    desirable, z0, problem)


def _reference_point(kl, like: torch.Tensor) -> torch.Tensor:
    """z0 as a detached one-element float32 tensor on `like`'s device (float64 stays)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(kl, torch.Tensor):
        checks.floating("kl", kl)
        if kl.numel() != 1:
            raise ValueError(f"kl must be a scalar (z0), got shape {tuple(kl.shape)}")
        checks.same_device("kl", kl, "policy_logps", like)
        _inputs.all_finite(kl=kl)
        return kl.detach().to(dtype).reshape(1)
    value = _inputs.scalar_param("kl", kl)
    return torch.tensor([value], dtype=dtype, device=like.device)


@register("kto_kl", "torch")
def _kto_kl_torch(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if torch.float64 in (policy_kl_logps.dtype, ref_kl_logps.dtype) else torch.float32
    diff = policy_kl_logps.detach().to(dtype) - ref_kl_logps.detach().to(dtype)
    return diff.mean().clamp(min=0)


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, *,
           backend: str = "auto") -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean(policy_kl_logps - ref_kl_logps)), detached.

    Args:
        policy_kl_logps, ref_kl_logps: `[S]` summed log-probs of *mismatched* pairs (each
            prompt with another row's completion, as TRL builds them) under the policy and
            the reference model. The mean log-ratio over such pairs estimates KL(pi || ref).

    Returns:
        A 0-d float32 tensor (no gradient). Under data parallelism TRL averages the mean
        over ranks before clamping: all-reduce `(policy - ref).mean()` yourself if you need
        exactly that; this op sees only the local batch.
    """
    _inputs.sequence_tensors(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    return dispatch("kto_kl", backend, policy_kl_logps.device, policy_kl_logps, ref_kl_logps)
