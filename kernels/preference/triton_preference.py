"""Triton kernels: DPO-family and KTO losses with their local gradients, in one launch.

One program handles BLOCK rows. Each row's loss and d loss / d input are written together,
so backward (`kernels.autograd.fused_local_grad`) is one multiply by the upstream gradient
and launches no kernel. A `tl.constexpr` FORMULA code (the order of `dpo.FORMULAS`) picks
the formula at compile time: one kernel, not eleven copies.

Numerics: everything in fp32 after the load. log sigmoid is -softplus(-x) with
softplus(x) = max(x, 0) + log1p(exp(-|x|)), so log-ratios of +-80 (or far more) neither
overflow nor lose the small tail; sigmoid is built from exp(-|x|) as well, and
sigmoid(x) * (1 - sigmoid(x)) is computed as sigmoid(x) * sigmoid(-x) to keep the tail.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..autograd import fused_local_grad
from ..policy.kl import compute_dtype
from .dpo import FORMULAS, DPOProblem
from .kto import KTOProblem

_BLOCK = 512

(_SIGMOID, _HINGE, _IPO, _EXO_PAIR, _NCA_PAIR, _ROBUST, _BCO_PAIR, _SPPO_HARD, _APO_ZERO,
 _APO_DOWN, _DISCOPOP) = range(len(FORMULAS))
assert FORMULAS[_DISCOPOP] == "discopop" and FORMULAS[_BCO_PAIR] == "bco_pair"


@triton.jit
def _softplus(x):
    t = tl.exp(-tl.abs(x))
    u = 1.0 + t
    # log1p(t) by Kahan's trick: log(u) * t / (u - 1) stays accurate when t is below fp32
    # epsilon (where log(1 + t) would round to 0 and lose the loss tail of confident pairs).
    safe = tl.where(u == 1.0, 1.0, u - 1.0)
    log1p_t = tl.where(u == 1.0, t, tl.log(u) * (t / safe))
    return tl.maximum(x, 0.0) + log1p_t


@triton.jit
def _logsigmoid(x):
    return -_softplus(-x)


@triton.jit
def _sigmoid(x):
    # from exp(-|x|) in (0, 1]: never overflows, and the small tail is exact
    t = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, t) / (1.0 + t)


@triton.jit
def _dpo_kernel(pc_ptr, pr_ptr, rc_ptr, rr_ptr, len_c_ptr, len_r_ptr, delta_ptr,
                loss_ptr, g_pc_ptr, g_pr_ptr, g_rc_ptr, g_rr_ptr, rew_c_ptr, rew_r_ptr,
                S, beta, eps, tau, exo_log_eps, exo_log1m_eps,
                FORMULA: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < S
    chosen = (tl.load(pc_ptr + offs, mask=valid, other=0.0).to(tl.float32)
              - tl.load(rc_ptr + offs, mask=valid, other=0.0).to(tl.float32))
    rejected = (tl.load(pr_ptr + offs, mask=valid, other=0.0).to(tl.float32)
                - tl.load(rr_ptr + offs, mask=valid, other=0.0).to(tl.float32))
    if NORMALIZE:
        len_c = tl.load(len_c_ptr + offs, mask=valid, other=1.0).to(tl.float32)
        len_r = tl.load(len_r_ptr + offs, mask=valid, other=1.0).to(tl.float32)
        c = chosen / len_c
        r = rejected / len_r
    else:
        c = chosen
        r = rejected
    z = beta * (c - r)

    # loss and its derivatives dc = d loss / d c, dr = d loss / d r
    if FORMULA == 0:  # sigmoid (conservative DPO with eps)
        dz = -(1.0 - eps) * _sigmoid(-z) + eps * _sigmoid(z)
        loss = -(1.0 - eps) * _logsigmoid(z) - eps * _logsigmoid(-z)
        dc = beta * dz
        dr = -dc
    elif FORMULA == 1:  # hinge; relu'(0) = 0 as in torch
        loss = tl.maximum(1.0 - z, 0.0)
        dc = tl.where(1.0 - z > 0.0, -beta, 0.0)
        dr = -dc
    elif FORMULA == 2:  # ipo
        t = (c - r) - 0.5 / beta
        loss = t * t
        dc = 2.0 * t
        dr = -dc
    elif FORMULA == 3:  # exo_pair: d/dz = p q (z - log(1-eps) + log eps), since ls(z)-ls(-z)=z
        p = _sigmoid(z)
        q = _sigmoid(-z)
        loss = p * (_logsigmoid(z) - exo_log1m_eps) + q * (_logsigmoid(-z) - exo_log_eps)
        dc = beta * p * q * (z - exo_log1m_eps + exo_log_eps)
        dr = -dc
    elif FORMULA == 4:  # nca_pair
        a = beta * c
        b = beta * r
        loss = -_logsigmoid(a) - 0.5 * _logsigmoid(-a) - 0.5 * _logsigmoid(-b)
        dc = beta * (-_sigmoid(-a) + 0.5 * _sigmoid(a))
        dr = beta * 0.5 * _sigmoid(b)
    elif FORMULA == 5:  # robust
        inv = 1.0 / (1.0 - 2.0 * eps)
        loss = (-(1.0 - eps) * _logsigmoid(z) + eps * _logsigmoid(-z)) * inv
        dc = beta * (-(1.0 - eps) * _sigmoid(-z) - eps * _sigmoid(z)) * inv
        dr = -dc
    elif FORMULA == 6:  # bco_pair, delta is a constant
        delta = tl.load(delta_ptr).to(tl.float32)
        a = beta * c - delta
        b = beta * r - delta
        loss = -_logsigmoid(a) - _logsigmoid(-b)
        dc = -beta * _sigmoid(-a)
        dr = beta * _sigmoid(b)
    elif FORMULA == 7:  # sppo_hard
        tc = c - 0.5 / beta
        tr = r + 0.5 / beta
        loss = tc * tc + tr * tr
        dc = 2.0 * tc
        dr = 2.0 * tr
    elif FORMULA == 8:  # apo_zero
        sc = _sigmoid(beta * c)
        sr = _sigmoid(beta * r)
        loss = 1.0 - sc + sr
        dc = -beta * sc * _sigmoid(-beta * c)
        dr = beta * sr * _sigmoid(-beta * r)
    elif FORMULA == 9:  # apo_down
        sc = _sigmoid(beta * c)
        sz = _sigmoid(z)
        loss = sc + 1.0 - sz
        dz = -sz * _sigmoid(-z)
        dc = beta * sc * _sigmoid(-beta * c) + beta * dz
        dr = -beta * dz
    else:  # discopop: -ls(z)(1-m) + exp(-z) m, m = s(z/tau); exp(-z) m = exp(-z + ls(z/tau))
        m = _sigmoid(z / tau)
        one_m = _sigmoid(-z / tau)
        lsz = _logsigmoid(z)
        e = tl.exp(-z + _logsigmoid(z / tau))
        loss = -lsz * one_m + e
        dz = -_sigmoid(-z) * one_m - e + (e * one_m + lsz * m * one_m) / tau
        dc = beta * dz
        dr = -dc

    if NORMALIZE:  # chain rule through c = chosen / len
        dc = dc / len_c
        dr = dr / len_r
    tl.store(loss_ptr + offs, loss, mask=valid)
    tl.store(g_pc_ptr + offs, dc, mask=valid)
    tl.store(g_rc_ptr + offs, -dc, mask=valid)
    tl.store(g_pr_ptr + offs, dr, mask=valid)
    tl.store(g_rr_ptr + offs, -dr, mask=valid)
    tl.store(rew_c_ptr + offs, beta * chosen, mask=valid)  # rewards: summed ratios, as TRL
    tl.store(rew_r_ptr + offs, beta * rejected, mask=valid)


def dpo_loss_triton(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
                    rejected_lengths, delta, problem: DPOProblem):
    """The "triton" backend of `dpo_loss` (interface of `dpo._dpo_torch`)."""

    def kernel(pc, pr, rc, rr):
        S = pc.numel()
        pc, pr, rc, rr = (x.contiguous() for x in (pc, pr, rc, rr))
        # separate buffers, not views of one: autograd saves the grads and returns the rest
        loss, g_pc, g_pr, g_rc, g_rr, rew_c, rew_r = (
            torch.empty(S, device=pc.device, dtype=torch.float32) for _ in range(7))
        len_c = chosen_lengths.contiguous() if problem.normalize else pc  # unread if not
        len_r = rejected_lengths.contiguous() if problem.normalize else pc
        delta_arg = delta if delta is not None else pc
        eps = problem.label_smoothing or 1e-3  # exo_pair's TRL default when eps = 0
        _dpo_kernel[(triton.cdiv(S, _BLOCK),)](
            pc, pr, rc, rr, len_c, len_r, delta_arg,
            loss, g_pc, g_pr, g_rc, g_rr, rew_c, rew_r,
            S, problem.beta, problem.label_smoothing, problem.discopop_tau,
            math.log(eps), math.log1p(-eps),
            FORMULA=problem.code, NORMALIZE=problem.normalize, BLOCK=_BLOCK)
        dtype = compute_dtype(pc, pr, rc, rr)  # the torch reference's: float64 stays float64
        return loss.to(dtype), [g_pc, g_pr, g_rc, g_rr], rew_c.to(dtype), rew_r.to(dtype)

    return fused_local_grad(kernel, (policy_chosen, policy_rejected, ref_chosen, ref_rejected),
                            extra_outputs=2)


@triton.jit
def _kto_kernel(policy_ptr, ref_ptr, desirable_ptr, kl_ptr, loss_ptr, g_policy_ptr, g_ref_ptr,
                reward_ptr, S, beta, desirable_weight, undesirable_weight, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < S
    x = (tl.load(policy_ptr + offs, mask=valid, other=0.0).to(tl.float32)
         - tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32))
    desirable = tl.load(desirable_ptr + offs, mask=valid, other=0) != 0
    z0 = tl.load(kl_ptr).to(tl.float32)
    a = beta * (x - z0)
    # 1 - sigmoid(a) is sigmoid(-a), and 1 - sigmoid(-a) is sigmoid(a): no cancellation.
    s_pos = _sigmoid(a)
    s_neg = _sigmoid(-a)
    loss = tl.where(desirable, desirable_weight * s_neg, undesirable_weight * s_pos)
    weight = tl.where(desirable, -desirable_weight, undesirable_weight)
    grad = weight * beta * s_pos * s_neg
    tl.store(loss_ptr + offs, loss, mask=valid)
    tl.store(g_policy_ptr + offs, grad, mask=valid)
    tl.store(g_ref_ptr + offs, -grad, mask=valid)
    tl.store(reward_ptr + offs, beta * x, mask=valid)


def kto_loss_triton(policy_logps, ref_logps, desirable, kl, problem: KTOProblem):
    """The "triton" backend of `kto_loss` (interface of `kto._kto_torch`)."""
    flags = desirable.contiguous().view(torch.uint8)

    def kernel(policy, ref):
        S = policy.numel()
        loss, g_policy, g_ref, reward = (
            torch.empty(S, device=policy.device, dtype=torch.float32) for _ in range(4))
        _kto_kernel[(triton.cdiv(S, _BLOCK),)](
            policy.contiguous(), ref.contiguous(), flags, kl, loss, g_policy, g_ref, reward,
            S, problem.beta, problem.desirable_weight, problem.undesirable_weight,
            BLOCK=_BLOCK)
        dtype = compute_dtype(policy, ref)  # the torch reference's: float64 stays float64
        return loss.to(dtype), [g_policy, g_ref], reward.to(dtype)

    return fused_local_grad(kernel, (policy_logps, ref_logps), extra_outputs=1)
