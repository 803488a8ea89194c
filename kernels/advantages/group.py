"""Group-relative advantages (GRPO family): each prompt's G sampled answers are a group.

`rewards` is `[S]` with S = num_groups * group_size and the rows of one group contiguous.
Within a group g with rewards r_1..r_G, mean m_g and Bessel-corrected std sd:

- "grpo"    (DeepSeekMath, https://arxiv.org/abs/2402.03300):  (r_i - m_g) / (sd + eps)
- "dr_grpo" (Dr. GRPO, https://arxiv.org/abs/2503.20783):       r_i - m_g
- "rloo"    (RLOO, https://arxiv.org/abs/2402.14740):           r_i - mean_{j != i} r_j
                                                                = G/(G-1) (r_i - m_g)
- "rank":   r is replaced by its rank within the group (1 = lowest, ties share their average
            rank), then (rank_i - mean rank) / (sd(rank) + eps): invariant to any monotone
            transform of the reward.

`scale` (TRL's `scale_rewards`) says where sd comes from for "grpo" and "rank": "group"
(the group's), "batch" (the std of all S values: rewards, or ranks for "rank") or "none"
(no division). The mean is always the group's. "dr_grpo" and "rloo" divide by no std
(their papers define none), so they ignore `scale`.

Edge cases, by definition: a group whose values are all equal gets exactly 0 (not NaN, and
not rounding noise / eps); a group of size 1 has no baseline (the std is undefined with
Bessel's correction, the leave-one-out mean has no terms), so its advantage is 0.
Advantages are targets: the result carries no gradient.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import checks
from ..backends import dispatch, register

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "rank")
SCALES = ("group", "batch", "none")
# code of each estimator / scale in the Triton and CUDA kernels
ESTIMATOR_CODES = {name: i for i, name in enumerate(ESTIMATORS)}
SCALE_CODES = {name: i for i, name in enumerate(SCALES)}

# The torch formulas, one function per estimator (verl's registry pattern). A new estimator
# is a function here, a name in ESTIMATORS and a code in the Triton and CUDA kernels.
_ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}


def register_advantage_estimator(name: str):
    """Decorator: `fn(groups [num_groups, G] float, scale, eps) -> advantages [num_groups, G]`."""

    def decorator(fn):
        _ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorator


def batch_std(values: torch.Tensor) -> float:
    """The Bessel std of all values, the divisor of scale="batch", in float64 whatever their
    dtype: a float32 std of rewards on an offset (all near 100, say) errs relative to the
    offset, and this is one reduction over S values."""
    return float(values.double().std())


def kernel_scale(rewards: torch.Tensor, estimator: str, scale: str,
                 eps: float) -> tuple[int, float]:
    """(scale code, "grpo"/"batch" divisor) for the Triton and CUDA kernels. "rank" with
    "batch" runs as "none", and the host divides afterwards (`finish_rank_batch`)."""
    if estimator == "rank" and scale == "batch":
        return SCALE_CODES["none"], 1.0
    if estimator == "grpo" and scale == "batch" and rewards.numel() > 1:
        return SCALE_CODES[scale], batch_std(rewards) + eps
    return SCALE_CODES[scale], 1.0


def finish_rank_batch(out: torch.Tensor, estimator: str, scale: str,
                      eps: float) -> torch.Tensor:
    """The kernels' output, divided by the batch std of the ranks for "rank" with "batch":
    every group's mean rank is (G + 1) / 2, so that std is the one of the centred ranks the
    kernel wrote."""
    if estimator == "rank" and scale == "batch" and out.numel() > 1:
        return out / ((out.square().sum() / (out.numel() - 1)).sqrt() + eps)
    return out


def _centered(values: torch.Tensor) -> torch.Tensor:
    """values - their row's mean, computed from the differences to the row's first value.
    Every estimator is invariant to a shift of a group, and the shift keeps the precision of
    values that sit on a large offset (reward-model scores around 100, say): the difference
    of two floats within a factor of 2 is exact (Sterbenz), so the mean of the differences
    errs relative to the group's spread, not to the offset. The Triton and CUDA kernels do
    the same."""
    shifted = values - values[:, :1]
    return shifted - shifted.mean(dim=1, keepdim=True)


def _standardize(values: torch.Tensor, scale: str, eps: float) -> torch.Tensor:
    centered = _centered(values)
    if scale == "none":
        return centered
    if scale == "group":  # Bessel-corrected, as TRL and verl
        std = (centered.square().sum(dim=1, keepdim=True) / (values.shape[1] - 1)).sqrt()
    else:
        std = batch_std(values)
    return centered / (std + eps)


@register_advantage_estimator("grpo")
def _grpo(rewards: torch.Tensor, scale: str, eps: float) -> torch.Tensor:
    return _standardize(rewards, scale, eps)


@register_advantage_estimator("dr_grpo")
def _dr_grpo(rewards: torch.Tensor, scale: str, eps: float) -> torch.Tensor:
    return _centered(rewards)


@register_advantage_estimator("rloo")
def _rloo(rewards: torch.Tensor, scale: str, eps: float) -> torch.Tensor:
    group_size = rewards.shape[1]
    shifted = rewards - rewards[:, :1]  # see _centered
    leave_one_out_mean = (shifted.sum(dim=1, keepdim=True) - shifted) / (group_size - 1)
    return shifted - leave_one_out_mean


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of each value within its row (1 = lowest), ties sharing their average rank."""
    less = (values.unsqueeze(2) > values.unsqueeze(1)).sum(dim=2)    # how many are smaller
    equal = (values.unsqueeze(2) == values.unsqueeze(1)).sum(dim=2)  # itself included
    return less.to(values.dtype) + (equal.to(values.dtype) + 1) / 2


