"""Reward-model losses on scalar scores (one score per completion).

- pointwise: regression on a target score, `(r - t)^2` (MSE).
- pairwise: Bradley-Terry, `-log sigmoid(r_w - r_l - m)` (InstructGPT, Ouyang et al. 2022,
  https://arxiv.org/abs/2203.02155, eq. 1; the margin m as in Llama 2,
  https://arxiv.org/abs/2307.09288, eq. 2). This is TRL's `RewardTrainer` loss.
- listwise: K ranked answers per prompt, the mean of `-log sigmoid(r_i - r_j)` over the
  C(K, 2) pairs where answer i is ranked above answer j (InstructGPT eq. 1, which
  normalizes by C(K, 2)).

Reduction: each op takes `reduction=` "mean" (default: the scalar a training loop
minimizes), "sum" or "none" (per element: `[S]` for pairwise and pointwise, the per-prompt
mean over its pairs `[S]` for listwise; "mean" of those equals the mean over all pairs).
Outputs are float32 (float64 inputs stay float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checks
from .backends import dispatch, register
from .preference import _inputs

REDUCTIONS = ("mean", "sum", "none")


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def _float(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_scores(**named: torch.Tensor) -> None:
    """Floating tensors of one non-empty shape on one device, all finite."""
    (first_name, first), *rest = named.items()
    checks.floating(first_name, first)
    if first.dim() == 0:
        raise ValueError(f"{first_name} must have a batch dimension, got a 0-d tensor")
    checks.non_empty(first_name, first)
    for name, value in rest:
        checks.floating(name, value)
        checks.same_shape(name, value, first_name, first)
        checks.same_device(name, value, first_name, first)
    _inputs.all_finite(**named)


@register("pointwise_rm_loss", "torch")
def _pointwise_torch(scores, targets, reduction):
    dtype = _float(scores, targets)
    return _reduce((scores.to(dtype) - targets.to(dtype)) ** 2, reduction)


def pointwise_rm_loss(scores: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean",
                      backend: str = "auto") -> torch.Tensor:
    """Mean squared error between scores and target scores.

    scores, targets: floating, the same shape (e.g. `[S]`). Gradients flow to both.
    Returns a scalar ("mean"/"sum") or the per-element squared errors ("none").
    """
    _check_scores(scores=scores, targets=targets)
    checks.one_of("reduction", reduction, REDUCTIONS)
    return dispatch("pointwise_rm_loss", backend, scores.device, scores, targets, reduction)


@register("pairwise_rm_loss", "torch")
def _pairwise_torch(chosen_scores, rejected_scores, margin, reduction):
    dtype = _float(chosen_scores, rejected_scores)
    diff = chosen_scores.to(dtype) - rejected_scores.to(dtype)
    if margin is not None:
        diff = diff - margin.to(dtype)
    return _reduce(-F.logsigmoid(diff), reduction)


def pairwise_rm_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *,
                     margin: torch.Tensor | float | None = None, reduction: str = "mean",
                     backend: str = "auto") -> torch.Tensor:
    """Bradley-Terry loss `-log sigmoid(r_w - r_l - margin)` per pair.

    chosen_scores, rejected_scores: floating `[S]` (or any one shape).
    margin: None (0), a float, or a tensor of the scores' shape (per-pair margins, as in
        TRL's "margin" column); no gradient flows into it.
    Returns a scalar ("mean"/"sum") or the per-pair losses ("none").
    """
    _check_scores(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    checks.one_of("reduction", reduction, REDUCTIONS)
    if margin is not None:
        if isinstance(margin, torch.Tensor):
            _check_scores(margin=margin)
            checks.same_shape("margin", margin, "chosen_scores", chosen_scores)
            checks.same_device("margin", margin, "chosen_scores", chosen_scores)
            margin = margin.detach()
        else:
            value = _inputs.scalar_param("margin", margin)
            margin = torch.full_like(chosen_scores, value, dtype=_float(chosen_scores))
    return dispatch("pairwise_rm_loss", backend, chosen_scores.device, chosen_scores,
                    rejected_scores, margin, reduction)


@register("listwise_rm_loss", "torch")
def _listwise_torch(scores, ranking, reduction):
    dtype = _float(scores)
    K = scores.shape[1]
    ranked = scores.to(dtype).gather(1, ranking.long())          # [S, K], best first
    diff = ranked.unsqueeze(2) - ranked.unsqueeze(1)              # [S, K, K]: r_i - r_j
    above = torch.ones(K, K, dtype=torch.bool, device=scores.device).triu(1)  # i ranked above j
    per_prompt = -F.logsigmoid(diff[:, above]).mean(dim=1)        # mean over C(K, 2) pairs
    return _reduce(per_prompt, reduction)


def listwise_rm_loss(scores: torch.Tensor, ranking: torch.Tensor, *, reduction: str = "mean",
                     backend: str = "auto") -> torch.Tensor:
    """Ranking loss over K answers per prompt: mean of -log sigmoid(r_i - r_j), i above j.

    scores: floating `[S, K]`, K >= 2, the score of each answer.
    ranking: integer `[S, K]`; `ranking[s, j]` is the index (into `scores[s]`) of the j-th
        best answer, so each row is a permutation of 0..K-1 (ValueError otherwise).
    Returns a scalar ("mean"/"sum") or the per-prompt losses `[S]` ("none").
    """
    _check_scores(scores=scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [S, K], got shape {tuple(scores.shape)}")
    if scores.shape[1] < 2:
        raise ValueError(f"scores must have K >= 2 answers per prompt, got K={scores.shape[1]}")
    checks.integer("ranking", ranking)
    checks.same_shape("ranking", ranking, "scores", scores)
    checks.same_device("ranking", ranking, "scores", scores)
    K = scores.shape[1]
    expected = torch.arange(K, device=ranking.device)
    if not bool((ranking.long().sort(dim=1).values == expected).all()):
        raise ValueError(f"ranking must hold a permutation of 0..{K - 1} in every row")
    checks.one_of("reduction", reduction, REDUCTIONS)
    return dispatch("listwise_rm_loss", backend, scores.device, scores, ranking, reduction)
