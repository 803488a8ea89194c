"""Reference-free preference losses: ORPO and SimPO (no reference model in the loss).

ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691), TRL `ORPOTrainer.odds_ratio_loss`.
Inputs are *length-averaged* log-probs a = (1/|y|) log P(y|x) < 0, so P = exp(a) is the
geometric-mean token probability and odds(y) = P / (1 - P):

    log_odds = log odds(y_w) - log odds(y_l) = (a_w - a_l) - (log(1 - e^a_w) - log(1 - e^a_l))
    loss     = nll(y_w) - beta * log sigmoid(log_odds)                       (eq. 6-7)

SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734), TRL `CPOTrainer` loss_type="simpo".
Inputs are *summed* log-probs; SimPO's implicit reward is the length-averaged log-prob:

    loss = -log sigmoid(beta * (log pi(y_w)/|y_w| - log pi(y_l)/|y_l|) - gamma)   (eq. 6)
    (with label smoothing eps: -(1-eps) ls(u) - eps ls(-u), u the argument above)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..backends import dispatch, register
from . import _inputs


def _log1m_exp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate at both ends (Maechler 2012): expm1 near 0,
    log1p far from it."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)),
                       torch.log1p(-torch.exp(a)))


@register("orpo_loss", "torch")
def _orpo_torch(chosen_logps, rejected_logps, chosen_nll, beta: float):
    dtype = torch.float64 if torch.float64 in (chosen_logps.dtype, rejected_logps.dtype,
                                               chosen_nll.dtype) else torch.float32
    a_w, a_l = chosen_logps.to(dtype), rejected_logps.to(dtype)
    log_odds = (a_w - a_l) - (_log1m_exp(a_w) - _log1m_exp(a_l))
    losses = chosen_nll.to(dtype) - beta * F.logsigmoid(log_odds)
    return losses, log_odds.detach()


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
              chosen_nll: torch.Tensor, *, beta: float = 0.1,
              backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ORPO loss (formula in the module docstring).

    Args:
        chosen_logps, rejected_logps: `[S]` length-averaged completion log-probs under the
            policy; each must be < 0 (a probability of 1 has infinite odds).
        chosen_nll: `[S]` the SFT term of each pair, usually the mean token NLL of the chosen
            completion. (TRL uses one token-mean NLL over the whole batch; pass that
            per-pair value, or the same number in every row, to reproduce it.)
        beta: > 0, ORPO's lambda.
        backend: "auto" or "torch" (no kernel: this is a handful of elementwise ops on [S]).

    Returns:
        `(losses [S], log_odds [S])`, float32. `losses = chosen_nll - beta*logsigmoid(log_odds)`
        is differentiable; `losses.mean()` is TRL's loss. `log_odds` is detached: its mean is
        TRL's `log_odds_chosen` metric, `F.logsigmoid(log_odds).mean()` its `log_odds_ratio`
        (so the odds-ratio term alone is `-beta * F.logsigmoid(log_odds)`).
    """
    _inputs.sequence_tensors(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                             chosen_nll=chosen_nll)
    beta = _inputs.scalar_param("beta", beta, low=0.0, low_open=True)
    for name, value in (("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps)):
        if bool((value >= 0).any()):
            raise ValueError(f"{name} must be < 0 (length-averaged log-probs of a probability "
                             "below 1; log-odds are infinite at 0)")
    return dispatch("orpo_loss", backend, chosen_logps.device, chosen_logps, rejected_logps,
                    chosen_nll, beta)


@register("simpo_loss", "torch")
def _simpo_torch(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths,
                 beta: float, gamma: float, label_smoothing: float):
    dtype = torch.float64 if torch.float64 in (chosen_logps.dtype, rejected_logps.dtype) else torch.float32
    chosen_avg = chosen_logps.to(dtype) / chosen_lengths.to(dtype)
    rejected_avg = rejected_logps.to(dtype) / rejected_lengths.to(dtype)
    u = beta * (chosen_avg - rejected_avg) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(u) - label_smoothing * F.logsigmoid(-u)
    return losses, (beta * chosen_avg).detach(), (beta * rejected_avg).detach()


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
               chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, *,
               beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO loss (formula in the module docstring).

    Args:
        chosen_logps, rejected_logps: `[S]` *summed* completion log-probs under the policy.
        chosen_lengths, rejected_lengths: `[S]` completion token counts (>= 0, clamped at 1).
        beta: > 0 (SimPO's beta; paper default 2.0). gamma: the target reward margin (the
            paper's gamma, TRL's `simpo_gamma`; TRL writes it as gamma/beta inside beta*(...)).
        label_smoothing: eps in [0, 0.5), as in TRL's CPOTrainer.
        backend: "auto" or "torch".

    Returns:
        `(losses [S], chosen_rewards [S], rejected_rewards [S])`, float32; rewards are
        beta * length-averaged log-probs, detached (TRL's CPO rewards).
    """
    _inputs.sequence_tensors(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    chosen_lengths = _inputs.lengths("chosen_lengths", chosen_lengths, "chosen_logps",
                                     chosen_logps)
    rejected_lengths = _inputs.lengths("rejected_lengths", rejected_lengths, "chosen_logps",
                                       chosen_logps)
    beta = _inputs.scalar_param("beta", beta, low=0.0, low_open=True)
    gamma = _inputs.scalar_param("gamma", gamma)
    label_smoothing = _inputs.scalar_param("label_smoothing", label_smoothing, low=0.0,
                                           high=0.5, high_open=True)
    return dispatch("simpo_loss", backend, chosen_logps.device, chosen_logps, rejected_logps,
                    chosen_lengths, rejected_lengths, beta, gamma, label_smoothing)