@register_advantage_estimator("rank")
def _rank(rewards: torch.Tensor, scale: str, eps: float) -> torch.Tensor:
    return _standardize(average_ranks(rewards), scale, eps)


@register("group_advantages", "torch")
def _group_advantages_torch(rewards: torch.Tensor, group_size: int, estimator: str, scale: str,
                            eps: float) -> torch.Tensor:
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    groups = rewards.detach().to(dtype).reshape(-1, group_size)
    if group_size == 1:
        return torch.zeros_like(groups).reshape(-1)
    advantages = _ADVANTAGE_ESTIMATORS[estimator](groups, scale, eps)
    # all-equal groups: exactly 0 (the mean of equal floats can differ from them by rounding)
    constant = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    return torch.where(constant, 0.0, advantages).reshape(-1)


@register("group_advantages", "triton")
def _group_advantages_triton(rewards: torch.Tensor, group_size: int, estimator: str, scale: str,
                             eps: float) -> torch.Tensor:
    from .triton_group import group_advantages_forward

    out = group_advantages_forward(rewards, group_size, estimator, scale, eps)
    return out.double() if rewards.dtype == torch.float64 else out


def group_advantages(rewards: torch.Tensor, group_size: int, *, estimator: str = "grpo",
                     scale: str = "group", eps: float = 1e-6,
                     backend: str = "auto") -> torch.Tensor:
    """Group-relative advantages of `[S]` rewards in contiguous groups of `group_size`.

    estimator: "grpo", "dr_grpo", "rloo" or "rank"; scale: "group", "batch" or "none"
    (see the module docstring). Returns `[S]` float32 (float64 rewards give float64),
    without gradient.
    """
    checks.floating("rewards", rewards, ndim=1)
    checks.non_empty("rewards", rewards)
    checks.finite("rewards", rewards)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_size {group_size} must divide the number of rewards "
                         f"{rewards.numel()}")
    checks.one_of("estimator", estimator, ESTIMATORS)
    checks.one_of("scale", scale, SCALES)
    eps = checks.non_negative("eps", eps)
    return dispatch("group_advantages", backend, rewards.device, rewards, group_size, estimator,
                    scale, eps)
