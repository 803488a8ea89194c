"""linear_policy_loss against a float64 evaluation of log_softmax(hidden @ W.T + b) followed by
the policy-loss formulas (test_policy_loss.ref_policy_loss, written independently of
alignfuse), for every runnable backend: loss, every metric, gradients of hidden, weight, bias.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from alignfuse.kernels import linear_policy_loss
from alignfuse.kernels.logprobs import reference as logprobs_reference
from helpers import assert_rel_close, fresh_seed
from test_policy_loss import AGG_MODES, ref_aggregate, ref_policy_loss

B, T, H, V = 4, 11, 48, 1031          # padded [4, 11]; packed N = 11 + 10 + 5 + 11 = 37
IGNORE = -100


def make_batch(seed: int | None = None, *, dtype=torch.float32, device="cpu", lengths=None):
    """A padded batch with real sequence lengths, masked prompt tokens and ignored targets.

    Returns a dict with hidden [B, T, H] (leaf), weight [V, H], bias [V], targets [B, T],
    mask [B, T] (bool, the tokens that count), old/ref logps [B, T] near the policy's,
    per-token advantages [B, T] and per-sequence ones [B], in_seq [B, T] (inside the length).
    """
    g = torch.Generator().manual_seed(seed if seed is not None else fresh_seed())
    lengths = torch.tensor(lengths or [11, 10, 5, 11])
    in_seq = torch.arange(T)[None, :] < lengths[:, None]
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (3.0 / H ** 0.5)
    bias = torch.randn(V, generator=g) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 4] = IGNORE
    targets[3, 7] = IGNORE
    mask = in_seq.clone()
    mask[:, :2] = False                    # prompt tokens
    with torch.no_grad():
        logp = torch.log_softmax((hidden.double() @ weight.double().T + bias.double()) / 0.8, -1)
        logp = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    old = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    batch = dict(hidden=hidden, weight=weight, bias=bias, targets=targets, mask=mask,
                 old=old.float(), ref=ref.float(), adv=torch.randn(B, T, generator=g),
                 seq_adv=torch.randn(B, generator=g), in_seq=in_seq)
    for k in ("hidden", "weight", "bias"):
        batch[k] = batch[k].to(device=device, dtype=dtype).requires_grad_()
    for k in ("targets", "mask", "old", "ref", "adv", "seq_adv", "in_seq"):
        batch[k] = batch[k].to(device)
    return batch


def reference(batch, *, per_seq_adv=False, entropy_coef=0.0, temperature=0.8,
              loss_agg="token-mean", with_ref=True, softcap=None, **kwargs):
    """float64: loss, metrics (+ entropy) and grads (hidden, weight, bias)."""
    h = batch["hidden"].detach().double().requires_grad_()
    w = batch["weight"].detach().double().requires_grad_()
    b = batch["bias"].detach().double().requires_grad_()
    targets = batch["targets"]
    m = batch["mask"] & (targets != IGNORE)
    logits = h @ w.T + b
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    lp = log_p.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    adv = batch["seq_adv"] if per_seq_adv else batch["adv"]
    kwargs["level"] = kwargs.pop("importance_level", "token")
    loss, metrics = ref_policy_loss(lp, batch["old"].double(), adv.double(), m,
                                    batch["ref"].double() if with_ref else None,
                                    agg=loss_agg, horizon=T, **kwargs)
    loss = loss - entropy_coef * ref_aggregate(entropy, m, loss_agg, T)
    with torch.no_grad():
        metrics["entropy"] = (entropy * m).sum() / m.sum()
        metrics["_scale"] += abs(entropy_coef) * ref_aggregate(entropy, m, loss_agg, T)
    loss.backward()
    return loss.detach(), metrics, (h.grad, w.grad, b.grad)


def run(batch, backend, *, layout="padded", per_seq_adv=False, with_ref=True, **kwargs):
    """The op on the padded batch, or on its packed form (gathered from the same leaves)."""
    for k in ("hidden", "weight", "bias"):
        batch[k].grad = None
    kwargs.setdefault("temperature", 0.8)
    adv = batch["seq_adv"] if per_seq_adv else batch["adv"]
    ref = batch["ref"] if with_ref else None
    if layout == "padded":
        loss, metrics = linear_policy_loss(
            batch["hidden"], batch["weight"], batch["targets"], batch["old"], adv,
            mask=batch["mask"], ref_logps=ref, bias=batch["bias"], horizon=T,
            backend=backend, **kwargs)
    else:
        keep = batch["in_seq"]
        lengths = keep.sum(-1)
        cu = torch.zeros(B + 1, dtype=torch.int32, device=lengths.device)
        cu[1:] = torch.cumsum(lengths, 0)
        loss, metrics = linear_policy_loss(
            batch["hidden"][keep], batch["weight"], batch["targets"][keep], batch["old"][keep],
            adv if per_seq_adv else adv[keep], mask=batch["mask"][keep], cu_seqlens=cu,
            ref_logps=None if ref is None else ref[keep], bias=batch["bias"], horizon=T,
            backend=backend, **kwargs)
    loss.backward()
    grads = (batch["hidden"].grad, batch["weight"].grad, batch["bias"].grad)
    return loss.detach(), metrics, grads


def check_against_reference(batch, backend, *, tol=2e-5, layout="padded", **kwargs):
    want_loss, want_metrics, want_grads = reference(batch, **kwargs)
    loss, metrics, grads = run(batch, backend, layout=layout, **kwargs)
    assert loss.dtype == (torch.float64 if batch["hidden"].dtype == torch.float64
                          else torch.float32)
    assert all(g.dtype == batch["hidden"].dtype for g in grads)
    scale = float(want_metrics.pop("_scale"))
    assert abs(float(loss) - float(want_loss)) <= tol * scale, (float(loss), float(want_loss))
    assert set(metrics) == set(want_metrics), (set(metrics), set(want_metrics))
    for name, want in want_metrics.items():
        got = float(metrics[name])
        assert not metrics[name].requires_grad
        bound = tol * (scale if name == "pg_loss" else max(abs(float(want)), 1.0))
        assert abs(got - float(want)) <= bound, f"{name}: {got} vs {float(want)}"
    # The bias gradient sums d loss / d logits over every token, whose signed terms can cancel
    # (its relative error has a heavy tail: in bf16 with softcap up to 0.86 of 10 * tol over
    # 105 draws), so it gets twice the bound of the other gradients.
    for name, g, w in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, want_grads):
        assert_rel_close(g, w, (20 if name == "grad_bias" else 10) * tol, name)
    return want_metrics


# ---------------------------------------------------------------------------------------
# values and gradients


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("loss_agg", AGG_MODES)
def test_every_loss_agg_and_layout(backend, device, loss_agg, layout):
    check_against_reference(make_batch(device=device), backend, layout=layout,
                            loss_agg=loss_agg,
                            kl_coef=0.05, entropy_coef=0.01)


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_kl_estimators(backend, device, kl_estimator):
    metrics = check_against_reference(make_batch(device=device), backend, kl_coef=0.1,
                                      kl_estimator=kl_estimator)
    assert float(metrics["kl"]) != 0.0


def test_without_ref_logps_there_is_no_kl_metric(backend, device):
    metrics = check_against_reference(make_batch(device=device), backend, with_ref=False)
    assert "kl" not in metrics


def test_dual_clip_and_asymmetric_clip(backend, device):
    batch = make_batch(device=device)
    # ratios near e for many negative-advantage tokens: the dual clip (c = 1.5) must act;
    # ratios near e^0.5 for many positive-advantage ones: the upper clip (1.28) must act
    # (left to the noise alone, one CI draw clipped no token; 0 of 300 seeded draws did)
    batch["old"] = torch.where(batch["adv"] < -0.3, batch["old"] - 1.0, batch["old"])
    batch["old"] = torch.where(batch["adv"] > 0.3, batch["old"] - 0.5, batch["old"])
    metrics = check_against_reference(batch, backend, dual_clip=1.5, clip_low=0.1,
                                      clip_high=0.28, kl_coef=0.05)
    assert float(metrics["dual_clipfrac"]) > 0, "the batch must trigger the dual clip"
    assert float(metrics["clipfrac"]) > 0


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gspo_sequence_level(backend, device, layout):
    check_against_reference(make_batch(device=device), backend, layout=layout,
                            importance_level="sequence",
                            loss_agg="seq-mean-token-mean", kl_coef=0.05, entropy_coef=0.02)


def test_per_sequence_advantages(backend, device):
    batch = make_batch(device=device)
    check_against_reference(batch, backend, per_seq_adv=True, layout="packed")
    # [S] advantages equal the same values broadcast per token
    loss_seq, _, grads_seq = run(batch, backend, per_seq_adv=True)
    batch["adv"] = batch["seq_adv"][:, None].expand(B, T).contiguous()
    loss_tok, _, grads_tok = run(batch, backend)
    assert float(loss_seq) == pytest.approx(float(loss_tok), rel=1e-6, abs=1e-7)
    for g_seq, g_tok in zip(grads_seq, grads_tok):
        assert_rel_close(g_seq, g_tok, 1e-6, "grad")


def test_entropy_bonus_changes_loss_and_gradient(backend, device):
    batch = make_batch(device=device)
    base = run(batch, backend, kl_coef=0.05)
    bonus = run(batch, backend, kl_coef=0.05, entropy_coef=0.3)
    # loss drops by 0.3 * (token-mean entropy); the entropy metric is the same either way
    entropy = float(bonus[1]["entropy"])
    assert entropy > 1.0
    assert abs(float(base[0] - bonus[0]) - 0.3 * entropy) <= 1e-5 * entropy
    assert float(base[1]["entropy"]) == pytest.approx(entropy, rel=1e-6)
    assert (base[2][1] - bonus[2][1]).norm() > 1e-3 * base[2][1].norm()
    check_against_reference(batch, backend, entropy_coef=0.3)


def assert_same_result(got, want):
    """(loss, metrics, grads) of two runs agree: the loss and metrics, sums of O(1) terms
    that may cancel, also on an absolute scale; the gradients by relative norm."""
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-5, abs=2e-6)
    for name in want[1]:
        assert float(got[1][name]) == pytest.approx(float(want[1][name]), rel=1e-5, abs=2e-6)
    for g_want, g_got in zip(want[2], got[2]):
        assert_rel_close(g_got, g_want, 1e-5, "grad")


def test_padded_and_packed_agree(backend, device):
    batch = make_batch(device=device)
    kwargs = dict(kl_coef=0.1, entropy_coef=0.01, loss_agg="seq-mean-token-sum-norm")
    padded = run(batch, backend, **kwargs)
    packed = run(batch, backend, layout="packed", **kwargs)
    assert_same_result(packed, padded)


def test_ignored_targets_and_masked_tokens_get_nothing(backend, device):
    batch = make_batch(device=device)
    _, _, (grad_h, _, _) = run(batch, backend, kl_coef=0.1, entropy_coef=0.01)
    counted = batch["mask"] & (batch["targets"] != IGNORE)
    assert grad_h[~counted].abs().max() == 0
    assert grad_h[counted].abs().sum(-1).min() > 0
    # an ignored target's old/ref/advantage values do not matter, even non-finite ones
    loss_before = run(batch, backend, kl_coef=0.1)[0]
    batch["old"][0, 4] = float("nan")
    batch["adv"][3, 7] = float("inf")
    loss_after = run(batch, backend, kl_coef=0.1)[0]
    assert torch.isfinite(loss_after) and float(loss_after) == pytest.approx(float(loss_before))


@pytest.mark.parametrize("bad", ["old", "ref"])
def test_nan_in_a_counted_token_gives_nan_as_torch(backend, device, bad):
    # policy_loss's clamps (log-ratio, k3, clip range) keep a NaN old/ref log-prob of a token
    # that counts: the loss and the metrics it reaches are NaN in the torch reference, and so
    # in the fused chunk kernels (which share policy_loss's per-token math)
    batch = make_batch(device=device)
    batch[bad][1, 3] = float("nan")  # inside the length, past the prompt, a real target
    exp_loss, exp_metrics, exp_grads = run(batch, "torch", kl_coef=0.1, dual_clip=3.0)
    exp_grads = [g.clone() for g in exp_grads]
    loss, metrics, grads = run(batch, backend, kl_coef=0.1, dual_clip=3.0)
    assert torch.isnan(exp_loss) and torch.isnan(loss)
    assert torch.isnan(exp_metrics["ratio_max" if bad == "old" else "kl"])
    for name, want in exp_metrics.items():
        assert bool(torch.isnan(metrics[name])) == bool(torch.isnan(want)), (name, metrics[name])
    for name, g, w in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, exp_grads):
        assert torch.equal(torch.isnan(g), torch.isnan(w)), name


@pytest.mark.no_cuda_launch  # nothing to compute: the wrapper returns before a launch
def test_no_counted_token_gives_zero(backend, device):
    batch = make_batch(device=device)
    batch["mask"][:] = False
    loss, metrics, grads = run(batch, backend, kl_coef=0.1, entropy_coef=0.01)
    assert float(loss) == 0.0
    assert all(torch.isfinite(v) and float(v) == 0.0 for v in metrics.values())
    assert all(float(g.abs().max()) == 0.0 for g in grads)


def test_chunking_splits_and_agrees(backend, device, monkeypatch):
    batch = make_batch(device=device)
    kwargs = dict(kl_coef=0.1, entropy_coef=0.01, importance_level="sequence")
    one = run(batch, backend, **kwargs)
    launches = []
    if backend == "triton":
        from alignfuse.kernels.fused import triton_fused_loss

        original = triton_fused_loss.fused_chunk_loss
        monkeypatch.setattr(triton_fused_loss, "fused_chunk_loss",
                            lambda z, *a, **k: (launches.append(z.shape[0]), original(z, *a, **k)))
    # 7 rows of V fp32 logits per fused chunk (3 in linear_logprobs' two-buffer torch path)
    monkeypatch.setattr(logprobs_reference, "CHUNK_BUDGET_BYTES", 7 * V * 4)
    many = run(batch, backend, **kwargs)
    if backend == "triton":
        counted = int((batch["mask"] & (batch["targets"] != IGNORE)).sum())
        # GSPO: a statistics pass and a gradient pass, each in ceil(counted / 7) chunks
        assert launches == ([7] * (counted // 7) + ([counted % 7] if counted % 7 else [])) * 2
    # chunk sizes change the GEMMs' fp32 rounding (~1e-7 per logit); the loss is a sum of
    # O(1) terms that may cancel, so it is compared on an absolute scale
    assert_same_result(many, one)


def test_no_grad_and_partial_grads(backend, device):
    batch = make_batch(device=device)
    with_grad = run(batch, backend, kl_coef=0.1)
    with torch.no_grad():
        loss, metrics = linear_policy_loss(batch["hidden"], batch["weight"], batch["targets"],
                                           batch["old"], batch["adv"], mask=batch["mask"],
                                           ref_logps=batch["ref"], kl_coef=0.1,
                                           bias=batch["bias"], temperature=0.8, horizon=T,
                                           backend=backend)
    assert not loss.requires_grad
    assert float(loss) == pytest.approx(float(with_grad[0]), rel=1e-6)
    # only the hidden states need a gradient (a frozen LM head)
    hidden = batch["hidden"].detach().requires_grad_()
    loss, _ = linear_policy_loss(hidden, batch["weight"].detach(), batch["targets"],
                                 batch["old"], batch["adv"], mask=batch["mask"],
                                 ref_logps=batch["ref"], kl_coef=0.1,
                                 bias=batch["bias"].detach(), temperature=0.8, horizon=T,
                                 backend=backend)
    loss.backward()
    assert_rel_close(hidden.grad, with_grad[2][0], 1e-6, "grad_hidden")


@pytest.mark.parametrize("importance_level", ["token", "sequence"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-3)])
def test_softcap(backend, device, monkeypatch, importance_level, dtype, tol):
    """Gemma-2's soft-capped logits, c tanh(z / c) before the temperature (GSPO's
    statistics pass too), over several chunks; raw logits reach ~4 c here."""
    monkeypatch.setattr(logprobs_reference, "CHUNK_BUDGET_BYTES", 7 * V * 6)
    check_against_reference(make_batch(dtype=dtype, device=device), backend, tol=tol,
                            layout="packed", kl_coef=0.1, entropy_coef=0.01, softcap=2.0,
                            importance_level=importance_level)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_bf16_and_float64_inputs(backend, device, dtype, monkeypatch):
    """bf16 (the GPU dtype: a bf16 d loss / d logits buffer, fp32 weight-gradient slices) and
    float64 (gradcheck inputs) against float64 of the same input values."""
    from alignfuse.kernels.fused import chunked

    monkeypatch.setattr(chunked, "WEIGHT_GRAD_ROWS", 300)  # 4 slices of the 1031 rows
    tol = 1e-3 if dtype == torch.bfloat16 else 2e-5
    check_against_reference(make_batch(dtype=dtype, device=device), backend, tol=tol,
                            kl_coef=0.1,
                            entropy_coef=0.01, layout="packed")


# The cuda backend (kernels/fused/cuda.py: pointers, strides, dtype codes and the argument
# order of csrc/cuda/fused.cu, whose kernel is emulated on CPU) over several chunks, whose stats
# columns are strided slices. On a GPU: test_bf16_gpu_real_vocab (-m gpu).
@pytest.mark.parametrize("kwargs", [
    dict(layout="packed", dual_clip=1.5, clip_low=0.05, clip_high=0.4, kl_coef=0.05,
         entropy_coef=0.01, loss_agg="seq-mean-token-mean"),
    dict(importance_level="sequence", kl_coef=0.1, kl_estimator="k2", per_seq_adv=True),
    dict(dtype=torch.bfloat16, kl_coef=0.1, entropy_coef=0.01, tol=1e-3)],
    ids=["dual-clip-entropy", "gspo", "bf16"])
@pytest.mark.cpu_only  # the CUDA emulation (CPU tensors)
def test_cuda_backend_in_several_chunks(emulated_cuda, monkeypatch, kwargs):
    # several chunks: the stats columns of a chunk are a strided slice
    monkeypatch.setattr(logprobs_reference, "CHUNK_BUDGET_BYTES", 7 * V * 6)
    kwargs = dict(kwargs)
    batch = make_batch(dtype=kwargs.pop("dtype", torch.float32))
    check_against_reference(batch, "cuda", **kwargs)


def test_float64_gradcheck_of_the_reference():
    g = torch.Generator().manual_seed(0)
    n, h, v = 7, 5, 9
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[2] = IGNORE
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, targets.clamp(min=0)[:, None])[:, 0]
    # old/ref away from the clip boundaries and kinks, so the loss is smooth there
    old = logp + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
    ref = logp - 0.3
    adv = torch.randn(2, generator=g, dtype=torch.float64)

    def f(hd, wt, bs):
        return linear_policy_loss(hd, wt, targets, old, adv, cu_seqlens=cu, ref_logps=ref,
                                  kl_coef=0.1, entropy_coef=0.05, bias=bs, temperature=1.3,
                                  loss_agg="seq-mean-token-mean", backend="torch")[0]

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


# ---------------------------------------------------------------------------------------
# bad input


def test_bad_input_names_the_argument():
    batch = make_batch(0)
    args = (batch["hidden"], batch["weight"], batch["targets"], batch["old"], batch["adv"])
    kw = dict(mask=batch["mask"])
    bad_targets = batch["targets"].clone()
    bad_targets[1, 1] = V
    with pytest.raises(ValueError, match="targets"):
        linear_policy_loss(*args[:2], bad_targets, *args[3:], **kw)
    with pytest.raises(ValueError, match="old_logps"):
        linear_policy_loss(*args[:3], batch["old"][:, :-1], batch["adv"], **kw)
    with pytest.raises(ValueError, match="advantages"):
        linear_policy_loss(*args[:4], batch["adv"][:-1, 0], **kw)
    with pytest.raises(ValueError, match="weight"):
        linear_policy_loss(args[0], batch["weight"][:, :-1], *args[2:], **kw)
    with pytest.raises(ValueError, match="targets"):
        linear_policy_loss(args[0], args[1], batch["targets"][:, :-1], *args[3:], **kw)
    with pytest.raises(ValueError, match="kl_coef"):
        linear_policy_loss(*args, kl_coef=0.1, **kw)
    with pytest.raises(TypeError, match="entropy_coef"):
        linear_policy_loss(*args, entropy_coef="0.1", **kw)
    for coef in (float("nan"), float("inf")):  # a NaN or inf loss otherwise
        with pytest.raises(ValueError, match="entropy_coef must be a finite number"):
            linear_policy_loss(*args, entropy_coef=coef, **kw)
        with pytest.raises(ValueError, match="kl_coef must be a finite number"):
            linear_policy_loss(*args, ref_logps=batch["ref"], kl_coef=coef, **kw)
    with pytest.raises(ValueError, match="clip_high must be a non-negative number"):
        linear_policy_loss(*args, clip_high=float("nan"), **kw)
    with pytest.raises(ValueError, match="temperature"):
        linear_policy_loss(*args, temperature=0.0, **kw)
    with pytest.raises(ValueError, match="loss_agg"):
        linear_policy_loss(*args, loss_agg="mean", **kw)
    with pytest.raises(ValueError, match="bias"):
        linear_policy_loss(*args, bias=batch["bias"][:-1], **kw)
    with pytest.raises(ValueError, match="cu_seqlens"):
        linear_policy_loss(batch["hidden"][0], batch["weight"], batch["targets"][0],
                           batch["old"][0], batch["adv"][0],
                           cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


# ---------------------------------------------------------------------------------------
# GPU (bf16), on a lent GPU


@pytest.mark.gpu
@pytest.mark.parametrize("importance_level", ["token", "sequence"])
def test_bf16_gpu_real_vocab(backend, device, importance_level):
    """bf16 inputs, real vocabulary, against float64 of the same bf16 values."""
    global B, T, H, V
    saved = B, T, H, V
    B, T, H, V = 4, 75, 896, 151936
    try:
        batch = make_batch(dtype=torch.bfloat16, device=device, lengths=[75, 60, 33, 75])
        # bf16 gradients are rounded once at the end: compare loosely
        check_against_reference(batch, backend, tol=1e-3, kl_coef=0.05, entropy_coef=0.01,
                                importance_level=importance_level)
    finally:
        B, T, H, V = saved


# ---------------------------------------------------------------------------------------
# memory: the fused path never holds [N, V]

_N, _H, _V = 4096, 256, 32000

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys, time
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    torch.set_num_threads(2)
    from alignfuse.kernels import linear_policy_loss, policy_loss

    path, N, H, V = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)

    def inputs(n, h, v):
        hidden = torch.randn(n, h, requires_grad=True)
        weight = (torch.randn(v, h) / h ** 0.5).requires_grad_()
        targets = torch.randint(0, v, (n,))
        cu = torch.tensor([0, n // 2, n], dtype=torch.int32)
        old = torch.full((n,), -10.0) + 0.1 * torch.randn(n)
        return hidden, weight, targets, cu, old, torch.randn(2)

    def step(hidden, weight, targets, cu, old, adv):
        if path == "naive":
            logp = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None])[:, 0]
            loss, _ = policy_loss(logp, old, adv, cu_seqlens=cu, backend="torch")
        else:
            loss, _ = linear_policy_loss(hidden, weight, targets, old, adv, cu_seqlens=cu,
                                         backend=path)
        loss.backward()
        return hidden.grad

    step(*inputs(8, H, 64))  # warm-up: lazily allocated state belongs to the baseline
    args = inputs(N, H, V)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grad = step(*args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_kib": peak - base, "grad_norm": float(grad.norm())}))
""")


