"""policy_loss, value_loss and kl_penalty against float64 evaluations of the papers' formulas.

The references below are written independently of alignfuse, verl-style on padded [B, T]
matrices, and differentiated by autograd in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignfuse.kernels.policy import kl_penalty, policy_loss, value_loss
from helpers import assert_rel_close, build_host_harness, fresh_seed

AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


# ---------------------------------------------------------------------------------------
# independent float64 references (padded [B, T])


def ref_kl(lp, ref, estimator):
    d = lp - ref
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "abs":
        return d.abs()
    x = (-d).clamp(-20, 20)  # verl's low_var_kl
    return (x.exp() - x - 1).clamp(-10, 10)


def ref_aggregate(loss, mask, mode, horizon):
    m = mask.double()
    seq_sum = (loss * m).sum(-1)
    n = m.sum(-1)
    keep = n > 0
    if mode == "token-mean":
        return seq_sum.sum() / n.sum()
    if mode == "seq-mean-token-mean":
        return (seq_sum[keep] / n[keep]).mean()
    if mode == "seq-mean-token-sum":
        return seq_sum[keep].mean()
    return seq_sum[keep].sum() / (keep.sum() * horizon)


def ref_policy_loss(lp, old, adv, mask, ref=None, *, clip_low=0.2, clip_high=0.2, dual_clip=None,
                    kl_coef=0.0, kl_estimator="k3", level="token", agg="token-mean", horizon=None):
    """PPO-clip (+ dual clip, + KL) or GSPO on padded float64 tensors. Returns (loss, metrics)."""
    horizon = max(int(mask.sum(-1).max()), 1) if horizon is None else horizon
    m = mask.bool()
    adv = adv if adv.dim() == 2 else adv[:, None].expand_as(lp)
    neg_kl = lp - old
    if level == "sequence":
        n = m.sum(-1).clamp(min=1)
        seq = (neg_kl.detach() * m).sum(-1) / n
        log_ratio = (lp - lp.detach() + seq[:, None]).clamp(max=10.0)
    else:
        log_ratio = neg_kl.clamp(-20, 20)
    ratio = log_ratio.exp()
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.maximum(l1, l2)
    dual = torch.zeros_like(m)
    if dual_clip is not None:
        l3 = -adv * dual_clip
        dual = (adv < 0) & (pg > l3)
        pg = torch.where(adv < 0, torch.minimum(pg, l3), pg)
    total = pg
    kl = None
    if ref is not None:
        kl = ref_kl(lp, ref, kl_estimator)
        total = pg + kl_coef * kl
    loss = ref_aggregate(total, m, agg, horizon)
    cnt = m.sum().clamp(min=1)
    with torch.no_grad():
        metrics = {
            "clipfrac": ((l2 > l1) & m).sum() / cnt,
            "dual_clipfrac": (dual & m).sum() / cnt,
            "approx_kl": (-neg_kl * m).sum() / cnt,
            "ratio_mean": (ratio * m).sum() / cnt,
            "ratio_max": ratio[m].max() if m.any() else torch.zeros((), dtype=torch.float64),
            "pg_loss": ref_aggregate(pg, m, agg, horizon),
            # the size of the summed terms: a loss near 0 by cancellation is compared on it
            "_scale": ref_aggregate(total.abs(), m, agg, horizon),
        }
        if kl is not None:
            metrics["kl"] = (kl * m).sum() / cnt
    return loss, metrics


def make_batch(B=5, T=37, *, spread=0.5, seed=None, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed if seed is not None else fresh_seed())
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask &= torch.rand(B, T, generator=g) > 0.1  # holes inside responses (observations)
    mask[:, 0] = True
    out = [x.to(device=device, dtype=dtype) for x in (lp, old, ref, adv)]
    return (*out, mask.to(device))


def check_against_reference(backend, lp, old, adv, mask, ref, tol=1e-5, grad_tol=None, **kw):
    names = {"clip_low", "clip_high", "dual_clip", "kl_coef", "kl_estimator", "horizon"}
    ref_kw = {k: v for k, v in kw.items() if k in names}
    ref_kw["level"] = kw.get("importance_level", "token")
    ref_kw["agg"] = kw.get("loss_agg", "token-mean")
    x = lp.detach().clone().requires_grad_()
    loss, metrics = policy_loss(x, old, adv, mask=mask, ref_logps=ref, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    x64 = lp.detach().double().clone().requires_grad_()
    exp_loss, exp_metrics = ref_policy_loss(x64, old.double(), adv.double(), mask,
                                            None if ref is None else ref.double(), **ref_kw)
    (exp_grad,) = torch.autograd.grad(exp_loss, x64)
    assert loss.dtype == (torch.float64 if lp.dtype == torch.float64 else torch.float32)
    scale = float(exp_metrics.pop("_scale"))
    assert abs(float(loss.detach()) - float(exp_loss.detach())) <= tol * max(scale, 1e-30), (
        f"loss {loss.item()} != {exp_loss.item()} (terms of size {scale})")
    assert grad.dtype == lp.dtype
    assert_rel_close(grad, exp_grad, grad_tol or tol, "grad")
    assert set(metrics) >= set(exp_metrics)
    for name, value in exp_metrics.items():
        assert not metrics[name].requires_grad
        assert abs(float(metrics[name]) - float(value)) <= tol * max(1.0, abs(float(value))), name
    return loss, grad, metrics


# ---------------------------------------------------------------------------------------
# policy_loss


@pytest.mark.parametrize("loss_agg", AGG_MODES)
@pytest.mark.parametrize("importance_level", ["token", "sequence"])
def test_policy_loss_matches_formula(backend, device, loss_agg, importance_level):
    lp, old, ref, adv, mask = make_batch(device=device)
    # Two tokens every draw counts (position 0 is never masked) pinned into the clips, so
    # neither check below depends on the draw (it failed 19 of 20,000 draws without them):
    # ratio e > dual_clip with a negative advantage, ratio e > 1 + clip_high with a positive.
    old[:2, 0] = lp[:2, 0] - 1
    adv[0, 0], adv[1, 0] = -1.0, 1.0
    _, _, metrics = check_against_reference(
        backend, lp, old, adv, mask, ref, clip_low=0.2, clip_high=0.28, dual_clip=1.5,
        kl_coef=0.05, kl_estimator="k3", importance_level=importance_level, loss_agg=loss_agg)
    if importance_level == "token":  # the test must exercise the clips it claims to check
        assert float(metrics["clipfrac"]) > 0 and float(metrics["dual_clipfrac"]) > 0


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3", "abs"])
def test_policy_loss_kl_estimators(backend, device, kl_estimator):
    lp, old, ref, adv, mask = make_batch(B=3, T=29, device=device)
    check_against_reference(backend, lp, old, adv, mask, ref, kl_coef=0.3,
                            kl_estimator=kl_estimator)


def test_policy_loss_without_ref_or_dual_clip(backend, device):
    lp, old, _, adv, mask = make_batch(B=4, T=19, device=device)
    _, _, metrics = check_against_reference(backend, lp, old, adv, mask, None, clip_high=0.3)
    assert "kl" not in metrics and float(metrics["dual_clipfrac"]) == 0


def test_policy_loss_per_sequence_advantages(backend, device):
    lp, old, ref, _, mask = make_batch(B=4, T=23, device=device)
    seq_adv = torch.randn(4, dtype=torch.float64, device=device)
    full = seq_adv[:, None].expand(4, 23).contiguous()
    for level in ("token", "sequence"):
        kw = dict(mask=mask, ref_logps=ref, kl_coef=0.1, importance_level=level, backend=backend)
        a = lp.clone().requires_grad_()
        b = lp.clone().requires_grad_()
        la, _ = policy_loss(a, old, seq_adv, **kw)
        lb, _ = policy_loss(b, old, full, **kw)
        la.backward()
        lb.backward()
        assert_rel_close(la, lb, 1e-6, "loss")
        assert_rel_close(a.grad, b.grad, 1e-6, "grad")
    check_against_reference(backend, lp, old, seq_adv, mask, ref, importance_level="sequence")


def pack(padded_list, mask):
    """Padded [B, T] tensors -> packed [N] over each row's prefix up to its last valid token,
    keeping interior holes as a packed mask."""
    lengths = [int(torch.nonzero(row).max()) + 1 if row.any() else 0 for row in mask]
    packed = [torch.cat([x[b, :n] for b, n in enumerate(lengths)]) for x in padded_list]
    packed_mask = torch.cat([mask[b, :n] for b, n in enumerate(lengths)])
    cu = torch.tensor([0] + lengths, device=mask.device).cumsum(0).to(torch.int32)
    return packed, packed_mask, cu, lengths


@pytest.mark.parametrize("loss_agg", AGG_MODES)
def test_policy_loss_padded_and_packed_agree(backend, device, loss_agg):
    lp, old, ref, adv, mask = make_batch(B=4, T=31, device=device)
    mask[2] = False  # an all-masked sequence: left out of both
    (p_lp, p_old, p_ref, p_adv), p_mask, cu, lengths = pack([lp, old, ref, adv], mask)
    for level in ("token", "sequence"):
        kw = dict(ref_logps=None, dual_clip=2.0, loss_agg=loss_agg, importance_level=level,
                  horizon=31, backend=backend)
        a = lp.clone().requires_grad_()
        la, ma = policy_loss(a, old, adv, mask=mask, **{**kw, "ref_logps": ref}, kl_coef=0.1)
        b = p_lp.clone().requires_grad_()
        lb, mb = policy_loss(b, p_old, p_adv, mask=p_mask, cu_seqlens=cu,
                             **{**kw, "ref_logps": p_ref}, kl_coef=0.1)
        (ga,) = torch.autograd.grad(la, a)
        (gb,) = torch.autograd.grad(lb, b)
        assert_rel_close(lb, la, 1e-6, f"{level} loss")
        assert_rel_close(gb, pack([ga], mask)[0][0], 1e-6, f"{level} grad")
        for name in ma:
            assert abs(float(ma[name]) - float(mb[name])) < 1e-6, name


def test_policy_loss_default_horizon_is_the_most_valid_tokens_in_both_layouts(backend, device):
    lp, old, _, adv, _ = make_batch(B=1, T=11, device=device)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32, device=device)
    flat = [x.reshape(-1) for x in (lp, old, adv)]
    a, _ = policy_loss(*flat, cu_seqlens=cu, loss_agg="seq-mean-token-sum-norm", backend=backend)
    b, _ = policy_loss(*flat, cu_seqlens=cu, loss_agg="seq-mean-token-sum-norm", horizon=7,
                       backend=backend)
    assert_rel_close(a, b, 1e-7, "default horizon = longest sequence (7)")
    # Padded rows wider than any sequence, and a packed batch whose rows hold masked
    # (prompt) tokens: the default horizon counts valid tokens, so the layouts agree.
    lp, old, ref, adv, mask = make_batch(B=4, T=31, device=device)
    mask[:, 25:] = False
    mask[1, :3] = False
    (p_lp, p_old, p_adv), p_mask, cu, _ = pack([lp, old, adv], mask)
    la, _ = policy_loss(lp, old, adv, mask=mask, loss_agg="seq-mean-token-sum-norm",
                        backend=backend)
    lb, _ = policy_loss(p_lp, p_old, p_adv, mask=p_mask, cu_seqlens=cu,
                        loss_agg="seq-mean-token-sum-norm", backend=backend)
    lc, _ = policy_loss(lp, old, adv, mask=mask, loss_agg="seq-mean-token-sum-norm",
                        horizon=float(mask.sum(-1).max()), backend=backend)
    assert_rel_close(lb, la, 1e-6, "padded vs packed, default horizon")
    assert_rel_close(la, lc, 1e-7, "default horizon = the most valid tokens")


def test_policy_loss_gradcheck_torch_reference():
    lp, old, ref, adv, mask = make_batch(B=3, T=6, spread=0.3)
    for agg in AGG_MODES:
        def f(x):
            return policy_loss(x, old, adv, mask=mask, ref_logps=ref, kl_coef=0.2,
                               dual_clip=1.5, loss_agg=agg, backend="torch")[0]
        assert torch.autograd.gradcheck(f, (lp.clone().requires_grad_(),))
    # GSPO's stop-gradient surrogate is not the derivative of its loss value in general, but
    # with one advantage per sequence, seq-mean-token-mean and no active clip it is exactly
    # the gradient of mean_s(-A_s s_s), s_s = exp(mean_t log-ratio): gradcheck that.
    seq_adv = torch.randn(3, dtype=torch.float64)

    def gspo(x):
        return policy_loss(x, old, seq_adv, mask=mask, clip_low=0.99, clip_high=1e3,
                           importance_level="sequence", loss_agg="seq-mean-token-mean",
                           backend="torch")[0]

    def true_objective(x):
        m = mask.double()
        s = (((x - old) * m).sum(-1) / m.sum(-1)).exp()
        return (-seq_adv * s).mean()

    x = lp.clone().requires_grad_()
    assert_rel_close(torch.autograd.grad(gspo(x), x)[0],
                     torch.autograd.grad(true_objective(x), x)[0], 1e-10, "GSPO gradient")
    assert torch.autograd.gradcheck(gspo, (lp.clone().requires_grad_(),))
    cu = torch.tensor([0, 2, 2, 9], dtype=torch.int32)
    x = torch.randn(9, dtype=torch.float64, requires_grad=True)
    packed_old, packed_adv = x.detach() + 0.3 * torch.randn(9, dtype=torch.float64), torch.randn(3)
    assert torch.autograd.gradcheck(
        lambda x: policy_loss(x, packed_old, packed_adv, cu_seqlens=cu,
                              loss_agg="seq-mean-token-mean", backend="torch")[0], (x,))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_loss_extreme_log_ratios_stay_finite(backend, device, level):
    lp, old, ref, adv, mask = make_batch(B=4, T=17, dtype=torch.float32, device=device)
    old = lp + 80 * torch.sign(torch.randn_like(lp))  # log-ratios of +-80
    ref = lp - 80 * torch.sign(torch.randn_like(lp))
    for estimator in ("k1", "k2", "k3", "abs"):
        x = lp.clone().requires_grad_()
        loss, metrics = policy_loss(x, old, adv, mask=mask, ref_logps=ref, kl_coef=0.1,
                                    kl_estimator=estimator, importance_level=level,
                                    backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        assert all(torch.isfinite(v) for v in metrics.values())
    check_against_reference(backend, lp, old, adv, mask, ref, tol=1e-5, dual_clip=3.0,
                            kl_coef=0.1, importance_level=level)


def test_policy_loss_all_masked_and_one_token_sequences(backend, device):
    lp, old, ref, adv, mask = make_batch(B=4, T=9, device=device)
    mask[1] = False
    mask[3] = False
    mask[3, 4] = True  # a one-token sequence
    for agg in AGG_MODES:
        check_against_reference(backend, lp, old, adv, mask, ref, kl_coef=0.1, loss_agg=agg)
    # one-token packed sequences
    cu = torch.arange(6, dtype=torch.int32, device=device)
    flat = [torch.randn(5, dtype=torch.float64, device=device) for _ in range(3)]
    # positive advantages: every token's loss is negative, so their mean cannot cancel to a
    # small number whose fp32 relative error is large (a CI draw: 1.4e-6 on a mean of 0.036)
    flat[2] = flat[2].abs() + 0.1
    loss, _ = policy_loss(*flat, cu_seqlens=cu, loss_agg="seq-mean-token-mean", backend=backend)
    exp, _ = ref_policy_loss(flat[0][:, None], flat[1][:, None], flat[2][:, None],
                             torch.ones(5, 1, dtype=torch.bool, device=device),
                             agg="seq-mean-token-mean")
    assert_rel_close(loss, exp, 1e-6, "one-token sequences")
    # nothing valid at all: a zero loss with zero gradients, not NaN
    x = lp.clone().requires_grad_()
    loss, metrics = policy_loss(x, old, adv, mask=torch.zeros_like(mask), backend=backend)
    loss.backward()
    assert loss.item() == 0 and float(x.grad.abs().sum()) == 0
    assert all(float(v) == 0 for v in metrics.values())


def test_policy_loss_masked_padding_may_hold_garbage(backend, device):
    lp, old, ref, adv, mask = make_batch(B=3, T=8, device=device)
    mask[0, 5:] = False
    for t in (lp, old, ref, adv):
        t[0, 5:] = float("nan")
    x = lp.clone().requires_grad_()
    loss, metrics = policy_loss(x, old, adv, mask=mask, ref_logps=ref, kl_coef=0.1,
                                backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("bad,level", [("old_logps", "token"), ("ref_logps", "token"),
                                       ("old_logps", "sequence")])
def test_policy_loss_nan_in_a_valid_token_gives_nan_as_torch(backend, device, bad, level):
    # The torch reference's clamps (log-ratio to +-20 or 10, k3's two, the clip range) keep a
    # NaN: the loss and the metrics it reaches are NaN. A kernel clamp that turned the NaN into
    # its bound (tl.minimum/fminf drop NaN) gave a finite, wrong loss instead.
    lp, old, ref, adv, mask = make_batch(B=3, T=8, dtype=torch.float32, device=device)
    {"old_logps": old, "ref_logps": ref}[bad][1, 0] = float("nan")  # mask[:, 0] is True

    def run(name):
        x = lp.clone().requires_grad_()
        loss, metrics = policy_loss(x, old, adv, mask=mask, ref_logps=ref, kl_coef=0.1,
                                    kl_estimator="k3", dual_clip=3.0, importance_level=level,
                                    backend=name)
        return loss, torch.autograd.grad(loss, x)[0], metrics

    loss, grad, metrics = run(backend)
    exp_loss, exp_grad, exp_metrics = run("torch")
    assert torch.isnan(exp_loss) and torch.isnan(loss)
    for name, value in exp_metrics.items():
        assert bool(torch.isnan(metrics[name])) == bool(torch.isnan(value)), (name, metrics[name])
    assert torch.equal(torch.isnan(grad), torch.isnan(exp_grad))
    assert_rel_close(grad.nan_to_num(), exp_grad.nan_to_num(), 1e-5, "grad")


def test_policy_loss_clip_high_inf_is_no_upper_clip(backend, device):
    # clip_high is checked like clip_low and dual_clip (a non-negative number; NaN is refused,
    # see test_policy_loss_bad_input): +inf is a valid "no upper clip", as dual_clip=inf
    lp, old, ref, adv, mask = make_batch(B=3, T=21, device=device)
    check_against_reference(backend, lp, old, adv, mask, ref, clip_high=float("inf"),
                            dual_clip=3.0, kl_coef=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_policy_loss_low_precision_inputs_give_float32(backend, device, dtype):
    lp, old, ref, adv, mask = make_batch(B=3, T=21, dtype=dtype, device=device)
    # the loss is float32 from the given (rounded) inputs; the gradient has the input's dtype
    grad_tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    loss, _, _ = check_against_reference(backend, lp, old, adv, mask, ref, tol=1e-5,
                                         grad_tol=grad_tol, kl_coef=0.1, dual_clip=2.0)
    assert loss.dtype == torch.float32


def test_policy_loss_bad_input():
    lp, old, ref, adv, mask = make_batch(B=2, T=5)
    with pytest.raises(ValueError, match="logps is empty"):
        policy_loss(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0))
    with pytest.raises(ValueError, match="old_logps must have the token shape"):
        policy_loss(lp, old[:, :4], adv, mask=mask)
    with pytest.raises(ValueError, match="advantages must be per token"):
        policy_loss(lp, old, adv[:, :3], mask=mask)
    with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logps"):
        policy_loss(lp, old, adv, mask=mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip must be None or a number > 1"):
        policy_loss(lp, old, adv, mask=mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        policy_loss(lp, old, adv, mask=mask, loss_agg="sum")
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        policy_loss(lp, old, adv, mask=mask, ref_logps=ref, kl_estimator="k4")
    with pytest.raises(ValueError, match="importance_level must be one of"):
        policy_loss(lp, old, adv, mask=mask, importance_level="segment")
    with pytest.raises(ValueError, match="clip_low must be in"):
        policy_loss(lp, old, adv, mask=mask, clip_low=1.0)
    with pytest.raises(ValueError, match="clip_high must be a non-negative number, got nan"):
        policy_loss(lp, old, adv, mask=mask, clip_high=float("nan"))
    for kl_coef in (float("nan"), float("inf"), -float("inf")):  # a NaN or inf loss otherwise
        with pytest.raises(ValueError, match="kl_coef must be a finite number"):
            policy_loss(lp, old, adv, mask=mask, ref_logps=ref, kl_coef=kl_coef)
    with pytest.raises(TypeError, match="kl_coef must be a number"):
        policy_loss(lp, old, adv, mask=mask, ref_logps=ref, kl_coef="0.1")
    with pytest.raises(ValueError, match="horizon must be a positive"):
        policy_loss(lp, old, adv, mask=mask, horizon=0)
    with pytest.raises(TypeError, match="advantages must have dtype"):
        policy_loss(lp, old, adv.long(), mask=mask)
    with pytest.raises(ValueError, match="cu_seqlens must end at the number of tokens"):
        policy_loss(lp[0], old[0], adv[0], cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))


# ---------------------------------------------------------------------------------------
# value_loss


def ref_value_loss(v, old, ret, mask, clip, agg, horizon):
    l1 = (v - ret) ** 2
    if clip is None:
        per, frac = l1, torch.zeros(())
    else:
        l2 = (torch.minimum(torch.maximum(v, old - clip), old + clip) - ret) ** 2
        per = torch.maximum(l1, l2)
        frac = ((l2 > l1) & mask).sum() / mask.sum()
    return 0.5 * ref_aggregate(per, mask, agg, horizon), frac


@pytest.mark.parametrize("loss_agg", AGG_MODES)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_matches_formula(backend, device, loss_agg, clip):
    g = torch.Generator().manual_seed(fresh_seed())
    B, T = 4, 33
    v = torch.randn(B, T, generator=g, dtype=torch.float64).to(device)
    old = v + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64).to(device)
    ret = torch.randn(B, T, generator=g, dtype=torch.float64).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(device)
    mask[1] = False
    x = v.clone().requires_grad_()
    loss, metrics = value_loss(x, old, ret, mask=mask, clip=clip, loss_agg=loss_agg,
                               backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    y = v.clone().requires_grad_()
    exp, frac = ref_value_loss(y, old, ret, mask, clip, loss_agg,
                               max(int(mask.sum(-1).max()), 1))  # the default horizon
    (exp_grad,) = torch.autograd.grad(exp, y)
    assert_rel_close(loss, exp, 1e-5, "value loss")
    assert_rel_close(grad, exp_grad, 1e-5, "value grad")
    assert abs(float(metrics["vf_clipfrac"]) - float(frac)) < 1e-6
    if clip is not None:
        assert float(frac) > 0
    # packed agrees with padded, default horizon included
    (pv, pold, pret), pmask, cu, _ = pack([v, old, ret], mask)
    px = pv.clone().requires_grad_()
    ploss, _ = value_loss(px, pold, pret, mask=pmask, cu_seqlens=cu, clip=clip, loss_agg=loss_agg,
                          backend=backend)
    (pgrad,) = torch.autograd.grad(ploss, px)
    assert_rel_close(ploss, loss, 1e-6, "packed value loss")
    assert_rel_close(pgrad, pack([grad], mask)[0][0], 1e-6, "packed value grad")


@pytest.mark.parametrize("bad", ["values", "old_values"])
def test_value_loss_nan_in_a_valid_token_gives_nan_as_torch(backend, device, bad):
    # the clip clamp and the max keep a NaN in the torch reference: a NaN loss, not the bound
    g = torch.Generator().manual_seed(fresh_seed())
    v, old, ret = (torch.randn(3, 9, generator=g).to(device) for _ in range(3))
    mask = torch.ones(3, 9, dtype=torch.bool, device=device)
    mask[2, 5:] = False
    {"values": v, "old_values": old}[bad][1, 4] = float("nan")

    def run(name):
        x = v.clone().requires_grad_()
        loss, metrics = value_loss(x, old, ret, mask=mask, clip=0.2, backend=name)
        return loss, torch.autograd.grad(loss, x)[0], metrics

    loss, grad, metrics = run(backend)
    exp_loss, exp_grad, exp_metrics = run("torch")
    assert torch.isnan(exp_loss) and torch.isnan(loss)
    for name, value in exp_metrics.items():
        assert bool(torch.isnan(metrics[name])) == bool(torch.isnan(value)), name
    assert torch.equal(torch.isnan(grad), torch.isnan(exp_grad))
    assert_rel_close(grad.nan_to_num(), exp_grad.nan_to_num(), 1e-5, "grad")


def test_value_loss_gradcheck_and_errors():
    v = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    old, ret = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.3
    assert torch.autograd.gradcheck(
        lambda x: value_loss(x, old, ret, mask=mask, clip=0.5, loss_agg="seq-mean-token-mean",
                             backend="torch")[0], (v,))
    with pytest.raises(ValueError, match="returns must have the token shape"):
        value_loss(v, old, ret[:, :3], mask=mask)
    with pytest.raises(ValueError, match="clip must be a non-negative"):
        value_loss(v, old, ret, mask=mask, clip=-1.0)
    with pytest.raises(ValueError, match="values is empty"):
        value_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0),
                   cu_seqlens=torch.tensor([0, 0], dtype=torch.int32))


# ---------------------------------------------------------------------------------------
# kl_penalty


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_kl_penalty_matches_formula(backend, device, estimator):
    lp = -torch.rand(7, 13, dtype=torch.float64, device=device) * 4
    ref = lp + torch.randn(7, 13, dtype=torch.float64, device=device)
    far = torch.tensor([80.0, -80.0, 25.0, -25.0], dtype=torch.float64, device=device)
    ref[0, :4] = lp[0, :4] + far
    x = lp.clone().requires_grad_()
    kl = kl_penalty(x, ref, estimator, backend=backend)
    w = torch.randn_like(lp)
    (grad,) = torch.autograd.grad((kl * w).sum(), x)
    y = lp.clone().requires_grad_()
    exp = ref_kl(y, ref, estimator)
    (exp_grad,) = torch.autograd.grad((exp * w).sum(), y)
    assert kl.shape == lp.shape and kl.dtype == torch.float64
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    assert_rel_close(kl, exp, 1e-6, "kl")
    assert_rel_close(grad, exp_grad, 1e-6, "kl grad")
    if estimator == "k3":
        assert float(kl.detach().min()) >= 0 and float(kl.detach().max()) <= 10


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_kl_penalty_nan_gives_nan(backend, device, estimator):
    # k3's clamps keep a NaN in torch (verl's low_var_kl): a NaN KL, not the clamp's bound 10
    lp = -torch.rand(2, 5, device=device) * 4
    ref = lp + torch.randn(2, 5, device=device)
    lp[0, 1] = float("nan")
    ref[1, 3] = float("nan")
    got = kl_penalty(lp, ref, estimator, backend=backend)
    exp = kl_penalty(lp, ref, estimator, backend="torch")
    torch.testing.assert_close(got, exp, equal_nan=True)
    assert int(got.isnan().sum()) == 2


def test_kl_penalty_k3_is_unbiased_for_true_kl():
    # sampling from pi, E[k3] = KL(pi || ref): check on a small categorical distribution
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, dtype=torch.float64), 0)
    samples = torch.multinomial(p, 200000, replacement=True)
    est = kl_penalty(p.log()[samples], q.log()[samples], "k3", backend="torch").mean()
    true = float((p * (p / q).log()).sum())
    assert math.isclose(float(est), true, rel_tol=0.02)


def test_kl_penalty_gradcheck_torch_reference():
    lp = torch.randn(11, dtype=torch.float64, requires_grad=True)
    ref = lp.detach() + torch.randn(11, dtype=torch.float64)
    for estimator in ("k1", "k2", "k3", "abs"):
        assert torch.autograd.gradcheck(lambda x: kl_penalty(x, ref, estimator, backend="torch"),
                                        (lp,))


def test_kl_penalty_errors():
    with pytest.raises(ValueError, match="estimator must be one of"):
        kl_penalty(torch.zeros(3), torch.zeros(3), "k5")
    with pytest.raises(ValueError, match="ref_logps must have the same shape"):
        kl_penalty(torch.zeros(3), torch.zeros(4))


# ---------------------------------------------------------------------------------------
# csrc/cuda/policy.cu's per-token math, compiled for the host by nvcc (its kl_token and
# policy_token_loss are __host__ __device__), against the float64 formulas. No GPU needed.

_HOST_HARNESS = r"""
#include "policy.cu"
#include <cstdio>
namespace alignfuse {
std::vector<CudaRegistrar::Fn>& CudaRegistrar::all() { static std::vector<Fn> v; return v; }
}
int main() {  // lines: log_ratio adv ref_log_ratio clip_low clip_high dual_clip kl_coef lo hi
              //        use_dual has_ref estimator
  float lr, adv, dref, cl, ch, dc, kc, lo, hi;
  int use_dual, has_ref, est;
  while (std::scanf("%f %f %f %f %f %f %f %f %f %d %d %d", &lr, &adv, &dref, &cl, &ch, &dc, &kc, &lo,
                    &hi, &use_dual, &has_ref, &est) == 12) {
    const alignfuse::PolicyParams p{cl, ch, dc, kc, lo, hi, use_dual, has_ref, est};
    const alignfuse::TokenLoss t = alignfuse::policy_token_loss(lr, adv, dref, p);
    std::printf("%.9g %.9g %.9g %.9g %.9g %d %d\n", t.loss, t.grad, t.pg, t.ratio, t.kl,
                int(t.clipped), int(t.dual_clipped));
  }
  return 0;
}
"""


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_token_math_matches_formula_on_host(tmp_path):
    run = build_host_harness(tmp_path, _HOST_HARNESS)
    n = 40
    lr = torch.cat([torch.tensor([80.0, -80.0, 25.0, -25.0, 0.0]), 0.6 * torch.randn(n - 5)])
    adv = torch.randn(n)
    dref = torch.cat([torch.tensor([-80.0, 80.0, 30.0, -30.0, 0.0]), torch.randn(n - 5)])
    for level in ("token", "sequence"):
        lo, hi = (-20.0, 20.0) if level == "token" else (-3.0e38, 10.0)
        for est_code, est in enumerate(("k1", "k2", "k3", "abs")):
            for dual in (None, 1.5):
                lines = [f"{a:.9g} {b:.9g} {c:.9g} 0.2 0.28 {dual or 0.0} 0.1 {lo} {hi} "
                         f"{int(dual is not None)} 1 {est_code}"
                         for a, b, c in zip(lr.tolist(), adv.tolist(), dref.tolist())]
                got = run(lines)
                # the formula on logp = 0: old = -log_ratio, ref = -ref_log_ratio
                logp = torch.zeros(n, dtype=torch.float64, requires_grad=True)
                x = logp + lr.double()
                x = x.clamp(-20, 20) if level == "token" else x.clamp(max=10.0)
                ratio = x.exp()
                a = adv.double()
                l1, l2 = -a * ratio, -a * ratio.clamp(0.8, 1.28)
                pg = torch.maximum(l1, l2)
                if dual is not None:
                    pg = torch.where(a < 0, torch.minimum(pg, -a * dual), pg)
                kl = ref_kl(logp, logp.detach() - dref.double(), est)
                loss = pg + 0.1 * kl
                (grad,) = torch.autograd.grad(loss.sum(), logp)
                what = f"{level} {est} dual={dual}"
                assert_rel_close(got[:, 0], loss, 1e-5, f"cuda loss {what}")
                assert_rel_close(got[:, 1], grad, 1e-5, f"cuda grad {what}")
                assert_rel_close(got[:, 2], pg, 1e-5, f"cuda pg {what}")
                assert_rel_close(got[:, 3], ratio, 1e-5, f"cuda ratio {what}")
                assert_rel_close(got[:, 4], kl, 1e-5, f"cuda kl {what}")
                assert torch.equal(got[:, 5].bool(), (l2 > l1).detach()), what


# ---------------------------------------------------------------------------------------
# The Python side of the cuda backends (kernels/policy/cuda.py): pointers, dtype codes and the
# argument order of csrc/cuda/policy.cu, with the kernels themselves emulated on CPU
# (tests/cuda_emu), on mixed cases the backend-parametrized tests do not draw.


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.cpu_only  # the CUDA emulation (CPU tensors)
def test_cuda_bindings_policy_ops(emulated_cuda, dtype):
    lp, old, ref, adv, mask = make_batch(B=4, T=19, dtype=dtype)
    seq_adv = torch.randn(4, dtype=dtype)
    cases = [dict(importance_level="token", dual_clip=1.5, loss_agg="seq-mean-token-mean",
                  clip_low=0.15, clip_high=0.3),
             dict(importance_level="sequence", loss_agg="token-mean", clip_low=0.1)]

    def policy_losses(backend: str) -> list[tuple]:
        """(loss, grad, metrics) of every case, with token and sequence advantages."""
        out = []
        for kw in cases:
            for a in (adv, seq_adv):
                x = lp.clone().requires_grad_()
                loss, metrics = policy_loss(x, old, a, mask=mask, ref_logps=ref, kl_coef=0.1,
                                            kl_estimator="k2", backend=backend, **kw)
                out.append((loss, torch.autograd.grad(loss, x)[0], metrics))
        return out

    expected = policy_losses("torch")
    v_exp = value_loss(lp, old, ref, mask=mask, clip=0.1, backend="torch")
    kl_exp = kl_penalty(lp, ref, "k3", backend="torch")

    got = policy_losses("cuda")
    grad_tol = 1e-5 if dtype == torch.float64 else 1e-2
    for (le, ge, me), (lg, gg, mg) in zip(expected, got):
        # The loss is a mean of terms of size ~|advantage| ~ 1 and random sign: it can cancel
        # to a small number that keeps the kernel's float32 absolute error (a draw reached
        # 1.07x a pure relative bound). Relative to 0.1 at least, as check_against_reference
        # is relative to the size of the terms.
        assert_rel_close(lg, le, 1e-5, "loss", floor=0.1)
        assert_rel_close(gg, ge, grad_tol, "grad")
        for name in me:
            assert abs(float(mg[name]) - float(me[name])) < 1e-5, name
    v_got = value_loss(lp, old, ref, mask=mask, clip=0.1, backend="cuda")
    assert_rel_close(v_got[0], v_exp[0], 1e-5, "value loss")
    assert abs(float(v_got[1]["vf_clipfrac"]) - float(v_exp[1]["vf_clipfrac"])) < 1e-6
    assert_rel_close(kl_penalty(lp, ref, "k3", backend="cuda"), kl_exp, 1e-5, "kl")
