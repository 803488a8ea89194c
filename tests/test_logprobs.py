"""linear_logprobs / logprobs_from_logits against a float64 evaluation of the formula."""

from __future__ import annotations

import pytest
import torch

from alignfuse.kernels import linear_logprobs, logprobs_from_logits
from alignfuse.kernels.backends import registered
from alignfuse.kernels.logprobs import LINEAR_STRATEGIES, reference
from conftest import HAS_CUDA, runnable_backends
from helpers import assert_rel_close

IGNORE = -100


def formula(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
            ignore_index: int = IGNORE) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logp of the target and entropy, both 0 at ignored positions."""
    z = logits.to(torch.float64) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    logp = log_p.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    p = log_p.exp()
    # 0 log 0 = 0 at -inf logits (where() before the product keeps NaN out of the gradient)
    entropy = -(p * torch.where(p > 0, log_p, 0.0)).sum(-1)
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


def has_linear(backend: str) -> bool:
    """Whether linear_logprobs registers `backend` (torch, triton and cuda all do)."""
    return backend in registered("linear_logprobs")


def linear_backends() -> list[str]:
    """linear_logprobs' runnable backends, triton once per strategy ("triton:fused")."""
    names = []
    for backend in runnable_backends():
        if backend == "triton":
            names += [f"triton:{strategy}" for strategy in LINEAR_STRATEGIES]
        elif has_linear(backend):
            names.append(backend)
    return names


@pytest.fixture(params=linear_backends())
def linear_backend(request, monkeypatch):
    """The backend= to pass; for triton, its strategy is set in ALIGNFUSE_LINEAR_STRATEGY."""
    backend, _, strategy = request.param.partition(":")
    if strategy:
        monkeypatch.setenv("ALIGNFUSE_LINEAR_STRATEGY", strategy)
    if backend == "cuda" and not HAS_CUDA:
        request.getfixturevalue("emulated_cuda")
    return backend


def grads_of(outputs, inputs, weights):
    loss = sum((o.to(torch.float64) * w).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(loss, inputs, retain_graph=True)


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_logprobs_matches_float64(linear_backend, device, use_bias, temperature):
    hidden, weight, bias, targets = make_inputs(device=device)
    bias = bias if use_bias else None
    logp, ent = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                return_entropy=True, backend=linear_backend)
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


def capped(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """Gemma-2's final logit soft-capping, the formula."""
    return softcap * torch.tanh(logits / softcap)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
def test_softcap_matches_float64(linear_backend, device, monkeypatch, dtype, tol):
    """softcap: logits = c tanh((h W^T + b) / c), then / T, on every backend and triton
    strategy, over several chunks and vocabulary blocks (the chunked strategy) or tiles (the
    fused ones: 9 vocabulary tiles; under the interpreter also 3 token tiles and 2
    vocabulary splits), against float64 of the same input values. The raw logits reach
    ~4 c, so the cap changes the answer."""
    monkeypatch.setattr(reference, "CHUNK_BUDGET_BYTES", 6 * 1031 * 4)  # a few rows a chunk
    c, T = 1.5, 0.7
    hidden, weight, bias, targets = make_inputs(device=device, dtype=dtype, scale=3.0)
    logp, ent = linear_logprobs(hidden, weight, targets, bias=bias, temperature=T,
                                softcap=c, return_entropy=True, backend=linear_backend)
    ins64 = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    raw = ins64[0] @ ins64[1].T + ins64[2]
    assert float(raw.detach().abs().max()) > 4 * c
    ref_logp, ref_ent = formula(capped(raw, c), targets, T)
    uncapped, _ = formula(raw, targets, T)
    assert float((uncapped - ref_logp).detach().norm()) > 0.1 * float(ref_logp.detach().norm())
    assert_rel_close(logp, ref_logp, tol / 10, "logp")
    assert_rel_close(ent, ref_ent, tol / 10, "entropy")
    weights = [torch.randn_like(ref_logp), torch.randn_like(ref_ent)]
    got = grads_of([logp, ent], [hidden, weight, bias], weights)
    want = grads_of([ref_logp, ref_ent], ins64, weights)
    for name, g, w in zip(["grad_hidden", "grad_weight", "grad_bias"], got, want):
        assert g.dtype == dtype
        assert_rel_close(g, w, tol, name)


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
    ref_logp, ref_ent = formula(hidden.double() @ weight.double().T + bias.double(), targets)
    if has_linear(backend):
        logp, ent = linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True,
                                    backend=backend)
        assert logp.shape == (3, 5) and ent.shape == (3, 5)
        assert bool((logp[1] == 0).all()) and bool((ent[1] == 0).all())
        assert_rel_close(logp, ref_logp, 2e-6, "logp [B, T]")
        assert_rel_close(ent, ref_ent, 2e-6, "entropy [B, T]")
        g_h, = torch.autograd.grad((logp + ent).sum(), hidden)
        assert bool(torch.isfinite(g_h).all()) and bool((g_h[1] == 0).all())
    # the same through the logits entry point
    logits = (hidden @ weight.T + bias).detach().requires_grad_()
    lp2, ent2 = logprobs_from_logits(logits, targets, return_entropy=True, backend=backend)
    assert lp2.shape == ent2.shape == (3, 5)
    assert_rel_close(lp2, ref_logp, 2e-6, "logits [B, T]")
    assert_rel_close(ent2, ref_ent, 2e-6, "logits entropy [B, T]")
    (g,) = torch.autograd.grad((lp2 + ent2).sum(), logits)
    assert bool(torch.isfinite(g).all()) and bool((g[1] == 0).all())


