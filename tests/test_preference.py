"""Preference losses against float64 evaluations of the papers' formulas (written here, in
TRL's form, independently of alignfuse), on every runnable backend: values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignfuse.kernels.preference import (LOSS_TYPES, dpo_loss, kto_kl, kto_loss, orpo_loss,
                                          simpo_loss)
from helpers import assert_rel_close, build_host_harness

S = 37
FWD_TOL, GRAD_TOL = 2e-5, 1e-4


def _logps(n=S, scale=3.0, dtype=torch.float32, device="cpu"):
    """Policy/reference summed log-probs: very negative, with log-ratios of a few nats."""
    policy = -(5 + 60 * torch.rand(n, dtype=torch.float64))
    ref = policy + scale * torch.randn(n, dtype=torch.float64)
    return policy.to(device, dtype), ref.to(device, dtype)


# ---------------------------------------------------------------------------------------
# float64 references, straight from the papers (TRL's DPOTrainer.dpo_loss form)


def ref_dpo(pc, pr, rc, rr, loss_type, beta, eps=0.0, lc=None, lr=None, tau=0.05, delta=None):
    pc, pr, rc, rr = (x.double() for x in (pc, pr, rc, rr))
    chosen_lr, rejected_lr = pc - rc, pr - rr
    logits = (pc - pr) - (rc - rr)
    ls = F.logsigmoid
    if loss_type == "sigmoid":
        losses = -ls(beta * logits) * (1 - eps) - ls(-beta * logits) * eps
    elif loss_type == "robust":
        losses = (-ls(beta * logits) * (1 - eps) + ls(-beta * logits) * eps) / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        e = eps if eps else 1e-3
        losses = (torch.sigmoid(beta * logits) * (ls(beta * logits) - math.log(1 - e))
                  + torch.sigmoid(-beta * logits) * (ls(-beta * logits) - math.log(e)))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":  # TRL: per-token average of each log-ratio
        lc, lr = lc.double().clamp(min=1), lr.double().clamp(min=1)
        losses = (chosen_lr / lc - rejected_lr / lr - 1 / (2 * beta)) ** 2
    elif loss_type == "bco_pair":
        if delta is None:
            delta = torch.cat([beta * chosen_lr, beta * rejected_lr]).mean().detach()
        losses = -ls(beta * chosen_lr - delta) - ls(-(beta * rejected_lr - delta))
    elif loss_type == "sppo_hard":
        losses = (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2
    elif loss_type == "nca_pair":
        cr, rr_ = beta * chosen_lr, beta * rejected_lr
        losses = -ls(cr) - 0.5 * ls(-cr) - 0.5 * ls(-rr_)
    elif loss_type == "aot_unpaired":
        d = torch.sort(chosen_lr, dim=0)[0] - torch.sort(rejected_lr, dim=0)[0]
        losses = -ls(beta * d) * (1 - eps) - ls(-beta * d) * eps
    elif loss_type == "aot":
        d = torch.sort(pc - pr, dim=0)[0] - torch.sort(rc - rr, dim=0)[0]
        losses = -ls(beta * d) * (1 - eps) - ls(-beta * d) * eps
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * chosen_lr) + torch.sigmoid(beta * rejected_lr)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * chosen_lr) + 1 - torch.sigmoid(beta * logits)
    elif loss_type == "discopop":
        z = beta * logits
        m = torch.sigmoid(z / tau)
        losses = -ls(z) * (1 - m) + torch.exp(-z) * m
    elif loss_type == "sigmoid_norm":
        lc, lr = lc.double().clamp(min=1), lr.double().clamp(min=1)
        losses = -ls(beta * (chosen_lr / lc - rejected_lr / lr))
    else:
        raise AssertionError(loss_type)
    return losses, (beta * chosen_lr).detach(), (beta * rejected_lr).detach()


# (loss_type, label_smoothing) cases: every type, plus smoothing where a type reads it
CASES = [(t, 0.0) for t in LOSS_TYPES] + [("sigmoid", 0.1), ("robust", 0.2),
                                           ("exo_pair", 0.15), ("aot", 0.1),
                                           ("aot_unpaired", 0.25)]


def _length_kwargs(loss_type, n=S, device="cpu"):
    if loss_type not in ("ipo", "sigmoid_norm"):
        return {}
    lc = torch.randint(1, 40, (n,), device=device)
    lr = torch.randint(1, 40, (n,), device=device)
    lr[0] = 0  # a zero-length completion is clamped to 1, as in TRL
    return {"chosen_lengths": lc, "rejected_lengths": lr}


def _check_dpo(loss_type, eps, backend, beta=0.3, n=S, scale=3.0, dtype=torch.float32,
               device="cpu", fwd_tol=FWD_TOL, grad_tol=GRAD_TOL, floor=1e-30, **extra):
    pc, rc = _logps(n, scale, dtype, device)
    pr, rr = _logps(n, scale, dtype, device)
    kw = _length_kwargs(loss_type, n, device)
    leaves = [x.clone().requires_grad_(True) for x in (pc, pr, rc, rr)]
    out = dpo_loss(*leaves, beta=beta, loss_type=loss_type, label_smoothing=eps,
                   backend=backend, **kw, **extra)
    ref_leaves = [x.detach().double().requires_grad_(True) for x in (pc, pr, rc, rr)]
    ref = ref_dpo(*ref_leaves, loss_type, beta, eps, kw.get("chosen_lengths"),
                  kw.get("rejected_lengths"), tau=extra.get("discopop_tau", 0.05),
                  delta=extra.get("bco_delta"))
    for name, a, e in zip(("losses", "chosen_rewards", "rejected_rewards"), out, ref):
        assert a.dtype == torch.float32, f"{name} dtype {a.dtype}"
        assert a.shape == (n,)
        assert_rel_close(a, e, fwd_tol, f"{loss_type} {name}", floor)
    assert not out[1].requires_grad and not out[2].requires_grad
    weights = torch.rand(n, dtype=torch.float64, device=device) + 0.5
    (out[0] * weights.to(out[0].device, torch.float32)).sum().backward()
    (ref[0] * weights).sum().backward()
    for name, a, e in zip(("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"),
                          leaves, ref_leaves):
        assert a.grad.dtype == dtype
        assert_rel_close(a.grad, e.grad, grad_tol, f"{loss_type} grad {name}", floor)


@pytest.mark.parametrize("loss_type,eps", CASES)
def test_dpo_matches_formula(loss_type, eps, backend, device):
    _check_dpo(loss_type, eps, backend, device=device)


@pytest.mark.parametrize("beta", [0.05, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "discopop", "apo_down", "nca_pair"])
def test_dpo_other_betas(loss_type, beta, backend, device):
    _check_dpo(loss_type, 0.0, backend, beta=beta, device=device)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "aot_unpaired", "bco_pair"])
def test_dpo_batch_spanning_several_blocks(loss_type, backend, device):
    # > 2 kernel blocks of 512, ragged tail
    _check_dpo(loss_type, 0.0, backend, n=1031, device=device)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_size_one_batch(loss_type, backend, device):
    # One pair has no other values to carry the norm: a draw next to a zero of the loss
    # (IPO with h near 1/(2 beta), a hinge near its kink) leaves float32's ~1e-7 absolute
    # error over a tiny value (a draw reached 0.32 of the bound). Typical losses, and
    # gradients of ~beta, are O(0.1) or more, and there the floor of 0.1 changes nothing;
    # the batches of S pairs keep the pure relative check.
    _check_dpo(loss_type, 0.0, backend, n=1, device=device, floor=0.1)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_extreme_log_ratios_do_not_overflow(loss_type, backend, device):
    """Log-ratios of +-80 (beta=1: z up to +-160): finite, and equal to float64."""
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, -0.5], device=device)
    pc = torch.full((6,), -100.0, device=device)
    pr = torch.full((6,), -100.0, device=device)
    rc = pc - 80 * signs
    rr = pr + 80 * signs.flip(0)
    kw = _length_kwargs(loss_type, 6, device)
    leaves = [x.clone().requires_grad_(True) for x in (pc, pr, rc, rr)]
    beta = 1.0
    losses, _, _ = dpo_loss(*leaves, beta=beta, loss_type=loss_type, backend=backend, **kw)
    losses.sum().backward()
    assert torch.isfinite(losses).all(), losses
    for x in leaves:
        assert torch.isfinite(x.grad).all(), x.grad
    refs = [x.double().requires_grad_(True) for x in (pc, pr, rc, rr)]
    expected = ref_dpo(*refs, loss_type, beta, 0.0, kw.get("chosen_lengths"),
                       kw.get("rejected_lengths"))[0]
    if loss_type == "discopop":
        # TRL's exp(-z) * sigmoid(z/tau) is inf * 0 = NaN at z = -160 even in float64;
        # the stable form exp(-z + logsigmoid(z/tau)) is the value it means.
        z = beta * ((refs[0] - refs[1]) - (refs[2] - refs[3]))
        m = torch.sigmoid(z / 0.05)
        expected = -F.logsigmoid(z) * (1 - m) + torch.exp(-z + F.logsigmoid(z / 0.05))
    assert_rel_close(losses, expected, 1e-5, f"{loss_type} at +-80")
    expected.sum().backward()
    for x, e in zip(leaves, refs):
        # atol: torch's float64 sigmoid'(80) = s(1 - s) rounds to 0 where the kernels keep
        # e^-80; gradients that small do not matter, their being finite does.
        torch.testing.assert_close(x.grad.double(), e.grad, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "aot", "bco_pair", "discopop"])
def test_dpo_bf16_inputs_give_fp32_loss(loss_type, backend, device):
    _check_dpo(loss_type, 0.0, backend, dtype=torch.bfloat16, grad_tol=1e-2, device=device)


def test_dpo_mixed_input_dtypes(backend, device):
    pc, rc = _logps(device=device)
    pr, rr = _logps(device=device)
    out = dpo_loss(pc.bfloat16(), pr.bfloat16(), rc, rr, backend=backend)
    ref = ref_dpo(pc.bfloat16(), pr.bfloat16(), rc, rr, "sigmoid", 0.1)
    assert_rel_close(out[0], ref[0], FWD_TOL, "mixed dtypes")


def test_float64_inputs_give_float64_outputs(backend, device):
    # as the torch reference (gradcheck runs in float64): losses, rewards and gradients are
    # float64 when an input is, on every backend (the kernels compute in float32)
    pc, rc = _logps(dtype=torch.float64, device=device)
    pr, rr = _logps(dtype=torch.float64, device=device)
    leaves = [x.clone().requires_grad_(True) for x in (pc, pr, rc, rr)]
    out = dpo_loss(*leaves, backend=backend)
    for name, a, e in zip(("losses", "chosen_rewards", "rejected_rewards"), out,
                          ref_dpo(pc, pr, rc, rr, "sigmoid", 0.1)):
        assert a.dtype == torch.float64, f"dpo {name} dtype {a.dtype}"
        assert_rel_close(a, e, FWD_TOL, f"dpo {name}")
    out[0].sum().backward()
    assert all(x.grad.dtype == torch.float64 for x in leaves)
    mixed = dpo_loss(pc, pr.float(), rc.bfloat16(), rr.float(), backend=backend)
    assert all(a.dtype == torch.float64 for a in mixed)  # one float64 input is enough

    desirable = torch.rand(S, device=device) < 0.5
    leaves = [x.clone().requires_grad_(True) for x in (pc, rc)]
    losses, rewards = kto_loss(*leaves, desirable, 0.3, beta=0.2, backend=backend)
    exp_losses, exp_rewards = ref_kto(pc, rc, desirable, 0.3, 0.2, 1.0, 1.0)
    assert losses.dtype == torch.float64 and rewards.dtype == torch.float64
    assert_rel_close(losses, exp_losses, FWD_TOL, "kto losses")
    assert_rel_close(rewards, exp_rewards, FWD_TOL, "kto rewards")
    losses.sum().backward()
    assert all(x.grad.dtype == torch.float64 for x in leaves)


def test_bco_explicit_delta(backend, device):
    _check_dpo("bco_pair", 0.0, backend, bco_delta=0.0, device=device)  # TRL 1.x: no shift
    _check_dpo("bco_pair", 0.0, backend, bco_delta=0.37, device=device)
    _check_dpo("bco_pair", 0.0, backend, bco_delta=torch.tensor(-0.2, device=device),
               device=device)


def test_aot_rewards_in_input_order(backend, device):
    pc, rc = _logps(device=device)
    pr, rr = _logps(device=device)
    _, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, loss_type="aot",
                                                   beta=0.2, backend=backend)
    assert_rel_close(chosen_rewards, 0.2 * (pc.double() - rc.double()), FWD_TOL)
    assert_rel_close(rejected_rewards, 0.2 * (pr.double() - rr.double()), FWD_TOL)


@pytest.mark.parametrize("loss_type,eps", CASES)
def test_dpo_torch_gradcheck(loss_type, eps):
    n = 6
    pc, rc = _logps(n, dtype=torch.float64)
    pr, rr = _logps(n, dtype=torch.float64)
    kw = _length_kwargs(loss_type, n)
    if loss_type == "bco_pair":  # the batch-mean delta is a constant by design
        kw["bco_delta"] = 0.2
    inputs = [x.requires_grad_(True) for x in (pc, pr, rc, rr)]
    fn = lambda *xs: dpo_loss(*xs, beta=0.3, loss_type=loss_type, label_smoothing=eps,  # noqa: E731
                              backend="torch", **kw)[0]
    assert torch.autograd.gradcheck(fn, inputs)


# ---------------------------------------------------------------------------------------
# DPO argument errors (validated before any backend runs)


def _four(n=S):
    pc, rc = _logps(n)
    pr, rr = _logps(n)
    return [pc, pr, rc, rr]


def test_dpo_errors_name_the_argument():
    x = _four()
    with pytest.raises(ValueError, match="policy_chosen_logps is empty"):
        dpo_loss(*_four(0))
    with pytest.raises(ValueError, match="ref_rejected_logps must have the same shape"):
        dpo_loss(x[0], x[1], x[2], x[3][:-1])
    bad = x[1].clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="policy_rejected_logps contains 1 NaN"):
        dpo_loss(x[0], bad, x[2], x[3])
    with pytest.raises(TypeError, match="ref_chosen_logps must have dtype"):
        dpo_loss(x[0], x[1], x[2].long(), x[3])
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo_loss(*x, loss_type="kto")
    with pytest.raises(ValueError, match="beta must be in"):
        dpo_loss(*x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        dpo_loss(*x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing is only used"):
        dpo_loss(*x, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="pass chosen_lengths"):
        dpo_loss(*x, loss_type="ipo")
    with pytest.raises(ValueError, match="pass rejected_lengths"):
        dpo_loss(*x, loss_type="sigmoid_norm", chosen_lengths=torch.ones(S))
    with pytest.raises(ValueError, match="chosen_lengths is only used"):
        dpo_loss(*x, chosen_lengths=torch.ones(S))
    with pytest.raises(ValueError, match="rejected_lengths must be >= 0"):
        dpo_loss(*x, loss_type="ipo", chosen_lengths=torch.ones(S),
                 rejected_lengths=-torch.ones(S))
    with pytest.raises(ValueError, match="chosen_lengths must have the same shape"):
        dpo_loss(*x, loss_type="ipo", chosen_lengths=torch.ones(S + 1),
                 rejected_lengths=torch.ones(S))
    with pytest.raises(ValueError, match="bco_delta is only used"):
        dpo_loss(*x, bco_delta=0.1)
    with pytest.raises(ValueError, match="policy_chosen_logps must be 1-D"):
        dpo_loss(*[t.reshape(1, -1) for t in x])


# ---------------------------------------------------------------------------------------
# KTO (Ethayarajh et al. 2024, eq. 8; TRL KTOTrainer.kto_loss)


def ref_kto(policy, ref, desirable, z0, beta, wd, wu):
    x = policy.double() - ref.double()
    z0 = float(z0)
    chosen = wd * (1 - torch.sigmoid(beta * (x - z0)))
    rejected = wu * (1 - torch.sigmoid(beta * (z0 - x)))
    return torch.where(desirable, chosen, rejected), (beta * x).detach()


def _check_kto(backend, n=S, dtype=torch.float32, scale=3.0, beta=0.2, wd=1.3, wu=0.7,
               grad_tol=GRAD_TOL, device="cpu"):
    policy, ref = _logps(n, scale, dtype, device)
    desirable = torch.rand(n, device=device) < 0.5
    z0 = kto_kl(*_logps(n, 0.5, device=device))
    leaves = [x.clone().requires_grad_(True) for x in (policy, ref)]
    losses, rewards = kto_loss(*leaves, desirable, z0, beta=beta, desirable_weight=wd,
                               undesirable_weight=wu, backend=backend)
    refs = [x.detach().double().requires_grad_(True) for x in (policy, ref)]
    exp_losses, exp_rewards = ref_kto(*refs, desirable, z0, beta, wd, wu)
    assert losses.dtype == torch.float32 and rewards.dtype == torch.float32
    assert not rewards.requires_grad
    assert_rel_close(losses, exp_losses, FWD_TOL, "kto losses")
    assert_rel_close(rewards, exp_rewards, FWD_TOL, "kto rewards")
    weights = torch.rand(n, dtype=torch.float64, device=device) + 0.5
    (losses * weights.float()).sum().backward()
    (exp_losses * weights).sum().backward()
    for a, e in zip(leaves, refs):
        assert a.grad.dtype == dtype
        assert_rel_close(a.grad, e.grad, grad_tol, "kto grad")


def test_kto_matches_formula(backend, device):
    _check_kto(backend, device=device)


def test_kto_size_one_large_and_bf16(backend, device):
    _check_kto(backend, n=1, device=device)
    _check_kto(backend, n=1031, device=device)
    _check_kto(backend, dtype=torch.bfloat16, grad_tol=1e-2, device=device)


def test_kto_extreme_log_ratios(backend, device):
    policy = torch.full((4,), -100.0, requires_grad=True, device=device)
    ref = torch.tensor([-20.0, -180.0, -20.0, -180.0], requires_grad=True,
                       device=device)  # x = -80, +80
    desirable = torch.tensor([True, True, False, False], device=device)
    losses, _ = kto_loss(policy, ref, desirable, torch.tensor(0.5, device=device), beta=1.0,
                         backend=backend)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(policy.grad).all()
    expected, _ = ref_kto(policy.detach(), ref.detach(), desirable, 0.5, 1.0, 1.0, 1.0)
    assert_rel_close(losses, expected, 1e-6, "kto at +-80")


def test_kto_torch_gradcheck():
    policy, ref = _logps(6, dtype=torch.float64)
    desirable = torch.tensor([True, False, True, True, False, False])
    fn = lambda p, r: kto_loss(p, r, desirable, 0.3, beta=0.4, backend="torch")[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, [policy.requires_grad_(True), ref.requires_grad_(True)])


def test_kto_kl_is_clamped_detached_mean():
    policy, ref = _logps(S)
    # every log-ratio >= 0.5, so the mean cannot cancel to a small number whose fp32 relative
    # error is large (a CI draw: 1.25e-6 on a mean of 0.021; over 1000 draws the worst is now
    # 2.2e-7, was 9.7e-6). The negative mean is checked below.
    policy = (ref + (policy - ref).abs() + 0.5).requires_grad_(True)
    z0 = kto_kl(policy, ref)
    assert z0.dim() == 0 and not z0.requires_grad and z0.dtype == torch.float32
    assert_rel_close(z0, (policy.double() - ref.double()).mean().clamp(min=0), 1e-6)
    assert float(kto_kl(ref - 5, ref)) == 0.0  # negative mean clamps to 0
    assert_rel_close(kto_kl(ref + 2, ref), torch.tensor(2.0, dtype=torch.float64), 1e-6)


def test_kto_errors_name_the_argument():
    policy, ref = _logps()
    desirable = torch.rand(S) < 0.5
    with pytest.raises(TypeError, match="desirable must have dtype"):
        kto_loss(policy, ref, desirable.float(), 0.0)
    with pytest.raises(ValueError, match="desirable must have the same shape"):
        kto_loss(policy, ref, desirable[:-1], 0.0)
    with pytest.raises(ValueError, match="kl must be a scalar"):
        kto_loss(policy, ref, desirable, torch.zeros(2))
    with pytest.raises(ValueError, match="kl contains"):
        kto_loss(policy, ref, desirable, torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="ref_logps contains"):
        kto_loss(policy, torch.full_like(ref, float("inf")), desirable, 0.0)
    with pytest.raises(ValueError, match="policy_logps is empty"):
        kto_loss(policy[:0], ref[:0], desirable[:0], 0.0)
    with pytest.raises(ValueError, match="undesirable_weight must be in"):
        kto_loss(policy, ref, desirable, 0.0, undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="ref_kl_logps must have the same shape"):
        kto_kl(policy, ref[:-1])


# ---------------------------------------------------------------------------------------
# ORPO (Hong et al. 2024, eq. 6-7) and SimPO (Meng et al. 2024, eq. 6)


def ref_orpo(chosen, rejected, nll, beta):
    p_w, p_l = torch.exp(chosen.double()), torch.exp(rejected.double())
    log_odds = torch.log(p_w / (1 - p_w)) - torch.log(p_l / (1 - p_l))
    return nll.double() - beta * F.logsigmoid(log_odds), log_odds


def test_orpo_matches_formula():
    chosen = -(0.05 + 3 * torch.rand(S))
    rejected = -(0.05 + 3 * torch.rand(S))
    chosen[0] = -1e-4  # near probability 1: the expm1 branch
    nll = 3 * torch.rand(S)
    leaves = [x.clone().requires_grad_(True) for x in (chosen, rejected, nll)]
    losses, log_odds = orpo_loss(*leaves, beta=0.25)
    refs = [x.double().requires_grad_(True) for x in (chosen, rejected, nll)]
    exp_losses, exp_log_odds = ref_orpo(*refs, 0.25)
    assert losses.dtype == torch.float32 and not log_odds.requires_grad
    assert_rel_close(losses, exp_losses, FWD_TOL, "orpo losses")
    assert_rel_close(log_odds, exp_log_odds, FWD_TOL, "orpo log_odds")
    losses.sum().backward()
    exp_losses.sum().backward()
    for a, e in zip(leaves, refs):
        assert_rel_close(a.grad, e.grad, GRAD_TOL, "orpo grad")


def test_orpo_gradcheck_and_errors():
    chosen = -(0.1 + torch.rand(5, dtype=torch.float64))
    rejected = -(0.1 + torch.rand(5, dtype=torch.float64))
    nll = torch.rand(5, dtype=torch.float64)
    fn = lambda c, r, n: orpo_loss(c, r, n, beta=0.3, backend="torch")[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, [x.requires_grad_(True) for x in (chosen, rejected, nll)])
    with pytest.raises(ValueError, match="rejected_logps must be < 0"):
        orpo_loss(chosen.detach(), torch.zeros(5, dtype=torch.float64), nll.detach())
    with pytest.raises(ValueError, match="chosen_nll must have the same shape"):
        orpo_loss(chosen.detach(), rejected.detach(), nll.detach()[:1])


def ref_simpo(chosen, rejected, lc, lr, beta, gamma, eps=0.0):
    avg_w = chosen.double() / lc.double().clamp(min=1)
    avg_l = rejected.double() / lr.double().clamp(min=1)
    u = beta * avg_w - beta * avg_l - gamma
    return -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u), beta * avg_w, beta * avg_l


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_matches_formula(eps):
    chosen, _ = _logps()
    rejected, _ = _logps()
    lc, lr = torch.randint(1, 60, (S,)), torch.randint(0, 60, (S,))
    leaves = [x.clone().requires_grad_(True) for x in (chosen, rejected)]
    out = simpo_loss(*leaves, lc, lr, beta=2.0, gamma=0.5, label_smoothing=eps)
    refs = [x.double().requires_grad_(True) for x in (chosen, rejected)]
    exp = ref_simpo(*refs, lc, lr, 2.0, 0.5, eps)
    for a, e in zip(out, exp):
        assert a.dtype == torch.float32
        assert_rel_close(a, e, FWD_TOL, "simpo")
    out[0].sum().backward()
    exp[0].sum().backward()
    for a, e in zip(leaves, refs):
        assert_rel_close(a.grad, e.grad, GRAD_TOL, "simpo grad")


def test_simpo_gradcheck_and_errors():
    chosen, rejected = _logps(5, dtype=torch.float64)
    lc, lr = torch.randint(1, 9, (5,)), torch.randint(1, 9, (5,))
    fn = lambda c, r: simpo_loss(c, r, lc, lr, backend="torch")[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, [chosen.requires_grad_(True), rejected.requires_grad_(True)])
    with pytest.raises(ValueError, match="rejected_lengths must have the same shape"):
        simpo_loss(chosen.detach(), rejected.detach(), lc, lr[:2])
    with pytest.raises(TypeError, match="chosen_lengths must be a torch.Tensor"):
        simpo_loss(chosen.detach(), rejected.detach(), [1, 2, 3, 4, 5], lr)


# ---------------------------------------------------------------------------------------
# The CUDA formulas, run on the host (they are __host__ __device__), against float64.

_HOST_HARNESS = r"""
#include "preference.cu"
#include <cstdio>
namespace alignfuse {
std::vector<CudaRegistrar::Fn>& CudaRegistrar::all() { static std::vector<Fn> v; return v; }
}
int main() {  // lines "0 formula beta eps tau c r delta" (DPO) or "1 x z0 desirable beta wd wu" (KTO)
  int kind;
  while (std::scanf("%d", &kind) == 1) {
    if (kind == 0) {
      int formula;
      float beta, eps, tau, c, r, delta;
      if (std::scanf("%d %f %f %f %f %f %f", &formula, &beta, &eps, &tau, &c, &r, &delta) != 7) return 1;
      const float e = eps > 0.f ? eps : 1e-3f;
      alignfuse::DPOParams p{beta, eps, tau, logf(e), log1pf(-e), formula, false};
      alignfuse::LossAndGrad o = alignfuse::dpo_formula(c, r, delta, p);
      std::printf("%.9g %.9g %.9g\n", o.loss, o.dc, o.dr);
    } else {
      int desirable;
      float x, z0, beta, wd, wu;
      if (std::scanf("%f %f %d %f %f %f", &x, &z0, &desirable, &beta, &wd, &wu) != 6) return 1;
      alignfuse::KTOLossAndGrad o = alignfuse::kto_formula(x, z0, desirable != 0, beta, wd, wu);
      std::printf("%.9g %.9g 0\n", o.loss, o.grad);
    }
  }
  return 0;
}
"""


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_formulas_match_formula_on_host(tmp_path):
    """csrc/cuda/preference.cu's dpo_formula (loss, d/dc, d/dr) for every formula, compiled
    for the host with nvcc, against the float64 references above. No GPU needed."""
    from alignfuse.kernels.preference.dpo import FORMULAS

    run = build_host_harness(tmp_path, _HOST_HARNESS)

    n, delta = 23, 0.3
    cases, lines = [], []
    for code, name in enumerate(FORMULAS):
        for beta in (0.1, 1.0):
            eps = 0.15 if name in ("sigmoid", "robust", "exo_pair") else 0.0
            c = torch.cat([torch.tensor([80.0, -80.0]), 4 * torch.randn(n - 2)])
            r = torch.cat([torch.tensor([-80.0, 80.0]), 4 * torch.randn(n - 2)])
            cases.append((name, beta, eps, c, r))
            lines += [f"0 {code} {beta} {eps} 0.05 {ci:.9g} {ri:.9g} {delta}"
                      for ci, ri in zip(c.tolist(), r.tolist())]
    x = torch.cat([torch.tensor([80.0, -80.0, 80.0, -80.0]), 4 * torch.randn(n - 4)])
    desirable = torch.arange(n) % 2 == 0
    lines += [f"1 {xi:.9g} 0.4 {int(d)} 0.7 1.3 0.6" for xi, d in zip(x.tolist(), desirable.tolist())]
    got = run(lines).reshape(len(cases) + 1, n, 3)
    x64 = x.double().requires_grad_(True)
    kto, _ = ref_kto(x64, torch.zeros(n, dtype=torch.float64), desirable, 0.4, 0.7, 1.3, 0.6)
    kto.sum().backward()
    assert_rel_close(got[-1, :, 0], kto, 1e-5, "cuda kto loss")
    assert_rel_close(got[-1, :, 1], x64.grad, 1e-4, "cuda kto d/dx")
    for (name, beta, eps, c, r), out in zip(cases, got[:-1]):
        pc = c.double().requires_grad_(True)
        pr = r.double().requires_grad_(True)
        zero = torch.zeros(n, dtype=torch.float64)
        ones = torch.ones(n, dtype=torch.float64)
        loss = ref_dpo(pc, pr, zero, zero, name, beta, eps, ones, ones, delta=delta)[0]
        if name == "discopop":  # the stable form of exp(-z) * m (see the +-80 test)
            z = beta * (pc - pr)
            m = torch.sigmoid(z / 0.05)
            loss = -F.logsigmoid(z) * (1 - m) + torch.exp(-z + F.logsigmoid(z / 0.05))
        loss.sum().backward()
        assert_rel_close(out[:, 0], loss, 1e-5, f"cuda {name} loss")
        assert_rel_close(out[:, 1], pc.grad, 1e-4, f"cuda {name} d/dc")
        assert_rel_close(out[:, 2], pr.grad, 1e-4, f"cuda {name} d/dr")


# ---------------------------------------------------------------------------------------
# The cuda backend (kernels/preference/cuda.py, csrc/cuda/preference.cu emulated on CPU) on
# the formulas with extra inputs (lengths, the bco delta), bf16, and mixed input dtypes.


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.1), ("exo_pair", 0.0), ("ipo", 0.0),
                                           ("bco_pair", 0.0), ("aot", 0.0),
                                           ("sigmoid_norm", 0.0)])
@pytest.mark.cpu_only  # the CUDA emulation (CPU tensors)
def test_cuda_binding_passes_the_right_buffers(loss_type, eps, emulated_cuda):
    _check_dpo(loss_type, eps, "cuda")
    _check_dpo(loss_type, eps, "cuda", dtype=torch.bfloat16, grad_tol=1e-2)


@pytest.mark.cpu_only  # the CUDA emulation (CPU tensors)
def test_cuda_binding_kto_and_mixed_dtypes(emulated_cuda):
    _check_kto("cuda")
    _check_kto("cuda", dtype=torch.bfloat16, grad_tol=1e-2)
    test_dpo_mixed_input_dtypes("cuda", "cpu")
