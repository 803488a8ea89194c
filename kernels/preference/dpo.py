"""DPO and its pairwise variants, with TRL's `loss_type` names and definitions.

Every variant is a function of the two log-ratios of a pair (inputs are summed sequence
log-probs `[S]`):

    c = log pi(y_w|x) - log pi_ref(y_w|x)      (chosen)
    r = log pi(y_l|x) - log pi_ref(y_l|x)      (rejected)
    d = c - r,   z = beta * d,   ls = log sigmoid,   eps = label_smoothing

| loss_type    | per-pair loss                                                   | paper |
|--------------|-----------------------------------------------------------------|-------|
| sigmoid      | -(1-eps) ls(z) - eps ls(-z)                                     | DPO https://arxiv.org/abs/2305.18290 (eq. 7); eps: cDPO https://ericmitchell.ai/cdpo.pdf |
| robust       | (-(1-eps) ls(z) + eps ls(-z)) / (1 - 2 eps)                     | rDPO https://arxiv.org/abs/2403.00409 |
| exo_pair     | s(z)(ls(z) - log(1-eps)) + s(-z)(ls(-z) - log eps), eps=1e-3 if 0 | EXO https://arxiv.org/abs/2402.00856 (eq. 16) |
| hinge        | relu(1 - z)                                                     | SLiC https://arxiv.org/abs/2305.10425 |
| ipo          | (c/len_w - r/len_l - 1/(2 beta))^2                              | IPO https://arxiv.org/abs/2310.12036 (eq. 17) |
| bco_pair     | -ls(beta c - delta) - ls(-(beta r - delta))                     | BCO https://arxiv.org/abs/2404.04656 |
| sppo_hard    | (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2                         | SPPO https://arxiv.org/abs/2405.00675 |
| nca_pair     | -ls(beta c) - ls(-beta c)/2 - ls(-beta r)/2                     | NCA https://arxiv.org/abs/2402.05369 |
| aot          | sigmoid on sort(pi_w - pi_l) - sort(ref_w - ref_l)              | AOT https://arxiv.org/abs/2406.05882 |
| aot_unpaired | sigmoid on sort(c) - sort(r)                                    | AOT https://arxiv.org/abs/2406.05882 |
| apo_zero     | 1 - s(beta c) + s(beta r)                                       | APO https://arxiv.org/abs/2408.06266 (eq. 7) |
| apo_down     | s(beta c) + 1 - s(z)                                            | APO https://arxiv.org/abs/2408.06266 (eq. 8) |
| discopop     | -ls(z)(1 - m) + exp(-z) m,  m = s(z / tau)                      | DiscoPOP https://arxiv.org/abs/2406.08414 (eq. 5) |
| sigmoid_norm | -ls(beta (c/len_w - r/len_l))                                   | length-normalized DPO, Tulu 3 https://arxiv.org/abs/2411.15124 |

(s = sigmoid.) ipo and sigmoid_norm divide each log-ratio by its completion length inside
the loss (TRL does so for IPO since the IPO authors confirmed it). Rewards are always
`beta * c` and `beta * r` of the summed log-ratios, detached, as in TRL.

The two batch-coupled variants are reduced to the elementwise formulas before any backend
runs, so every backend sees the same elementwise problem:
- aot / aot_unpaired sort across the batch: the pairs are re-ordered by a detached argsort
  (differentiable gather), then "sigmoid" applies row by row. Losses come out in sorted
  order, as in TRL; rewards stay in the input order.
- bco_pair uses the reference point delta of BCO: TRL up to 0.2x kept a running mean of the
  rewards in the trainer. Here it is the explicit `bco_delta` (a float or a scalar tensor,
  e.g. your own running mean); None uses the detached batch mean of cat(beta c, beta r).
  TRL 1.x dropped the shift: pass `bco_delta=0.0` to get its numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import checks
from ..backends import dispatch, register
from . import _inputs

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
              "sigmoid_norm")
# loss types that divide the log-ratios by completion lengths (both lengths required)
LENGTH_NORMALIZED = ("ipo", "sigmoid_norm")
# loss types that read label_smoothing (any other type requires label_smoothing=0)
LABEL_SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")

# The elementwise formulas the backends evaluate. Each kernel switches on this code, so the
# order is part of the Triton and CUDA kernels' interface (csrc/cuda/preference.cu).
FORMULAS = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
            "sppo_hard", "apo_zero", "apo_down", "discopop")


@dataclass(frozen=True)
class DPOProblem:
    """The elementwise problem every backend solves (after sorting and bco's delta)."""

    formula: str           # one of FORMULAS
    normalize: bool        # divide c and r by the lengths inside the loss (not the rewards)
    beta: float
    label_smoothing: float
    discopop_tau: float

    @property
    def code(self) -> int:
        return FORMULAS.index(self.formula)


# ---------------------------------------------------------------------------------------
# The torch reference: one small function per formula, on the log-ratios c, r.


def _sigmoid(c, r, delta, p: DPOProblem):
    z = p.beta * (c - r)
    eps = p.label_smoothing
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _robust(c, r, delta, p: DPOProblem):
    z = p.beta * (c - r)
    eps = p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _exo_pair(c, r, delta, p: DPOProblem):
    z = p.beta * (c - r)
    eps = p.label_smoothing or 1e-3  # TRL: log(0) is undefined, so 0 means 1e-3
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def _hinge(c, r, delta, p: DPOProblem):
    return torch.relu(1 - p.beta * (c - r))


def _ipo(c, r, delta, p: DPOProblem):
    return (c - r - 1 / (2 * p.beta)) ** 2


def _bco_pair(c, r, delta, p: DPOProblem):
    return -F.logsigmoid(p.beta * c - delta) - F.logsigmoid(-(p.beta * r - delta))


def _sppo_hard(c, r, delta, p: DPOProblem):
    return (c - 0.5 / p.beta) ** 2 + (r + 0.5 / p.beta) ** 2


def _nca_pair(c, r, delta, p: DPOProblem):
    a, b = p.beta * c, p.beta * r
    return -F.logsigmoid(a) - 0.5 * F.logsigmoid(-a) - 0.5 * F.logsigmoid(-b)


def _apo_zero(c, r, delta, p: DPOProblem):
    return 1 - torch.sigmoid(p.beta * c) + torch.sigmoid(p.beta * r)


def _apo_down(c, r, delta, p: DPOProblem):
    return torch.sigmoid(p.beta * c) + 1 - torch.sigmoid(p.beta * (c - r))


def _discopop(c, r, delta, p: DPOProblem):
    z = p.beta * (c - r)
    m = torch.sigmoid(z / p.discopop_tau)
    # exp(-z) * m written as exp(-z + log m): exp(-z) alone overflows for very negative z
    # while m underflows to 0, and inf * 0 is NaN.
    return -F.logsigmoid(z) * (1 - m) + torch.exp(-z + F.logsigmoid(z / p.discopop_tau))


_TORCH_FORMULAS = {"sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "exo_pair": _exo_pair,
                   "nca_pair": _nca_pair, "robust": _robust, "bco_pair": _bco_pair,
                   "sppo_hard": _sppo_hard, "apo_zero": _apo_zero, "apo_down": _apo_down,
                   "discopop": _discopop}
assert tuple(_TORCH_FORMULAS) == FORMULAS


@register("dpo_loss", "torch")
def _dpo_torch(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
               rejected_lengths, delta, problem: DPOProblem):
    """Backend interface: `[S]` inputs, lengths `[S]` float (or None), delta `[1]` float
    (or None). Returns `(losses, chosen_rewards, rejected_rewards)`, float32 (float64 when an
    input is float64, for gradcheck)."""
    inputs = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32
    chosen = policy_chosen.to(dtype) - ref_chosen.to(dtype)
    rejected = policy_rejected.to(dtype) - ref_rejected.to(dtype)
    loss_c, loss_r = chosen, rejected
    if problem.normalize:
        loss_c, loss_r = chosen / chosen_lengths.to(dtype), rejected / rejected_lengths.to(dtype)
    delta = None if delta is None else delta.to(dtype)
    losses = _TORCH_FORMULAS[problem.formula](loss_c, loss_r, delta, problem)
    return losses, (problem.beta * chosen).detach(), (problem.beta * rejected).detach()


@register("dpo_loss", "triton")
def _dpo_triton(*args):
    from .triton_preference import dpo_loss_triton  # triton is imported on first use

    return dpo_loss_triton(*args)


@register("dpo_loss", "cuda")
def _dpo_cuda(*args):
    from .cuda import dpo_loss_cuda

    return dpo_loss_cuda(*args)


# ---------------------------------------------------------------------------------------
# The public op.


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None,
             discopop_tau: float = 0.05, bco_delta: float | torch.Tensor | None = None,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses (see the module docstring for every formula and paper).

    Args:
        policy_chosen_logps, policy_rejected_logps: `[S]` summed log-probs of the chosen and
            rejected completions under the policy (any float dtype; they may differ).
        ref_chosen_logps, ref_rejected_logps: `[S]`, the same under the reference model.
        beta: > 0, the KL temperature (IPO's tau, SPPO's eta^-1).
        loss_type: one of `LOSS_TYPES` (TRL's names).
        label_smoothing: eps in [0, 0.5), read by sigmoid, robust, exo_pair, aot and
            aot_unpaired; any other type raises ValueError unless it is 0.
        chosen_lengths, rejected_lengths: `[S]` completion token counts (>= 0, clamped at 1
            as in TRL). Required by ipo and sigmoid_norm (ValueError naming the missing one);
            refused by the other types, so nobody believes they normalized when they did not.
        discopop_tau: > 0, DiscoPOP's temperature (TRL's `discopop_tau`, default 0.05).
        bco_delta: bco_pair's reference point (a float or a one-element tensor, treated as
            a constant); None uses the batch mean of the rewards, detached.
        backend: "auto", "torch", "triton" or "cuda".

    Returns:
        `(losses [S], chosen_rewards [S], rejected_rewards [S])`, float32 (float64 when an
        input is float64). Rewards are detached. `losses.mean()` is TRL's loss. For
        aot/aot_unpaired the losses are in the sorted order (as in TRL); everything else is
        in the input order.
    """
    _inputs.sequence_tensors(policy_chosen_logps=policy_chosen_logps,
                             policy_rejected_logps=policy_rejected_logps,
                             ref_chosen_logps=ref_chosen_logps,
                             ref_rejected_logps=ref_rejected_logps)
    checks.one_of("loss_type", loss_type, LOSS_TYPES)
    beta = _inputs.scalar_param("beta", beta, low=0.0, low_open=True)
    label_smoothing = _inputs.scalar_param("label_smoothing", label_smoothing, low=0.0,
                                           high=0.5, high_open=True)
    discopop_tau = _inputs.scalar_param("discopop_tau", discopop_tau, low=0.0, low_open=True)
    if label_smoothing and loss_type not in LABEL_SMOOTHED:
        raise ValueError(f"label_smoothing is only used by loss_type in {LABEL_SMOOTHED}; "
                         f"got label_smoothing={label_smoothing} with loss_type={loss_type!r}")
    if bco_delta is not None and loss_type != "bco_pair":
        raise ValueError(f"bco_delta is only used by loss_type='bco_pair', got {loss_type!r}")

    like = policy_chosen_logps
    if loss_type in LENGTH_NORMALIZED:
        for name, value in (("chosen_lengths", chosen_lengths),
                            ("rejected_lengths", rejected_lengths)):
            if value is None:
                raise ValueError(f"loss_type={loss_type!r} divides the log-ratios by the "
                                 f"completion lengths: pass {name} ([S] token counts)")
        chosen_lengths = _inputs.lengths("chosen_lengths", chosen_lengths,
                                         "policy_chosen_logps", like)
        rejected_lengths = _inputs.lengths("rejected_lengths", rejected_lengths,
                                           "policy_chosen_logps", like)
    else:
        for name, value in (("chosen_lengths", chosen_lengths),
                            ("rejected_lengths", rejected_lengths)):
            if value is not None:
                raise ValueError(f"{name} is only used by loss_type in {LENGTH_NORMALIZED}; "
                                 f"loss_type={loss_type!r} works on summed log-probs")

    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    delta = _bco_delta(bco_delta, pc, pr, rc, rr, beta) if loss_type == "bco_pair" else None
    # Sort keys in float64, so bf16 inputs sort as their exact values do.
    if loss_type == "aot":
        # sort(pi_w - pi_l) - sort(ref_w - ref_l): re-order the policy pairs by their own
        # log-ratio and the reference pairs by theirs; then row i is plain sigmoid.
        by_policy = torch.argsort(pc.detach().double() - pr.detach().double())
        by_ref = torch.argsort(rc.detach().double() - rr.detach().double())
        pc, pr, rc, rr = pc[by_policy], pr[by_policy], rc[by_ref], rr[by_ref]
    elif loss_type == "aot_unpaired":
        # sort(c) - sort(r): re-order each side (policy with its reference) by its log-ratio.
        by_chosen = torch.argsort(pc.detach().double() - rc.detach().double())
        by_rejected = torch.argsort(pr.detach().double() - rr.detach().double())
        pc, rc, pr, rr = pc[by_chosen], rc[by_chosen], pr[by_rejected], rr[by_rejected]
    formula = _FORMULA_OF.get(loss_type, loss_type)
    problem = DPOProblem(formula, loss_type in LENGTH_NORMALIZED, beta, label_smoothing,
                         discopop_tau)
    losses, chosen_rewards, rejected_rewards = dispatch(
        "dpo_loss", backend, like.device, pc, pr, rc, rr, chosen_lengths, rejected_lengths,
        delta, problem)
    if loss_type in ("aot", "aot_unpaired"):
        # The kernel's rewards belong to re-ordered rows; TRL reports them in input order.
        chosen_rewards = _reward(policy_chosen_logps, ref_chosen_logps, beta, losses.dtype)
        rejected_rewards = _reward(policy_rejected_logps, ref_rejected_logps, beta, losses.dtype)
    return losses, chosen_rewards, rejected_rewards


_FORMULA_OF = {"aot": "sigmoid", "aot_unpaired": "sigmoid", "sigmoid_norm": "sigmoid"}


def _reward(policy: torch.Tensor, ref: torch.Tensor, beta: float, dtype: torch.dtype):
    return (beta * (policy.detach().to(dtype) - ref.detach().to(dtype)))


def _bco_delta(bco_delta, pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """bco_pair's reference point as a detached one-element float tensor."""
    dtype = torch.float64 if pc.dtype == torch.float64 else torch.float32
    if bco_delta is None:
        # TRL: the mean of cat(chosen_rewards, rejected_rewards), detached (a running mean
        # over steps there; pass your own running mean as bco_delta to reproduce that).
        rewards = torch.cat([_reward(pc, rc, beta, dtype), _reward(pr, rr, beta, dtype)])
        return rewards.mean().reshape(1)
    if isinstance(bco_delta, torch.Tensor):
        checks.floating("bco_delta", bco_delta)
        if bco_delta.numel() != 1:
            raise ValueError(f"bco_delta must be a scalar, got shape {tuple(bco_delta.shape)}")
        checks.same_device("bco_delta", bco_delta, "policy_chosen_logps", pc)
        _inputs.all_finite(bco_delta=bco_delta)
        return bco_delta.detach().to(dtype).reshape(1)
    value = _inputs.scalar_param("bco_delta", bco_delta)
    return torch.tensor([value], dtype=dtype, device=pc.device)