@pytest.mark.no_cuda_launch  # nothing to compute: the wrapper returns before a launch
def test_every_target_ignored(linear_backend, device):
    hidden, weight, _, targets = make_inputs(N=9, H=16, V=67, device=device)
    targets = torch.full_like(targets, IGNORE)
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=linear_backend)
    assert bool((logp == 0).all()) and bool((ent == 0).all())
    g_h, g_w = torch.autograd.grad((logp + ent).sum(), (hidden, weight))
    assert bool((g_h == 0).all()) and bool((g_w == 0).all())


@pytest.mark.no_cuda_launch  # nothing to compute: the wrapper returns before a launch
def test_empty_batch(backend, device):
    hidden = torch.randn(2, 0, 8, device=device, requires_grad=True)
    weight = torch.randn(11, 8, device=device, requires_grad=True)
    targets = torch.zeros(2, 0, dtype=torch.long, device=device)
    if has_linear(backend):
        logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True,
                                    backend=backend)
        assert logp.shape == ent.shape == (2, 0)
        (logp.sum() + ent.sum()).backward()
        assert bool((weight.grad == 0).all())
    assert logprobs_from_logits(torch.randn(0, 11, device=device), targets.reshape(0),
                                backend=backend).shape == (0,)


def test_custom_ignore_index(linear_backend, device):
    hidden, weight, _, targets = make_inputs(N=13, H=16, V=67, ignore_frac=0.0, device=device)
    targets[:4] = 5  # ignore_index may be a real token id (as in torch's cross_entropy)
    logp = linear_logprobs(hidden, weight, targets, ignore_index=5, backend=linear_backend)
    ref, _ = formula(hidden.double() @ weight.double().T, targets, ignore_index=5)
    assert bool((logp[targets == 5] == 0).all())
    assert_rel_close(logp, ref, 2e-6, "logp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits_do_not_overflow(backend, device, dtype):
    if has_linear(backend):
        hidden, weight, _, targets = make_inputs(N=19, H=32, V=257, dtype=dtype, device=device)
        with torch.no_grad():
            hidden.mul_(100)
            weight.mul_(100 * 32 ** 0.5 / 3)  # logits ~ 1e4
        logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True,
                                    backend=backend)
        logits = hidden.detach().double() @ weight.detach().double().T
        assert float(logits.abs().max()) > 5e3
        ref_logp, ref_ent = formula(logits, targets)
        assert bool(torch.isfinite(logp).all()) and bool(torch.isfinite(ent).all())
        assert_rel_close(logp, ref_logp, 1e-5, "logp")
        # entropy is tiny (near one-hot) here: compare absolutely
        assert float((ent.detach().double() - ref_ent).abs().max()) < 1e-2
        g_h, g_w = torch.autograd.grad(logp.sum() + ent.sum(), (hidden, weight))
        assert bool(torch.isfinite(g_h.float()).all())
        assert bool(torch.isfinite(g_w.float()).all())
    big = (torch.randn(7, 101, device=device) * 1e4).to(dtype).requires_grad_()
    t = torch.randint(0, 101, (7,), device=device)
    lp, en = logprobs_from_logits(big, t, return_entropy=True, backend=backend)
    rl, re = formula(big.detach().double(), t)
    assert_rel_close(lp, rl, 1e-5, "logp from 1e4 logits")
    assert float((en.detach().double() - re).abs().max()) < 1e-2
    (g,) = torch.autograd.grad(lp.sum() + en.sum(), big)
    assert bool(torch.isfinite(g.float()).all())