def _memory_run(path: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, path, str(_N), str(_H), str(_V)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.cpu_only  # host RSS of the interpreted kernels; bench/ measures GPU memory
def test_fused_path_peak_memory_vs_naive():
    naive = _memory_run("naive")
    fused = _memory_run("triton")
    ratio = fused["extra_kib"] / naive["extra_kib"]
    print(f"\nN={_N} H={_H} V={_V} fp32 fwd+bwd extra peak RSS: naive "
          f"{naive['extra_kib'] / 1024:.0f} MiB, fused {fused['extra_kib'] / 1024:.0f} MiB "
          f"({ratio:.3f})")
    assert naive["extra_kib"] * 1024 > _N * _V * 4  # the naive path's [N, V] logits are seen
    assert abs(fused["grad_norm"] - naive["grad_norm"]) <= 1e-3 * naive["grad_norm"]
    assert ratio <= 0.15, f"the fused path used {ratio:.3f} of the naive path's extra memory"


# ---------------------------------------------------------------------------------------
# For tests/test_triton_sm90.py's VARIANTS (the fused kernel's constexpr switches):
#     "linear_policy_loss": test_linear_policy_loss.sm90_variants,
#     "linear_cross_entropy": test_linear_policy_loss.sm90_variants,


def sm90_variants(dtype):
    """(label, run) pairs that launch triton_fused_loss's kernel in every constexpr setting."""
    from alignfuse.kernels import linear_cross_entropy

    def policy(**kwargs):
        n, h, v = 19, 40, 301
        hidden = torch.randn(n, h).to(dtype).requires_grad_()
        weight = (torch.randn(v, h) * 0.2).to(dtype).requires_grad_()
        targets = torch.randint(0, v, (n,))
        targets[1] = IGNORE
        cu = torch.tensor([0, 5, 12, 12, 19], dtype=torch.int32)
        old, ref = torch.randn(n) - 5.0, torch.randn(n) - 5.0
        loss, _ = linear_policy_loss(hidden, weight, targets, old, torch.randn(4),
                                     cu_seqlens=cu, ref_logps=ref, backend="triton", **kwargs)
        loss.float().backward()

    def cross_entropy(**kwargs):
        hidden = torch.randn(13, 40).to(dtype).requires_grad_()
        weight = (torch.randn(301, 40) * 0.2).to(dtype).requires_grad_()
        bias = torch.randn(301).to(dtype).requires_grad_()
        loss = linear_cross_entropy(hidden, weight, torch.randint(0, 301, (13,)), bias=bias,
                                    backend="triton", **kwargs)
        loss.float().sum().backward()

    yield "linear_policy_loss[token]", lambda: policy()
    yield "linear_policy_loss[gspo,dual_clip]", lambda: policy(importance_level="sequence",
                                                               dual_clip=3.0)
    yield "linear_policy_loss[entropy]", lambda: policy(entropy_coef=0.01, temperature=0.7)
    for estimator in ("k1", "k2", "k3", "abs"):
        yield (f"linear_policy_loss[kl_estimator={estimator}]",
               lambda e=estimator: policy(kl_coef=0.1, kl_estimator=e))
    yield "linear_cross_entropy[mean]", lambda: cross_entropy()
    yield "linear_cross_entropy[sum,smoothing]", lambda: cross_entropy(reduction="sum",
                                                                      label_smoothing=0.1)
    yield "linear_cross_entropy[none]", lambda: cross_entropy(reduction="none")
