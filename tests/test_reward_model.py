"""Reward-model losses against float64 evaluations of their formulas (written here)."""

from __future__ import annotations

import itertools

import pytest
import torch

from alignfuse.kernels.reward_model import listwise_rm_loss, pairwise_rm_loss, pointwise_rm_loss
from helpers import assert_rel_close

S = 37


def _values_and_grads(fn, *tensors, reduction="mean"):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves, reduction=reduction)
    weights = torch.rand(out.shape, dtype=torch.float64) + 0.5
    (out.double() * weights).sum().backward()
    return out, [x.grad for x in leaves], weights


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_pointwise_is_mse(reduction):
    scores, targets = 3 * torch.randn(S), 3 * torch.randn(S)
    out, grads, w = _values_and_grads(pointwise_rm_loss, scores, targets, reduction=reduction)
    sq = (scores.double() - targets.double()) ** 2
    expected = {"mean": sq.sum() / S, "sum": sq.sum(), "none": sq}[reduction]
    assert out.dtype == torch.float32
    assert_rel_close(out, expected, 1e-6, "pointwise")
    scale = {"mean": 1 / S, "sum": 1.0, "none": 1.0}[reduction]
    d_scores = 2 * (scores.double() - targets.double()) * w * scale
    assert_rel_close(grads[0], d_scores, 1e-5, "pointwise grad scores")
    assert_rel_close(grads[1], -d_scores, 1e-5, "pointwise grad targets")


def _bt(x):  # -log sigmoid(x) = log(1 + e^-x), written directly in float64
    return torch.log1p(torch.exp(-x))


@pytest.mark.parametrize("margin_kind", ["none", "float", "tensor"])
def test_pairwise_is_bradley_terry(margin_kind):
    chosen, rejected = 2 * torch.randn(S), 2 * torch.randn(S)
    margin = {"none": None, "float": 0.75, "tensor": torch.rand(S)}[margin_kind]
    leaves = [x.clone().requires_grad_(True) for x in (chosen, rejected)]
    out = pairwise_rm_loss(*leaves, margin=margin, reduction="none")
    m = 0.0 if margin is None else (margin.double() if torch.is_tensor(margin) else margin)
    refs = [x.double().requires_grad_(True) for x in (chosen, rejected)]
    expected = _bt(refs[0] - refs[1] - m)
    assert_rel_close(out, expected, 1e-6, "pairwise")
    assert_rel_close(pairwise_rm_loss(chosen, rejected, margin=margin), expected.mean(), 1e-6)
    out.sum().backward()
    expected.sum().backward()
    for a, e in zip(leaves, refs):
        assert_rel_close(a.grad, e.grad, 1e-5, "pairwise grad")


def _listwise_reference(scores, ranking):
    """Loop over all C(K,2) pairs (i ranked above j), -log sigmoid(r_i - r_j), mean per prompt."""
    S_, K = scores.shape
    per_prompt = []
    for s in range(S_):
        terms = [_bt(scores[s, ranking[s, a]] - scores[s, ranking[s, b]])
                 for a, b in itertools.combinations(range(K), 2)]
        per_prompt.append(torch.stack(terms).mean())
    return torch.stack(per_prompt)


@pytest.mark.parametrize("K", [2, 5])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_listwise_matches_pair_loop(K, reduction):
    n = 7
    scores = 2 * torch.randn(n, K)
    ranking = torch.stack([torch.randperm(K) for _ in range(n)])
    leaf = scores.clone().requires_grad_(True)
    out = listwise_rm_loss(leaf, ranking, reduction=reduction)
    ref_leaf = scores.double().requires_grad_(True)
    per_prompt = _listwise_reference(ref_leaf, ranking)
    expected = per_prompt.mean() if reduction == "mean" else per_prompt
    assert out.dtype == torch.float32
    assert_rel_close(out, expected, 1e-6, "listwise")
    out.sum().backward()
    expected.sum().backward()
    assert_rel_close(leaf.grad, ref_leaf.grad, 1e-5, "listwise grad")


def test_listwise_K2_equals_pairwise():
    scores = torch.randn(S, 2)
    ranking = torch.tensor([[1, 0]]).repeat(S, 1)  # answer 1 is the better one
    assert_rel_close(listwise_rm_loss(scores, ranking),
                     pairwise_rm_loss(scores[:, 1], scores[:, 0]).double(), 1e-6)


def test_gradcheck():
    a, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, y: pointwise_rm_loss(x, y, reduction="none"),
                                    [a.clone().requires_grad_(True), b.clone().requires_grad_(True)])
    assert torch.autograd.gradcheck(lambda x, y: pairwise_rm_loss(x, y, margin=0.3),
                                    [a.clone().requires_grad_(True), b.clone().requires_grad_(True)])
    scores = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    ranking = torch.stack([torch.randperm(3) for _ in range(4)])
    assert torch.autograd.gradcheck(lambda x: listwise_rm_loss(x, ranking, reduction="none"),
                                    [scores])


def test_extreme_scores_stay_finite():
    chosen = torch.tensor([80.0, -80.0, 500.0, -500.0], requires_grad=True)
    rejected = torch.zeros(4)
    out = pairwise_rm_loss(chosen, rejected, reduction="none")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(chosen.grad).all()
    assert_rel_close(out, torch.tensor([0.0, 80.0, 0.0, 500.0], dtype=torch.float64), 1e-6)


def test_bf16_scores_give_fp32_loss():
    chosen, rejected = torch.randn(S).bfloat16(), torch.randn(S).bfloat16()
    out = pairwise_rm_loss(chosen, rejected, reduction="none")
    assert out.dtype == torch.float32
    assert_rel_close(out, _bt(chosen.double() - rejected.double()), 1e-6)


def test_errors_name_the_argument():
    x = torch.randn(S)
    with pytest.raises(ValueError, match="targets must have the same shape"):
        pointwise_rm_loss(x, x[:-1])
    with pytest.raises(ValueError, match="chosen_scores is empty"):
        pairwise_rm_loss(x[:0], x[:0])
    bad = x.clone()
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="rejected_scores contains 1 NaN"):
        pairwise_rm_loss(x, bad)
    with pytest.raises(ValueError, match="margin must have the same shape"):
        pairwise_rm_loss(x, x, margin=torch.zeros(3))
    with pytest.raises(ValueError, match="reduction must be one of"):
        pairwise_rm_loss(x, x, reduction="avg")
    with pytest.raises(ValueError, match="scores must be 2-D"):
        listwise_rm_loss(x, x.long())
    with pytest.raises(ValueError, match="K >= 2"):
        listwise_rm_loss(torch.randn(3, 1), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="ranking must hold a permutation"):
        listwise_rm_loss(torch.randn(2, 3), torch.tensor([[0, 1, 2], [0, 0, 1]]))
    with pytest.raises(TypeError, match="ranking must have dtype"):
        listwise_rm_loss(torch.randn(2, 3), torch.zeros(2, 3))