@pytest.mark.parametrize("V", [16, 1031])
def test_a_nan_logit_gives_nan_in_its_row_only(backend, device, V):
    """A NaN logit anywhere in a row makes that row's log-prob and entropy NaN, as torch's
    log_softmax does, and leaves the other rows alone. (The CUDA kernels once dropped the
    share of the row whose running sum had turned NaN, and returned a finite answer.)"""
    logits = torch.randn(6, V, device=device)
    where = [0, V - 1, V // 2, 7, 1, 3]
    for row, col in enumerate(where[:4]):
        logits[row, col] = float("nan")
    targets = torch.tensor([1, 2, 3, 4, 5, 6], device=device)
    logp, ent = logprobs_from_logits(logits, targets, return_entropy=True, backend=backend)
    assert bool(logp[:4].isnan().all()) and bool(ent[:4].isnan().all()), (logp, ent)
    ref_logp, ref_ent = formula(logits[4:], targets[4:])
    assert_rel_close(logp[4:], ref_logp, 1e-6, "logp")
    assert_rel_close(ent[4:], ref_ent, 1e-6, "entropy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_minus_inf_logits(backend, device, dtype):
    """Logits masked to -inf (e.g. padded vocabulary) have p = 0: finite results, 0 gradient."""
    logits = torch.randn(9, 131, device=device) * 2
    logits[:, 100:] = float("-inf")
    logits[3, ::2] = float("-inf")
    targets = torch.randint(0, 50, (9,), device=device) * 2 + 1  # odd ids: never masked
    logits = logits.to(dtype).requires_grad_()
    logp, ent = logprobs_from_logits(logits, targets, temperature=0.9, return_entropy=True,
                                     backend=backend)
    l64 = logits.detach().double().requires_grad_()
    ref_logp, ref_ent = formula(l64, targets, 0.9)
    assert bool(torch.isfinite(logp).all()) and bool(torch.isfinite(ent).all())
    assert_rel_close(logp, ref_logp, 1e-5, "logp")
    assert_rel_close(ent, ref_ent, 1e-5, "entropy")
    weights = [torch.randn(9, dtype=torch.float64, device=device) for _ in range(2)]
    (g,) = grads_of([logp, ent], [logits], weights)
    (w,) = grads_of([ref_logp, ref_ent], [l64], weights)
    assert bool(torch.isfinite(g.float()).all())
    assert bool((g[:, 100:] == 0).all())
    assert_rel_close(g, w, 1e-2 if dtype == torch.bfloat16 else 1e-5, "grad_logits")


def test_bf16_inputs_match_fp32_of_the_same_values(linear_backend, device):
    """bf16 inputs are upcast and accumulated in fp32: compare with the same values in float64."""
    hidden, weight, bias, targets = make_inputs(N=21, H=40, V=333, dtype=torch.bfloat16,
                                                device=device)
    logp, ent = linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True,
                                backend=linear_backend)
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
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_logprobs(h, w, targets, bias=b, temperature=0.9, softcap=0.7,
                                        return_entropy=True, backend="torch"),
        (hidden, weight, bias))
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


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("kernels", ["triton", "cuda"])
def test_chunked_strategy_many_chunks_and_vocab_blocks(monkeypatch, request, device, kernels,
                                                       dtype, tol):
    """The chunked strategy with a tiny budget: forward chunks of 3-5 tokens, backward blocks
    of 40 vocabulary columns (the last ones partial), against float64 of the same values.
    Around the Triton logits kernels, and around the cuda ones (on a GPU, or emulated)."""
    monkeypatch.setenv("ALIGNFUSE_LINEAR_STRATEGY", "chunked")
    N, H, V = 37, 16, 301
    on = request.getfixturevalue("cuda_device") if kernels == "cuda" else device
    hidden, weight, bias, targets = make_inputs(N=N, H=H, V=V, dtype=dtype, device=on,
                                                ignore_frac=0.0)
    targets[::5] = IGNORE  # 29 counted tokens
    M = int((targets != IGNORE).sum())
    bytes_per_logit = 4 if dtype == torch.float32 else 6
    budget = 40 * M * (bytes_per_logit // 2) * 2
    monkeypatch.setattr(reference, "CHUNK_BUDGET_BYTES", budget)
    assert 1 < reference.chunk_rows(M, V, 2, 0) <= 5  # forward chunks (no gradient buffer)
    assert reference.chunk_rows(V, M, bytes_per_logit // 2, 0) == 40  # backward blocks
    logp, ent = linear_logprobs(hidden, weight, targets, bias=bias, temperature=0.8,
                                return_entropy=True, backend=kernels)
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    r_logp, r_ent = formula(h64 @ w64.T + b64, targets, temperature=0.8)
    assert_rel_close(logp, r_logp, 2e-6 if dtype == torch.float32 else 1e-5, "logp")
    assert_rel_close(ent, r_ent, 2e-6 if dtype == torch.float32 else 1e-5, "entropy")
    up = [torch.randn(N, dtype=torch.float64, device=on) for _ in range(2)]
    got = grads_of([logp, ent], [hidden, weight, bias], up)
    want = grads_of([r_logp, r_ent], [h64, w64, b64], up)
    for name, g, w in zip(["grad_hidden", "grad_weight", "grad_bias"], got, want):
        assert_rel_close(g, w, tol, name)


@pytest.mark.parametrize("path, N, H, V", [
    pytest.param("torch", 200_003, 8, 17, id="torch"),
    pytest.param("triton", 70_001, 16, 16, marks=pytest.mark.slow, id="triton")])
def test_large_n(path, N, H, V, monkeypatch, device):
    """Many rows: 200k tokens (tiny H, V) on the chunked torch path; more rows than a grid
    dim 1/2 could hold (65,536) through the Triton kernels (the fused strategy's GEMM
    kernels, and the logits kernels)."""
    monkeypatch.setenv("ALIGNFUSE_LINEAR_STRATEGY", "fused")
    hidden, weight, _, targets = make_inputs(N=N, H=H, V=V, scale=3.0, device=device)
    logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, backend=path)
    ref_logp, ref_ent = formula(hidden.double() @ weight.double().T, targets)
    assert_rel_close(logp, ref_logp, 2e-6, "logp")
    assert_rel_close(ent, ref_ent, 2e-6, "entropy")
    g_h, g_w = torch.autograd.grad(logp.sum() + ent.sum(), (hidden, weight))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    r_logp, r_ent = formula(h64 @ w64.T, targets)
    want = torch.autograd.grad(r_logp.sum() + r_ent.sum(), (h64, w64))
    assert_rel_close(g_h, want[0], 2e-5, "grad_hidden")
    assert_rel_close(g_w, want[1], 2e-4, "grad_weight")  # an fp32 sum over N rows
    if path == "triton":
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
    for cap in (0.0, -2.0, float("nan"), float("inf"), True, "30", 1e39, 1e-46):
        with pytest.raises(ValueError, match="softcap must be None or a finite number > 0"):
            linear_logprobs(hidden, weight, targets, softcap=cap)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        linear_logprobs(hidden, weight[0], targets)
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_logprobs(hidden, weight, targets, backend="cudnn")


def test_unknown_linear_strategy_is_refused(monkeypatch, device):
    hidden, weight, _, targets = make_inputs(N=5, H=8, V=11, device=device)
    monkeypatch.setenv("ALIGNFUSE_LINEAR_STRATEGY", "tiles")
    with pytest.raises(ValueError, match="ALIGNFUSE_LINEAR_STRATEGY must be one of"):
        linear_logprobs(hidden, weight, targets, backend="triton")


def test_chunk_budget_is_the_forwards_and_refuses_a_bad_value(monkeypatch, device):
    """ALIGNFUSE_CHUNK_BUDGET_MIB caps the backward's logits block as it was at the forward
    (the backward may run after the caller has restored the environment), with the same
    result; a value that is not a whole number of MiB is refused, naming the variable."""
    from alignfuse.kernels.fused import chunked
    from alignfuse.kernels.logprobs import linear_chunked

    blocks = []
    real = linear_chunked.logits_into
    monkeypatch.setattr(linear_chunked, "logits_into",
                        lambda z, *a: blocks.append(z.shape[1]) or real(z, *a))
    # ~480 counted rows: 1 MiB holds a 512-column fp32 block and its gradient, the default
    # (256 MiB on CPU, 2 GiB on CUDA) all 1031 columns at once
    hidden, weight, bias, targets = make_inputs(N=600, H=16, V=1031, device=device)
    expected = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    linear_logprobs(expected[0], expected[1], targets, bias=expected[2],
                    backend="torch").sum().backward()
    widths = {}  # the backward's block widths at each budget
    for budget in (None, "1"):
        for x in (hidden, weight, bias):
            x.grad = None
        if budget:
            monkeypatch.setenv(chunked.BUDGET_ENV, budget)
        logp = linear_logprobs(hidden, weight, targets, bias=bias, backend="triton")
        monkeypatch.delenv(chunked.BUDGET_ENV, raising=False)
        blocks.clear()  # the forward's chunks over tokens; count the backward's blocks
        logp.sum().backward()
        widths[budget] = list(blocks)
        for x, ref, what in zip((hidden, weight, bias), expected, ("hidden", "weight", "bias")):
            assert_rel_close(x.grad.double(), ref.grad, 1e-5, f"grad_{what} at budget {budget}")
    assert widths[None] == [1031] and widths["1"] == [512, 512, 7]
    for bad in ("0", "1.5", "lots"):
        monkeypatch.setenv(chunked.BUDGET_ENV, bad)
        with pytest.raises(ValueError, match="ALIGNFUSE_CHUNK_BUDGET_MIB must be a whole"):
            linear_logprobs(hidden, weight, targets, backend="triton")


@pytest.mark.parametrize("strategy, calls", [
    ("chunked", ["linear_chunked.linear_forward", "linear_chunked.linear_backward"]),
    ("fused", ["triton_forward.linear_forward", "triton_backward.linear_backward"]),
    ("fused-forward", ["triton_forward.linear_forward", "linear_chunked.linear_backward"])])
def test_each_strategy_runs_its_own_forward_and_backward(monkeypatch, device, strategy, calls):
    """The strategies differ only in which forward and backward they pair, so a mix-up
    would pass every accuracy test: record which ones ran."""
    from alignfuse.kernels.logprobs import linear_chunked, triton_backward, triton_forward

    ran = []
    for module, name in [(linear_chunked, "linear_forward"), (linear_chunked, "linear_backward"),
                         (triton_forward, "linear_forward"), (triton_backward, "linear_backward")]:
        def spy(*args, _real=getattr(module, name),
                _tag=f"{module.__name__.rsplit('.', 1)[1]}.{name}", **kwargs):
            ran.append(_tag)
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    monkeypatch.setenv("ALIGNFUSE_LINEAR_STRATEGY", strategy)
    hidden, weight, bias, targets = make_inputs(N=13, H=16, V=301, device=device)
    logp = linear_logprobs(hidden, weight, targets, bias=bias, backend="triton")
    logp.sum().backward()
    assert ran == calls
    assert all(x.grad is not None for x in (hidden, weight, bias))


def test_weight_on_another_device_is_refused():
    hidden, weight, _, targets = make_inputs(N=6, H=8, V=11)
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu"):
        linear_logprobs(hidden, weight.to("meta"), targets)
    with pytest.raises(ValueError, match="targets is on meta"):
        linear_logprobs(hidden, weight, targets.to("meta"))


@pytest.mark.gpu
@pytest.mark.parametrize("V", [151936, 128256])
def test_bf16_gpu_real_vocab(backend, device, V, monkeypatch):
    """Real vocabulary sizes, H=896, bf16 on GPU, against float64 of the same bf16 values."""
    N, H = 300, 896
    hidden, weight, bias, targets = make_inputs(N=N, H=H, V=V, dtype=torch.bfloat16,
                                                device=device, scale=4.0)
    for strategy in LINEAR_STRATEGIES if backend == "triton" else ("",):
        if not has_linear(backend):
            break
        monkeypatch.setenv("ALIGNFUSE_LINEAR_STRATEGY", strategy or "chunked")
        logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True,
                                    backend=backend)
        h64 = hidden.detach().double().requires_grad_()
        w64 = weight.detach().double().requires_grad_()
        ref_logp, ref_ent = formula(h64 @ w64.T, targets)
        assert_rel_close(logp, ref_logp, 1e-5, f"logp {strategy}")
        assert_rel_close(ent, ref_ent, 1e-5, f"entropy {strategy}")
        weights = [torch.randn_like(ref_logp), torch.randn_like(ref_ent)]
        got = grads_of([logp, ent], [hidden, weight], weights)
        want = grads_of([ref_logp, ref_ent], [h64, w64], weights)
        for name, g, w in zip(["grad_hidden", "grad_weight"], got, want):
            assert_rel_close(g, w, 1e-2, f"{name} {strategy}")
    logits = (hidden @ weight.T).detach().requires_grad_()
    lp, en = logprobs_from_logits(logits, targets, return_entropy=True, backend=backend)
    rl, re = formula(logits.double(), targets)
    assert_rel_close(lp, rl, 1e-5, "logits logp")
    assert_rel_close(en, re, 1e-5, "logits entropy")


