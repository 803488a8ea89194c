"""linear_logprobs / logprobs_from_logits against a float64 evaluation of the formula."""

from __future__ import annotations

import pytest
import torch

from alignfuse.kernels import linear_logprobs, logprobs_from_logits
from alignfuse.kernels.logprobs import reference
from helpers import assert_rel_close

IGNORE = -100


def formula(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
            ignore_index: int = IGNORE) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logp of the target and entropy, both 0 at ignored positions."""
    z = logits.to(torch.float64) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    logp = log_p.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def make_inputs(N=37, H=48, V=1031, *, dtype=torch.float32, device="cpu", lead=None,
                ignore_frac=0.2, scale=1.0):
    lead = (N,) if lead is None else lead
    hidden = torch.randn(*lead, H, device=device, dtype=torch.float64)
    weight = torch.randn(V, H, device=device, dtype=torch.float64) * (scale / H ** 0.5)
    bias = torch.randn(V, device=device, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, lead, device=device)
    targets[torch.rand(lead, device=device) < ignore_frac] = IGNORE
    return [x.to(dtype).requires_grad_() for x in (hidden, weight, bias)] + [targets]


def grads_of(outputs, inputs, weights):
    loss = sum((o.to(torch.float64) * w).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(loss, inputs, retain_graph=True)


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_logprobs_matches_float64(backend, device, use_bias, temperature):
    hidden, weight, bias, targets = make_inputs(device=device)
    bias = bias if use_bias else None
    logp, ent = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                return_entropy=True, backend=backend)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if use_bias else None
    logits = h64 @ w64.T + (b64 if use_bias else 0.0)
    ref_logp, ref_ent = formula(logits, targets, temperature)
    assert_rel_close(logp, ref_logp, 2e-6, "logp")
    assert_rel_close(ent, ref_ent, 2e-6, "entropy")
    assert bool((logp[targets == IGNORE] == 0).all()) and bool((ent[targets == IGNORE] == 0).all())

    weights = [torch.randn_like(ref_logp), torch.randn_like(ref_ent)]
    ins = [hidden, weight] + ([bias] if use_bias else [])
    ins64 = [h64, w64] + ([b64] if use_bias else [])
    got = grads_of([logp, ent], ins, weights)
    want = grads_of([ref_logp, ref_ent], ins64, weights)
    for name, g, w in zip(["grad_hidden", "grad_weight", "grad_bias"], got, want):
        assert g.dtype == torch.float32
        assert_rel_close(g, w, 2e-5, name)


@pytest.mark.parametrize("temperature", [1.0, 1.9])
def test_logprobs_from_logits_matches_float64(backend, device, temperature):
    logits = (torch.randn(37, 1031, device=device) * 3).requires_grad_()
    targets = torch.randint(0, 1031, (37,), device=device)
    targets[::5] = IGNORE
    logp, ent = logprobs_from_logits(logits, targets, temperature=temperature,
                                     return_entropy=True, backend=backend)
    l64 = logits.detach().double().requires_grad_()
    ref_logp, ref_ent = formula(l64, targets, temperature)
    assert_rel_close(logp, ref_logp, 1e-6, "logp")
    assert_rel_close(ent, ref_ent, 1e-6, "entropy")
    weights = [torch.randn_like(ref_logp), torch.randn_like(ref_ent)]
    (g,) = grads_of([logp, ent], [logits], weights)
    (w,) = grads_of([ref_logp, ref_ent], [l64], weights)
    assert_rel_close(g, w, 1e-5, "grad_logits")
    # logps alone (no entropy): the gradient must come from logp only
    logp_only = logprobs_from_logits(logits, targets, temperature=temperature, backend=backend)
    assert_rel_close(logp_only, ref_logp, 1e-6, "logp only")
    (g,) = grads_of([logp_only], [logits], weights[:1])
    (w,) = grads_of([ref_logp], [l64], weights[:1])
    assert_rel_close(g, w, 1e-5, "grad_logits (logp only)")


def test_leading_dims_and_all_ignored_row(backend, device):
    hidden, weight, bias, targets = make_inputs(H=24, V=301, lead=(3, 5), device=device)
    targets[1] = IGNORE  # a whole sequence ignored
    logp, ent = linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True,
                                backend=backend)
    assert logp.shape == (3, 5) and ent.shape == (3, 5)
    assert bool((logp[1] == 0).all()) and bool((ent[1] == 0).all())
    ref_logp, ref_ent = formula(hidden.double() @ weight.double().T + bias.double(), targets)
    assert_rel_close(logp, ref_logp, 2e-6, "logp [B, T]")
    assert_rel_close(ent, ref_ent, 2e-6, "entropy [B, T]")
    g_h, = torch.autograd.grad((logp + ent).sum(), hidden)
    assert bool(torch.isfinite(g_h).all()) and bool((g_h[1] == 0).all())
    # the same through the logits entry point
    logits = (hidden @ weight.T + bias).detach()
    lp2 = logprobs_from_logits(logits, targets, backend=backend)
    assert lp2.shape == (3, 5)
    assert_rel_close(lp2, ref_logp, 2e-6, "logits [B, T]")


def test_every_target_ignored(backend, device):
    hidden, weight, _, targets = make_inputs(N=9, H=16, V=67, device=device)
    targets = torch.full_like(targets, IGNORE)
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    assert bool((logp == 0).all()) and bool((ent == 0).all())
    g_h, g_w = torch.autograd.grad((logp + ent).sum(), (hidden, weight))
    assert bool((g_h == 0).all()) and bool((g_w == 0).all())


def test_custom_ignore_index(backend, device):
    hidden, weight, _, targets = make_inputs(N=13, H=16, V=67, ignore_frac=0.0, device=device)
    targets[:4] = 5  # ignore_index may be a real token id (as in torch's cross_entropy)
    logp = linear_logprobs(hidden, weight, targets, ignore_index=5, backend=backend)
    ref, _ = formula(hidden.double() @ weight.double().T, targets, ignore_index=5)
    assert bool((logp[targets == 5] == 0).all())
    assert_rel_close(logp, ref, 2e-6, "logp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits_do_not_overflow(backend, device, dtype):
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("cuda takes float16/bfloat16/float32")
    hidden, weight, _, targets = make_inputs(N=19, H=32, V=257, dtype=dtype, device=device)
    with torch.no_grad():
        hidden.mul_(100)
        weight.mul_(100 * 32 ** 0.5 / 3)  # logits ~ 1e4
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    logits = hidden.detach().double() @ weight.detach().double().T
    assert float(logits.abs().max()) > 5e3
    ref_logp, ref_ent = formula(logits, targets)
    assert bool(torch.isfinite(logp).all()) and bool(torch.isfinite(ent).all())
    assert_rel_close(logp, ref_logp, 1e-5, "logp")
    # entropy is tiny (near one-hot) here: compare absolutely
    assert float((ent.detach().double() - ref_ent).abs().max()) < 1e-2
    g_h, g_w = torch.autograd.grad(logp.sum() + ent.sum(), (hidden, weight))
    assert bool(torch.isfinite(g_h.float()).all()) and bool(torch.isfinite(g_w.float()).all())
    big = (torch.randn(7, 101, device=device) * 1e4).to(dtype).requires_grad_()
    t = torch.randint(0, 101, (7,), device=device)
    lp, en = logprobs_from_logits(big, t, return_entropy=True, backend=backend)
    rl, re = formula(big.double(), t)
    assert_rel_close(lp, rl, 1e-5, "logp from 1e4 logits")
    assert float((en.detach().double() - re).abs().max()) < 1e-2
    (g,) = torch.autograd.grad(lp.sum() + en.sum(), big)
    assert bool(torch.isfinite(g.float()).all())


def test_bf16_inputs_match_fp32_of_the_same_values(backend, device):
    """bf16 inputs are upcast and accumulated in fp32: compare with the same values in float64."""
    hidden, weight, bias, targets = make_inputs(N=21, H=40, V=333, dtype=torch.bfloat16,
                                                device=device)
    logp, ent = linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True,
                                backend=backend)
    assert logp.dtype == torch.float32
    ref_logp, ref_ent = formula(hidden.double() @ weight.double().T + bias.double(), targets)
    assert_rel_close(logp, ref_logp, 1e-5, "bf16 logp")
    assert_rel_close(ent, ref_ent, 1e-5, "bf16 entropy")
    g_h, g_w, g_b = torch.autograd.grad((logp + ent).sum(), (hidden, weight, bias))
    assert g_h.dtype == g_w.dtype == g_b.dtype == torch.bfloat16
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    r_logp, r_ent = formula(h64 @ w64.T + b64, targets)
    want = torch.autograd.grad((r_logp + r_ent).sum(), (h64, w64, b64))
    for name, g, w in zip(["grad_hidden", "grad_weight", "grad_bias"], (g_h, g_w, g_b), want):
        assert_rel_close(g, w, 1e-2, name)  # bf16 rounding of the gradient itself


def test_gradcheck_torch_reference(monkeypatch):
    monkeypatch.setattr(reference, "CHUNK_BUDGET_BYTES", 2 * 7 * 8 * 2)  # 2-row chunks
    hidden = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 2, IGNORE, 6, 0])
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_logprobs(h, w, targets, bias=b, temperature=1.3,
                                        return_entropy=True, backend="torch"),
        (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w: linear_logprobs(h, w, targets, temperature=0.6, backend="torch"),
        (hidden, weight))
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z: logprobs_from_logits(z, targets, temperature=0.8, return_entropy=True,
                                       backend="torch"), (logits,))


def test_torch_chunking_is_exact(monkeypatch):
    """Many small chunks give the same result as one chunk."""
    hidden, weight, bias, targets = make_inputs(N=37, H=16, V=101)
    whole = linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True,
                            backend="torch")
    g_whole = torch.autograd.grad(sum(o.sum() for o in whole), (hidden, weight, bias))
    monkeypatch.setattr(reference, "CHUNK_BUDGET_BYTES", 5 * 101 * 4 * 2)
    assert reference.chunk_rows(37, 101, 4, reference_bytes=1 << 30) == 5
    parts = linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True,
                            backend="torch")
    g_parts = torch.autograd.grad(sum(o.sum() for o in parts), (hidden, weight, bias))
    for a, b in zip([*whole, *g_whole], [*parts, *g_parts]):
        assert_rel_close(a, b, 1e-6, "chunked")


def test_large_n_torch():
    """200k tokens (tiny H, V) on the chunked torch path."""
    N, H, V = 200_003, 8, 17
    hidden, weight, _, targets = make_inputs(N=N, H=H, V=V, scale=3.0)
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, backend="torch")
    ref_logp, ref_ent = formula(hidden.double() @ weight.double().T, targets)
    assert_rel_close(logp, ref_logp, 2e-6, "logp")
    assert_rel_close(ent, ref_ent, 2e-6, "entropy")
    g_h, g_w = torch.autograd.grad(logp.sum() + ent.sum(), (hidden, weight))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    r_logp, r_ent = formula(h64 @ w64.T, targets)
    want = torch.autograd.grad(r_logp.sum() + r_ent.sum(), (h64, w64))
    assert_rel_close(g_h, want[0], 2e-5, "grad_hidden")
    assert_rel_close(g_w, want[1], 2e-4, "grad_weight")  # an fp32 sum over N rows


@pytest.mark.slow
def test_large_n_triton():
    """More rows than a grid dim 1/2 could hold (65,536) through the Triton kernels."""
    N, H, V = 70_001, 16, 16
    hidden, weight, _, targets = make_inputs(N=N, H=H, V=V, scale=3.0)
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, backend="triton")
    ref_logp, ref_ent = formula(hidden.double() @ weight.double().T, targets)
    assert_rel_close(logp, ref_logp, 2e-6, "logp")
    assert_rel_close(ent, ref_ent, 2e-6, "entropy")
    g_h, g_w = torch.autograd.grad(logp.sum() + ent.sum(), (hidden, weight))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    r_logp, r_ent = formula(h64 @ w64.T, targets)
    want = torch.autograd.grad(r_logp.sum() + r_ent.sum(), (h64, w64))
    assert_rel_close(g_h, want[0], 2e-5, "grad_hidden")
    assert_rel_close(g_w, want[1], 2e-4, "grad_weight")  # an fp32 sum over N rows
    logits = (hidden @ weight.T).detach().requires_grad_()
    lp = logprobs_from_logits(logits, targets, backend="triton")
    assert_rel_close(lp, ref_logp, 2e-6, "logits logp")


def test_bad_inputs():
    hidden, weight, bias, targets = make_inputs(N=6, H=8, V=11, ignore_frac=0.0)
    bad = targets.clone()
    bad[2] = 11
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 11\)"):
        linear_logprobs(hidden, weight, bad)
    bad[2] = -1
    with pytest.raises(ValueError, match="targets must be token ids"):
        logprobs_from_logits(torch.randn(6, 11), bad)
    with pytest.raises(ValueError, match="targets must have the token shape"):
        linear_logprobs(hidden, weight, targets[:5])
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with H=8"):
        linear_logprobs(hidden, weight[:, :7], targets)
    with pytest.raises(ValueError, match="weight must have the same dtype as hidden"):
        linear_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match=r"bias must be \[V\] with V=11"):
        linear_logprobs(hidden, weight, targets, bias=bias[:10])
    with pytest.raises(ValueError, match="bias must have the same dtype"):
        linear_logprobs(hidden, weight, targets, bias=bias.half())
    with pytest.raises(TypeError, match="targets must have dtype"):
        linear_logprobs(hidden, weight, targets.float())
    with pytest.raises(TypeError, match="hidden must have dtype"):
        linear_logprobs(hidden.long(), weight, targets)
    for temp in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be"):
            linear_logprobs(hidden, weight, targets, temperature=temp)
        with pytest.raises(ValueError, match="temperature must be"):
            logprobs_from_logits(torch.randn(6, 11), targets, temperature=temp)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        linear_logprobs(hidden, weight[0], targets)
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_logprobs(hidden, weight, targets, backend="cudnn")


def test_weight_on_another_device_is_refused():
    hidden, weight, _, targets = make_inputs(N=6, H=8, V=11)
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu"):
        linear_logprobs(hidden, weight.to("meta"), targets)
    with pytest.raises(ValueError, match="targets is on meta"):
        linear_logprobs(hidden, weight, targets.to("meta"))


@pytest.mark.gpu
@pytest.mark.parametrize("V", [151936, 128256])
def test_bf16_gpu_real_vocab(backend, V):
    """Real vocabulary sizes, H=896, bf16 on GPU, against float64 of the same bf16 values."""
    N, H = 300, 896
    hidden, weight, bias, targets = make_inputs(N=N, H=H, V=V, dtype=torch.bfloat16,
                                                device="cuda", scale=4.0)
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref_logp, ref_ent = formula(h64 @ w64.T, targets)
    assert_rel_close(logp, ref_logp, 1e-5, "logp")
    assert_rel_close(ent, ref_ent, 1e-5, "entropy")
    weights = [torch.randn_like(ref_logp), torch.randn_like(ref_ent)]
    got = grads_of([logp, ent], [hidden, weight], weights)
    want = grads_of([ref_logp, ref_ent], [h64, w64], weights)
    for name, g, w in zip(["grad_hidden", "grad_weight"], got, want):
        assert_rel_close(g, w, 1e-2, name)
    logits = (hidden @ weight.T).detach().requires_grad_()
    lp, en = logprobs_from_logits(logits, targets, return_entropy=True, backend=backend)
    rl, re = formula(logits.double(), targets)
    assert_rel_close(lp, rl, 1e-5, "logits logp")
    assert_rel_close(en, re, 1e-5, "logits entropy")