# ---------------------------------------------------------------------------------------
# csrc/cuda/logprobs.cu's per-element math (SoftmaxState, grad_logit are __host__ __device__),
# compiled for the host by nvcc and driven exactly as a 256-thread block would drive it
# (strided per-thread online states, then the max/rescale/sum merge). No GPU needed.

_HOST_HARNESS = r"""
#include "logprobs.cu"
#include <cstdio>
#include <vector>
namespace alignfuse {
std::vector<CudaRegistrar::Fn>& CudaRegistrar::all() { static std::vector<Fn> v; return v; }
}
int main() {  // per row: V threads inv_temp target g_logp g_entropy, then V logits
  long long V, t;
  int threads;
  float inv_temp, gl, ge;
  while (std::scanf("%lld %d %f %lld %f %f", &V, &threads, &inv_temp, &t, &gl, &ge) == 6) {
    std::vector<float> x(V);
    for (auto& v : x) std::scanf("%f", &v);
    std::vector<alignfuse::SoftmaxState> state(threads);
    for (long long j = 0; j < V; ++j) state[j % threads].add(x[j] * inv_temp);
    float M = -FLT_MAX, S = 0.f, B = 0.f;
    for (const auto& st : state) M = fmaxf(M, st.m);
    for (const auto& st : state) {
      float s, b;
      st.rescaled(M, s, b);
      S += s;
      B += b;
    }
    const float lse = M + logf(S), entropy = logf(S) - B / S;
    std::printf("%.9g %.9g %.9g", lse, entropy, x[t] * inv_temp - lse);
    for (long long j = 0; j < V; ++j)
      std::printf(" %.9g", alignfuse::grad_logit(x[j] * inv_temp, lse, entropy, gl, ge, j == t, inv_temp));
    std::printf("\n");
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def cuda_row_math(tmp_path_factory):
    if __import__("shutil").which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    from helpers import build_host_harness

    return build_host_harness(tmp_path_factory.mktemp("logprobs_cu"), _HOST_HARNESS)


@pytest.mark.parametrize("V,scale,temperature", [(1031, 3.0, 1.0), (1031, 1e4, 0.7),
                                                 (7, 2.0, 1.3), (300, 1e4, 1.0),
                                                 (1031, "masked", 1.0)])
def test_cuda_row_math_matches_formula_on_host(cuda_row_math, V, scale, temperature):
    run = cuda_row_math
    rows = 5
    targets = torch.randint(0, V, (rows,))
    if scale == "masked":  # -inf logits everywhere but the targets and a few others
        logits = torch.full((rows, V), float("-inf"))
        logits[:, :40] = torch.randn(rows, 40)
        logits[torch.arange(rows), targets] = 1.0
        scale = 1.0
    else:
        logits = (torch.randn(rows, V) * scale).float()
    g_logp, g_entropy = torch.randn(rows), torch.randn(rows)
    lines = [f"{V} 256 {1 / temperature:.9g} {int(t)} {gl:.9g} {ge:.9g} "
             + " ".join(f"{v:.9g}" for v in row.tolist())
             for row, t, gl, ge in zip(logits, targets, g_logp.tolist(), g_entropy.tolist())]
    got = run(lines)
    z = logits.double().requires_grad_()
    # the harness scales by the float32 of 1/T, as the kernel does
    inv_temp = torch.tensor(1 / temperature, dtype=torch.float32).double()
    ref_logp, ref_ent = formula(z * inv_temp, targets)
    ref_lse = torch.logsumexp(z.detach() * inv_temp, -1)
    (ref_grad,) = torch.autograd.grad((ref_logp * g_logp.double() + ref_ent * g_entropy.double()).sum(), z)
    assert_rel_close(got[:, 0], ref_lse, 1e-6, "lse")
    assert_rel_close(got[:, 2], ref_logp, 1e-5, "logp")
    ref_ent = ref_ent.detach()
    if scale < 100:
        assert_rel_close(got[:, 1], ref_ent, 1e-5, "entropy")
    assert float((got[:, 1] - ref_ent).abs().max()) < 1e-2
    # fp32 log p = z - lse carries lse's rounding (~6e-4 at |z| ~ 1e4) into p
    assert_rel_close(got[:, 3:], ref_grad, 1e-5 if scale < 100 else 1e-3, "grad_logits")


# ---------------------------------------------------------------------------------------
# The cuda backend's logits path (kernels/logprobs/cuda.py, csrc/cuda/logprobs.cu) on logits
# whose row stride is not V; on the GPU, or emulated on CPU.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("V,stride,start", [(67, 80, 0), (67, 81, 3), (2101, 2109, 5)])
def test_cuda_logits_path_on_strided_rows(cuda_device, dtype, entropy, V, stride, start):
    """Row stride != V; with an odd stride and a column offset, rows start at every 16-byte
    phase, so the kernels' packed loads (row_sweep.cuh) meet heads and tails of every length;
    V=2101 gives each thread several packs."""
    from alignfuse.kernels import logprobs as lp_mod

    wide = (torch.randn(11, stride, device=cuda_device) * 3).to(dtype)
    logits = wide[:, start:start + V].detach().requires_grad_()
    targets = torch.randint(0, V, (11,), device=cuda_device)
    targets[2] = IGNORE
    out = lp_mod._LogitsLogprobsKernel.apply("cuda", logits, targets, 0.8, IGNORE, entropy)
    outs = out if entropy else (out,)
    ref = formula(logits.double(), targets, 0.8)[: len(outs)]
    for got, want in zip(outs, ref):
        assert got.dtype == torch.float32
        assert_rel_close(got, want, 1e-6, "forward")
    weights = [torch.randn(11, dtype=torch.float64, device=cuda_device) for _ in outs]
    (g,) = grads_of(outs, [logits], weights)
    l64 = logits.detach().double().requires_grad_()
    (w,) = grads_of(formula(l64, targets, 0.8)[: len(outs)], [l64], weights)
    assert g.dtype == dtype
    assert_rel_close(g, w, 1e-2 if dtype == torch.bfloat16 else 1e-6, "grad")
